"""Model-family adapters, keyed on ``config.model_type``."""

from __future__ import annotations

from torch import nn

from .base import ModelAdapter
from .gemma3 import Gemma3Adapter
from .internvl import InternVLAdapter
from .llava import (
    LlavaAdapter,
    LlavaNextAdapter,
    LlavaNextVideoAdapter,
    LlavaOnevisionAdapter,
)
from .qwen_vl import Qwen3VLAdapter, Qwen35Adapter, QwenVLAdapter

_ADAPTERS: dict[str, type[ModelAdapter]] = {
    t: cls
    for cls in (
        LlavaAdapter,
        LlavaNextAdapter,
        LlavaNextVideoAdapter,
        LlavaOnevisionAdapter,
        QwenVLAdapter,
        Qwen3VLAdapter,
        Qwen35Adapter,
        InternVLAdapter,
        Gemma3Adapter,
    )
    for t in cls.model_types
}

#: families whose mechanism differs enough that they are refused explicitly (not silently mis-pruned)
_NOT_YET: dict[str, str] = {}


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def tower_merging_families() -> list[str]:
    """Model types whose vision tower takes token merging (``ModelAdapter.tower_merging``)."""
    return [t for t, cls in _ADAPTERS.items() if cls.tower_merging]


def get_adapter(model) -> ModelAdapter:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a transformers model (torch.nn.Module), got {type(model).__name__}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in _NOT_YET:
        raise NotImplementedError(f"model_type {model_type!r} is not supported yet: {_NOT_YET[model_type]}")
    cls = _ADAPTERS.get(model_type)
    if cls is None:
        raise ValueError(
            f"{type(model).__name__} (model_type={model_type!r}) has no visual tokens vtprune knows how to prune; "
            f"supported model types: {', '.join(supported_model_types())}"
        )
    if not hasattr(model, "model") or not hasattr(model.model, "language_model"):
        raise ValueError(
            f"{type(model).__name__} has model_type {model_type!r} but is not a *ForConditionalGeneration model "
            "with .model.language_model; pass the full VLM (e.g. LlavaForConditionalGeneration)"
        )
    return cls(model)


__all__ = ["ModelAdapter", "get_adapter", "supported_model_types", "tower_merging_families"]
