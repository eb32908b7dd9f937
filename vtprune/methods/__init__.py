"""Registered pruning methods: importing this package imports every module in it, which registers each method.

A new method is one file here (its config, its ``@register_method`` class, its options documented on the config):
nothing else needs editing. Each registered config and method class is also exported here (and configs from
``vtprune``) under its class name.
"""

import importlib
import pkgutil

from ..registry import _METHODS
from .base import ImageInputs, Method

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["ImageInputs", "Method"]
for _spec in _METHODS.values():
    for _cls in (_spec.config_cls, _spec.method_cls):
        globals()[_cls.__name__] = _cls
        __all__.append(_cls.__name__)
