"""Method registry: ``@register_method`` adds a method class under a name; lookups suggest close names."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import sys
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .config import PruneConfig


@dataclass(frozen=True)
class MethodSpec:
    name: str
    method_cls: type
    config_cls: type[PruneConfig]

    def make_config(self, options: dict, error: type[Exception] = TypeError) -> PruneConfig:
        """The method's config from keyword options; unknown names raise ``error`` listing the allowed ones."""
        allowed = sorted(f.name for f in dataclasses.fields(self.config_cls))
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise error(f"unknown option(s) {unknown} for method {self.name!r}; allowed: {allowed}")
        return self.config_cls(**options)


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, config_cls: type[PruneConfig], *, override: bool = False):
    """Class decorator: register a :class:`vtprune.methods.base.Method` subclass under ``name``.

    A name is registered once; registering it again raises ``ValueError`` unless ``override=True`` or the new
    class is a redefinition of the registered one in ``__main__`` (a notebook cell or script run again: same
    class name), which replaces it."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, PruneConfig)):
        raise TypeError(f"config_cls must be a PruneConfig subclass, got {config_cls!r}")

    def wrap(method_cls):
        old = _METHODS.get(name)
        rerun = (old is not None and method_cls.__module__ == "__main__" == old.method_cls.__module__
                 and method_cls.__qualname__ == old.method_cls.__qualname__)
        if old is not None and not (override or rerun):
            raise ValueError(f"method {name!r} is already registered (by {old.method_cls.__name__}); pass "
                             "override=True to replace it")
        config_cls.method = name
        method_cls.name = name
        method_cls.config_cls = config_cls
        _METHODS[name] = MethodSpec(name, method_cls, config_cls)
        return method_cls

    return wrap


#: entry-point group of third-party methods: a package declares ``[project.entry-points."vtprune.methods"]``
#: ``name = "package.module"``; the module (which registers its methods with ``@register_method``) is imported the
#: first time a method name is not found or the methods are listed
ENTRY_POINT_GROUP = "vtprune.methods"
_plugins_loaded = False


def load_plugins() -> None:
    """Import the modules of the ``vtprune.methods`` entry points (once); a module that fails to import warns."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as err:  # a broken plugin must not break vtprune's own methods
            warnings.warn(f"vtprune: the {ENTRY_POINT_GROUP} entry point {ep.name!r} ({ep.value}) failed to load: "
                          f"{type(err).__name__}: {err}", stacklevel=2)


def import_methods(modules) -> None:
    """Import each of ``modules`` (module names, importable from the current folder too, or paths of ``.py``
    files) so that the methods they register are known (``vtprune sweep --import``). Raises ``ValueError``
    naming a module that cannot be imported."""
    for name in modules:
        try:
            if name.endswith(".py"):
                path = Path(name)
                if not path.is_file():
                    raise FileNotFoundError(f"no file {name!r}")
                spec = importlib.util.spec_from_file_location(path.stem, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[path.stem] = module
                spec.loader.exec_module(module)
            else:
                if "" not in sys.path and str(Path.cwd()) not in sys.path:
                    sys.path.insert(0, str(Path.cwd()))  # as ``python -m`` does
                importlib.import_module(name)
        except Exception as err:
            raise ValueError(f"cannot import {name!r} (a module name or a .py file that registers methods): "
                             f"{type(err).__name__}: {err}") from err


def list_methods() -> list[str]:
    """Names of every registered method, sorted (those of ``vtprune.methods`` entry points included)."""
    load_plugins()
    return sorted(_METHODS)


def get_method(name: str) -> MethodSpec:
    if not isinstance(name, str):
        raise TypeError(f"method must be a name (str) or a config instance, got {type(name).__name__}")
    if name not in _METHODS:
        load_plugins()
    spec = _METHODS.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, _METHODS, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown method {name!r}.{hint} Available: {', '.join(list_methods())}")
    return spec
