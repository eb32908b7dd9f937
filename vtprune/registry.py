"""The method registry: one record per method, VLM and vision-transformer hosts alike.

``@register_method(name, Config)`` adds a method class; its :class:`MethodSpec` record carries what every consumer
needs to know about the method (the engine, sweeps, benchmarks, the robustness audit, the vLLM plugin, the tests),
read from the method class itself, so that a method is one file and no table elsewhere is keyed by its name:

* ``host``: ``"vlm"`` (prunes a VLM's visual tokens at the vision entry or inside the language model) or ``"vit"``
  (reduces tokens between the blocks of a vision transformer: timm, open_clip, CLIP / SigLIP, a VLM's tower);
* ``stage``: ``"vision"`` (after the projector), ``"llm"`` (before decoder layer K) or ``"tower"`` (between ViT blocks);
* ``signals``, ``merges``: what the method reads (``vtprune.methods.base.VISION_SIGNALS`` / ``LLM_SIGNALS``) and
  whether it replaces kept vectors by merged ones;
* ``modalities``: what the method prunes, ``"image"`` and / or ``"video"`` units (video methods read a video's
  frames; filter with ``list_methods(modality="video")``);
* ``kept_from_grid``: the kept count of each frame follows from the image / video grid alone (the vLLM plugin sizes
  Qwen3-VL video frames before the tower runs);
* ``vllm_options``: options with which a method refused by vLLM on its defaults is served there;
* ``run_options``: the options demos, benchmarks and the robustness audit run it with (where its defaults need
  something the bundled random models lack);
* ``surrogate`` / ``unreachable``: how the robustness audit's attack reaches it, or why it cannot.

A config instance finds its method by its type (:func:`spec_for_config`, walking the config class's MRO, as
torchao's handlers are keyed on the config type): ``vtprune.patch(model, DivPruneConfig(ratio=0.25))`` never goes
through a name. Names stay for YAML / JSON / the CLI (:func:`get_method`); lookups of unknown names suggest close
ones. :func:`list_methods` filters on the record.
"""

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
from typing import Any

from . import config as _config
from .config import PruneConfig

__all__ = [
    "MethodSpec",
    "register_method",
    "list_methods",
    "get_method",
    "spec_for_config",
    "import_methods",
    "load_plugins",
    "HOSTS",
    "FILTERS",
    "ENTRY_POINT_GROUP",
]

#: where a method acts (see the module docstring)
HOSTS = ("vlm", "vit")
#: record fields :func:`list_methods` filters on
FILTERS = ("host", "stage", "merges", "kept_from_grid", "modality")


@dataclass(frozen=True)
class MethodSpec:
    """The registry record of one method (see the module docstring for each field)."""

    name: str
    method_cls: type
    config_cls: type[PruneConfig]
    host: str = "vlm"

    def _fact(self, name: str, default: Any) -> Any:
        return getattr(self.method_cls, name, default)

    @property
    def stage(self) -> str:
        return self._fact("stage", "vision")

    @property
    def signals(self) -> frozenset[str]:
        return frozenset(self._fact("signals", frozenset()))

    @property
    def merges(self) -> bool:
        return bool(self._fact("merges", False))

    @property
    def modalities(self) -> frozenset[str]:
        return frozenset(self._fact("modalities", frozenset({"image", "video"})))

    @property
    def kept_from_grid(self) -> bool:
        return bool(self._fact("kept_from_grid", False))

    @property
    def vllm_options(self) -> dict:
        return dict(self._fact("vllm_options", {}))

    @property
    def run_options(self) -> dict:
        return dict(self._fact("run_options", {}))

    @property
    def surrogate(self):
        return self._fact("surrogate", None)

    @property
    def unreachable(self) -> str | None:
        return self._fact("unreachable", None)

    def options(self) -> dict[str, Any]:
        """The method's own options (its config's fields beyond those every config has: the budget, ``positions``,
        ``empty_frames``) -> default (``dataclasses.MISSING`` if required)."""
        common = {f.name for f in dataclasses.fields(PruneConfig)}
        out = {}
        for f in dataclasses.fields(self.config_cls):
            if f.name.startswith("_") or f.name in common:
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out[f.name] = default
        return out

    def make_config(self, options: dict, error: type[Exception] = TypeError) -> PruneConfig:
        """The method's config from keyword options; unknown names raise ``error`` listing the allowed ones."""
        allowed = sorted(f.name for f in dataclasses.fields(self.config_cls))
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise error(f"unknown option(s) {unknown} for method {self.name!r}; allowed: {allowed}")
        return self.config_cls(**options)


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, config_cls: type[PruneConfig], *, host: str = "vlm", override: bool = False):
    """Class decorator: register a method class under ``name`` with its config class. ``host``: ``"vlm"`` for a
    :class:`vtprune.methods.base.Method` subclass, ``"vit"`` for a :class:`vtprune.methods.vit.ViTMethod` one.

    A name is registered once; registering it again raises ``ValueError`` unless ``override=True`` or the new
    class is a redefinition of the registered one in ``__main__`` (a notebook cell or script run again: same
    class name), which replaces it."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, PruneConfig)):
        raise TypeError(f"config_cls must be a PruneConfig subclass, got {config_cls!r}")
    if host not in HOSTS:
        raise ValueError(f"host must be one of {HOSTS}, got {host!r}")

    def wrap(method_cls):
        old = _METHODS.get(name)
        rerun = (
            old is not None
            and method_cls.__module__ == "__main__" == old.method_cls.__module__
            and method_cls.__qualname__ == old.method_cls.__qualname__
        )
        if old is not None and not (override or rerun):
            raise ValueError(
                f"method {name!r} is already registered (by {old.method_cls.__name__}); pass "
                "override=True to replace it"
            )
        owner = _spec_of_type(config_cls, exact=True)
        if owner is not None and owner.name != name:
            raise ValueError(
                f"config class {config_cls.__qualname__} already belongs to method {owner.name!r}: a config finds its "
                f"method by its type, so {name!r} needs a config class of its own (e.g. a dataclass subclass of "
                f"{config_cls.__qualname__})"
            )
        config_cls.method = name
        method_cls.name = name
        method_cls.config_cls = config_cls
        _METHODS[name] = MethodSpec(name, method_cls, config_cls, host)
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
            warnings.warn(
                f"vtprune: the {ENTRY_POINT_GROUP} entry point {ep.name!r} ({ep.value}) failed to load: "
                f"{type(err).__name__}: {err}",
                stacklevel=2,
            )


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
            raise ValueError(
                f"cannot import {name!r} (a module name or a .py file that registers methods): "
                f"{type(err).__name__}: {err}"
            ) from err


def list_methods(**filters: Any) -> list[str]:
    """Names of the registered methods whose record matches every filter, sorted (those of ``vtprune.methods`` entry
    points included): ``list_methods()`` every method,
    ``list_methods(host="vlm")`` those that prune a VLM's visual tokens, ``list_methods(host="vit")`` those acting
    inside a vision transformer, ``list_methods(stage="llm")``, ``list_methods(merges=True)``,
    ``list_methods(modality="video")`` those that prune videos (``modality`` matches when the record's ``modalities``
    hold any of the values). Filters: :data:`FILTERS` (a value, or a tuple / list / set of allowed values)."""
    unknown = sorted(set(filters) - set(FILTERS))
    if unknown:
        raise TypeError(f"unknown filter(s) {unknown} for list_methods; allowed: {list(FILTERS)}")
    load_plugins()

    def ok(spec: MethodSpec) -> bool:
        for key, want in filters.items():
            wanted = want if isinstance(want, (tuple, list, set, frozenset)) else (want,)
            if key == "modality":
                if not spec.modalities & set(wanted):
                    return False
            elif getattr(spec, key) not in wanted:
                return False
        return True

    return sorted(name for name, spec in _METHODS.items() if ok(spec))


def get_method(name: str | PruneConfig) -> MethodSpec:
    """The record of the method registered as ``name``; unknown names raise ``ValueError`` with close names. A config
    instance is resolved by its type (:func:`spec_for_config`)."""
    if isinstance(name, PruneConfig):
        return spec_for_config(name)
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


def _spec_of_type(config_cls: type, exact: bool = False) -> MethodSpec | None:
    """The record whose config class is ``config_cls`` or, unless ``exact``, its nearest registered base (MRO order)."""
    by_type = {spec.config_cls: spec for spec in _METHODS.values()}
    for cls in (config_cls,) if exact else config_cls.__mro__:
        if cls in by_type:
            return by_type[cls]
    return None


def spec_for_config(config: PruneConfig) -> MethodSpec:
    """The record of the method ``config`` belongs to, found from its type: the first class in ``type(config)``'s MRO
    that a method registered (``@register_method(name, ThatConfig)``), so a subclass of a method's config runs that
    method. Raises ``TypeError`` naming the config's type and the registered config types when none is registered
    (``PruneConfig`` itself, or a config class no method registered)."""
    if not isinstance(config, PruneConfig):
        raise TypeError(
            f"expected a method config instance (a vtprune.PruneConfig subclass, e.g. vtprune.FastVConfig(keep=64)), "
            f"got {type(config).__name__}"
        )
    spec = _spec_of_type(type(config))
    if spec is None:
        load_plugins()
        spec = _spec_of_type(type(config))
    if spec is None:
        known = ", ".join(f"{s.config_cls.__name__} ({name})" for name, s in sorted(_METHODS.items()))
        raise TypeError(
            f"no method is registered for config type {type(config).__module__}.{type(config).__qualname__}; "
            f"register one with @vtprune.register_method(name, {type(config).__qualname__}), or use a registered "
            f"config type: {known}"
        )
    return spec


_config.method_record = get_method  # PruneConfig.from_dict resolves names here
