"""vtprune: training-free visual-token pruning for Hugging Face vision-language models.

import vtprune
vtprune.patch(model, "fastv", keep=64)     # in place; model.generate(...) as usual
vtprune.stats(model)                       # PruneStats of the last pruning forward
vtprune.unpatch(model)
"""

from . import methods as _methods  # noqa: F401  (registers the methods: every module of vtprune/methods)
from ._version import __version__
from .api import (
    is_patched,
    list_methods,
    patch,
    patched,
    set_image_sizes,
    set_instructions,
    stats,
    unpatch,
)
from .config import PruneConfig
from .methods.vit import list_vit_methods
from .registry import _METHODS, register_method
from .stats import PruneStats

#: every registered method's config class, by class name (vtprune.FastVConfig, vtprune.ToMeConfig, ...)
_CONFIGS = {spec.config_cls.__name__: spec.config_cls for spec in _METHODS.values()}
globals().update(_CONFIGS)

__all__ = [
    "patch",
    "unpatch",
    "patched",
    "stats",
    "list_methods",
    "is_patched",
    "register_method",
    "set_image_sizes",
    "set_instructions",
    "list_vit_methods",
    "PruneConfig",
    "PruneStats",
    "__version__",
    *sorted(_CONFIGS),
]
