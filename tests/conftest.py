import functools
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import tiny  # noqa: E402

import vtprune  # noqa: E402


@functools.lru_cache(maxsize=None)
def _model(family: str, attn: str = "sdpa"):
    return tiny.build(family, attn=attn)


@pytest.fixture
def model_factory():
    """Cached tiny model per (family, attention implementation); always returned unpatched."""

    def get(family, attn="sdpa"):
        model = _model(family, attn)
        if vtprune.is_patched(model):
            vtprune.unpatch(model)
        return model

    return get


def budget(method: str, keep: int) -> dict:
    """``keep=`` for ``method``; methods whose ``keep`` is an average over decoder layers (``pdrop``), which a tiny
    4-layer model cannot meet below ``n / 4``, get their official schedule instead (``ratios=(0.5, 0.25, 0.125)``)."""
    return {"ratios": (0.5, 0.25, 0.125)} if method in AVERAGE_BUDGET_METHODS else {"keep": keep}


#: methods that prune at several decoder layers (their own checks: tests/test_pyramid.py); checks that assume one
#: prune point with ``keep`` tokens after it skip them
MULTI_POINT_METHODS = ("pdrop", "sparsevlm")
#: methods whose ``keep`` is the average number of visual tokens over the decoder layers
AVERAGE_BUDGET_METHODS = ("pdrop",)


def supports(method: str, family: str) -> bool:
    """Whether ``method`` has its signals on ``family`` (CLS attention needs a CLS token)."""
    if method in SINGLE_CROP_METHODS and family == "llava_next":
        return False
    if method in REFUSED_ON_TINY_QWEN35 and family.startswith("qwen3_5"):
        return False  # a default point reads a linear-attention layer of the tiny Qwen3.5: refused
    return not (method in CLS_METHODS and family in NO_CLS_FAMILIES)


#: families whose vision tower has no CLS token (Qwen's ViT, Gemma 3's SigLIP)
NO_CLS_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "gemma3")
#: methods that need the vision tower's CLS attention (LLaVA families only)
CLS_METHODS = ("cls", "todre", "visionzip", "vispruner")
#: methods that do not handle AnyRes / multi-crop images yet
SINGLE_CROP_METHODS = ("visionzip",)
#: multi-point methods whose default points read a linear-attention layer of the tiny Qwen3.5 (layers 0 and 3):
#: pdrop's last point (layer 3's own attention), sparsevlm's first (layer 0); tests/test_qwen3.py runs them at
#: full-attention layers
REFUSED_ON_TINY_QWEN35 = ("pdrop", "sparsevlm")
