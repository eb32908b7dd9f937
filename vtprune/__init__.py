"""vtprune: training-free visual-token pruning for Hugging Face vision-language models.

    import vtprune
    vtprune.patch(model, "fastv", keep=64)     # in place; model.generate(...) as usual
    vtprune.stats(model)                       # PruneStats of the last pruning forward
    vtprune.unpatch(model)
"""

from . import methods as _methods  # noqa: F401  (registers the methods)
from .api import is_patched, list_methods, patch, patched, set_image_sizes, set_instructions, stats, unpatch
from .config import PruneConfig
from .methods import (
    CLSConfig, DARTConfig, DivPruneConfig, FastVConfig, PACTConfig, RandomConfig, ToDREConfig, VisionZipConfig,
    ZOOConfig, VisPrunerConfig, CDPrunerConfig, PoolConfig, PDropConfig, SparseVLMConfig,
)
from .methods.vit import PiToMeConfig, ToMeConfig, ZeroTPruneConfig, list_vit_methods
from .registry import register_method
from .stats import PruneStats

__version__ = "0.1.0"

__all__ = [
    "patch", "unpatch", "patched", "stats", "list_methods", "is_patched", "register_method", "set_image_sizes",
    "set_instructions",
    "PruneConfig", "PruneStats", "CLSConfig", "DARTConfig", "DivPruneConfig", "FastVConfig", "RandomConfig",
    "ZOOConfig", "ToDREConfig", "VisionZipConfig", "PACTConfig", "ToMeConfig", "PiToMeConfig", "ZeroTPruneConfig",
    "list_vit_methods", "VisPrunerConfig", "CDPrunerConfig", "PoolConfig", "PDropConfig", "SparseVLMConfig",
]
