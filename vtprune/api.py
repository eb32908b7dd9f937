"""The public verbs: ``patch``, ``unpatch``, ``patched``, ``stats``, ``list_methods``."""

from __future__ import annotations

import contextlib
from typing import Any

from torch import nn

from . import compat
from .adapters import get_adapter, tower_merging_families
from .adapters.vit import find_vit_host, vit_host_names
from .config import PruneConfig
from .engine import Session
from .engine.vit import ViTSession
from .methods.tower import TowerMerge
from .methods.vit import list_vit_methods
from .registry import MethodSpec, get_method, list_methods, spec_for_config
from .stats import PruneStats

_ATTR = "_vtprune_session"

__all__ = ["patch", "unpatch", "patched", "stats", "list_methods", "is_patched", "set_image_sizes", "set_instructions"]


def _make_config(method: str | PruneConfig, options: dict[str, Any]) -> PruneConfig:
    if isinstance(method, PruneConfig):
        if options:
            raise TypeError(
                f"pass options either in the config or as keywords, not both (got a {type(method).__name__} "
                f"and keywords {sorted(options)})"
            )
        spec_for_config(method)  # registered? (its type names the method)
        return method
    if not isinstance(method, str):
        raise TypeError(
            f"method must be a registered name or a config instance, got {type(method).__name__}; "
            f"names: {', '.join(list_methods())}"
        )
    return get_method(method).make_config(options)


def _make_configs(method, options: dict[str, Any]) -> list[PruneConfig]:
    """One config, or a schedule's configs (a list / tuple of config instances)."""
    if not isinstance(method, (list, tuple)):
        return [_make_config(method, options)]
    if options:
        raise TypeError(
            f"a schedule (a list of configs) takes its options inside each config, not as keywords "
            f"(got keywords {sorted(options)})"
        )
    if not method:
        raise ValueError(
            "an empty schedule: give one or more method configs, e.g. "
            "[vtprune.DivPruneConfig(keep=128), vtprune.FastVConfig(keep=64, layer=2)]"
        )
    for i, item in enumerate(method):
        if not isinstance(item, PruneConfig):
            raise TypeError(
                f"schedule element {i} is a {type(item).__name__} ({item!r}); each element must be a "
                "method config instance (e.g. vtprune.FastVConfig(keep=64)), with its own budget"
            )
        spec_for_config(item)  # registered?
    return list(method)


def patch(model: nn.Module, method: str | PruneConfig | list[PruneConfig], **options: Any) -> nn.Module:
    """Make ``model`` prune its visual tokens with ``method``; in place, returns the model.

    ``vtprune.patch(model, "fastv", keep=64)`` or ``vtprune.patch(model, vtprune.FastVConfig(keep=64))``; a
    schedule composes methods: ``vtprune.patch(model, [vtprune.DivPruneConfig(keep=128), vtprune.FastVConfig(keep=64,
    layer=2)])`` — each acts at its own prune points (vision entry, decoder layer K) in the order they come in the
    model, a later one on what earlier ones kept, its budget counting those. Two methods at one point raise
    ``ValueError``. Raises ``ImportError`` when the installed transformers is outside the supported range.

    A plain vision transformer (timm ``VisionTransformer``, transformers ``CLIPVisionModel`` / ``SiglipVisionModel``,
    open_clip ``CLIP`` / ``VisionTransformer``) takes one of ``vtprune.list_vit_methods()`` instead, acting between
    its blocks: ``vtprune.patch(vit, "tome", ratio=0.5)``. On a LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision model
    (images), such a method merges inside the vision tower (budget: patch tokens per crop at the layer the projector
    reads) and the merged tokens are the image's visual tokens (``vtprune.methods.tower``); it takes the vision entry
    of a schedule:
    ``vtprune.patch(llava, [vtprune.ToMeConfig(keep=64), vtprune.FastVConfig(keep=32, layer=2)])``.
    """
    compat.check_transformers()
    host = find_vit_host(model) if isinstance(model, nn.Module) else None
    if host is not None:  # token reduction inside a vision transformer (vtprune.methods.vit)
        return _patch_vit(model, host, method, options)
    steps = method if isinstance(method, (list, tuple)) else [method]
    tower = next((m for m in steps if _is_vit_method(m)), None)
    try:
        adapter = get_adapter(model)
    except (ValueError, TypeError):
        if tower is None:
            raise
        raise ValueError(
            f"method {_spec(tower).name!r} reduces tokens inside a vision transformer, and "
            f"{type(model).__name__} is not one vtprune knows ({'; '.join(vit_host_names())}), nor a VLM whose "
            f"vision tower it merges in ({', '.join(tower_merging_families())})"
        ) from None
    if getattr(model, _ATTR, None) is not None:
        current = "+".join(m.name for m in getattr(model, _ATTR).methods)
        raise ValueError(f"this model is already patched (method {current!r}); call vtprune.unpatch(model) first")
    configs = _make_configs(method, options)
    specs = [spec_for_config(c) for c in configs]
    methods = [TowerMerge(c) if s.host == "vit" else s.method_cls(c) for s, c in zip(specs, configs)]
    session = Session(model, adapter, methods)
    session.install()
    setattr(model, _ATTR, session)
    return model


def _spec(method) -> MethodSpec | None:
    """The record of ``method`` (a config instance: by its type; a name), None if it names no registered method (the
    configs are made, and refused with the registered names / config types, by :func:`_make_config`)."""
    if isinstance(method, PruneConfig):
        try:
            return spec_for_config(method)
        except TypeError:
            return None
    return get_method(method) if isinstance(method, str) and method in list_methods() else None


def _is_vit_method(method) -> bool:
    spec = _spec(method)
    return spec is not None and spec.host == "vit"


def _patch_vit(model: nn.Module, host, method, options: dict[str, Any]) -> nn.Module:
    if isinstance(method, (list, tuple)):
        raise TypeError("a vision transformer takes one token-reduction method, not a schedule (list)")
    spec = _spec(method)
    if spec is not None and spec.host != "vit":
        raise ValueError(
            f"{type(model).__name__} is a vision transformer ({host.name}); method {spec.name!r} prunes a "
            f"VLM's visual tokens. Methods that act inside a ViT: {', '.join(list_vit_methods())}"
        )
    config = _make_config(method, options)
    if getattr(model, _ATTR, None) is not None:
        current = "+".join(m.name for m in getattr(model, _ATTR).methods)
        raise ValueError(f"this model is already patched (method {current!r}); call vtprune.unpatch(model) first")
    vit_method = spec_for_config(config).method_cls(config)
    patches = host.num_patches()
    if patches:  # a budget the method cannot reach fails here, not at the first forward
        vit_method.schedule(patches, len(host.blocks))
    session = ViTSession(model, host, vit_method)
    session.install()
    setattr(model, _ATTR, session)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Remove everything ``patch`` installed; the model behaves exactly as before. Returns the model."""
    session = getattr(model, _ATTR, None)
    if session is None:
        raise ValueError(f"{type(model).__name__} is not patched by vtprune; nothing to unpatch")
    session.remove()
    delattr(model, _ATTR)
    return model


def is_patched(model: nn.Module) -> bool:
    return getattr(model, _ATTR, None) is not None


@contextlib.contextmanager
def patched(model: nn.Module, method: str | PruneConfig | list[PruneConfig], **options: Any):
    """``with vtprune.patched(model, "cls", ratio=0.25): ...`` — unpatches on exit, even on error. Takes what
    :func:`patch` takes (a schedule too). Exit removes only the patch this block made: if the body already unpatched
    it (and maybe patched again), exit leaves the model as the body left it (no "not patched" error masking the
    body's own)."""
    patch(model, method, **options)
    session = getattr(model, _ATTR)
    try:
        yield model
    finally:
        if getattr(model, _ATTR, None) is session:
            unpatch(model)


def stats(model: nn.Module) -> PruneStats | None:
    """``PruneStats`` of the last forward pass of a patched model that had visual tokens, else None."""
    session = getattr(model, _ATTR, None)
    return None if session is None else session.stats


def _patched_session(model: nn.Module, doing: str):
    session = getattr(model, _ATTR, None)
    if session is None:
        raise ValueError(f"{type(model).__name__} is not patched by vtprune; patch it before {doing}")
    return session


def set_image_sizes(model: nn.Module, sizes) -> None:
    """Original ``(width, height)`` of each image of the *next* prompt, in order, for methods that mask the padding
    of padded-to-square LLaVA-1.5 images (``fastv`` with ``debias=True``). Used by the next forward (or
    ``generate``) that carries images, then forgotten (``generate``'s beams / return sequences, copies of a row, read
    their row's sizes). ``sizes=None`` clears them."""
    session = _patched_session(model, "setting image sizes")
    if sizes is None:
        session.image_sizes = None
        return
    try:
        sizes = [tuple(s) for s in sizes]
    except TypeError:
        raise TypeError(f"sizes must be a list of (width, height) pairs, got {sizes!r}") from None
    for s in sizes:
        if len(s) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in s):
            raise ValueError(f"each image size must be a (width, height) pair of positive ints, got {s!r}")
    session.image_sizes = sizes


def set_instructions(model: nn.Module, texts) -> None:
    """The instruction (question) of each prompt row of the *next* prompt, for methods that score visual tokens by
    their relevance to it (``cdpruner`` with ``text="clip"``): a list of one ``str`` per batch row (``generate``'s
    beams / return sequences, copies of a row, read their row's). Used by the next forward (or ``generate``) that
    carries images, then forgotten. ``texts=None`` clears them."""
    session = _patched_session(model, "setting instructions")
    if texts is None:
        session.instructions = None
        return
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"texts must be a list of str (one instruction per prompt row), got {texts!r}")
    session.instructions = list(texts)
