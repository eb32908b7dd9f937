import functools
import os
import sys

import pytest
import torch

_TESTS = os.path.dirname(__file__)
# tests/tiny.py and this file by module name; test modules are grouped by layer (functional, methods, adapters, engine,
# tools) and a few import another's reference implementation by its module name (e.g. ``from test_cache import
# _reference``): every layer folder is importable, whichever file runs first
sys.path[:0] = [_TESTS] + [os.path.join(_TESTS, d) for d in ("functional", "methods", "adapters", "engine", "tools")]
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import tiny  # noqa: E402

import vtprune  # noqa: E402


@functools.cache
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
    """``keep=`` for ``method`` (plus :func:`opts`); methods whose ``keep`` is an average over decoder layers
    (``pdrop``), which a tiny 4-layer model cannot meet below ``n / 4``, get their official schedule instead
    (``ratios=(0.5, 0.25, 0.125)``)."""
    return opts(method, **({"ratios": (0.5, 0.25, 0.125)} if method in AVERAGE_BUDGET_METHODS else {"keep": keep}))


#: options the method x family tests add to a method's defaults: cdpruner's default on CLIP towers is the paper's
#: text="clip", which needs a CLIP text tower the tiny models lack (that path: tests/methods/test_baselines.py)
TEST_OPTIONS = {"cdpruner": {"text": "llm"}}


def opts(method, **options) -> dict:
    """``options`` plus :data:`TEST_OPTIONS` of ``method`` (a name; anything else: ``options`` unchanged)."""
    return {**TEST_OPTIONS.get(method, {}), **options} if isinstance(method, str) else options


#: methods that prune at several decoder layers (their own checks: tests/methods/test_pyramid.py); checks that assume
#: one prune point with ``keep`` tokens after it skip them
MULTI_POINT_METHODS = ("pdrop", "sparsevlm")
#: methods whose ``keep`` is the average number of visual tokens over the decoder layers
AVERAGE_BUDGET_METHODS = ("pdrop",)


def refused(method: str, family: str) -> bool:
    """Whether patching ``family`` with ``method`` raises (its signal or point does not exist there)."""
    if method in SINGLE_CROP_METHODS and family in tiny.ANYRES:
        return True
    if isinstance(method, str) and refused_by_capabilities(method, family):
        return True
    return method in REFUSED_ON_TINY_QWEN35 and family.startswith("qwen3_5")  # a default point reads a linear layer


def refused_by_capabilities(method: str, family: str) -> bool:
    """From the method's registry record and the family's adapter: a method for single-crop images (``multi_crop =
    False``) on a multi-crop family, or one reading only the full-width CLS query (signal ``vision_qk`` without
    ``cls_attention``, whose ``received`` attention serves where there is no CLS token) on a tower without a CLS
    token; both are refused at ``patch``."""
    from vtprune.adapters import _ADAPTERS
    from vtprune.registry import get_method

    spec, adapter = get_method(method), _ADAPTERS.get(family)
    if adapter is None or spec.host != "vlm":
        return False
    if not getattr(spec.method_cls, "multi_crop", True) and adapter.multi_crop:
        return True
    only_cls = "vision_qk" in spec.signals and "cls_attention" not in spec.signals
    return only_cls and not adapter.has_cls_token


def supports(method: str, family: str) -> bool:
    """Whether the method x family tests run ``method`` on ``family``: every pair that is not :func:`refused`, except
    that the CLS-scored methods run on the Qwen families through :data:`RECEIVED_MATRIX` only (their signal,
    importance="received", is checked on every family by tests/engine/test_received.py; the full 4 x 6 product would add
    minutes to the suite)."""
    if refused(method, family):
        return False
    if method in CLS_METHODS and family in RECEIVED_MATRIX:
        return method in RECEIVED_MATRIX[family]
    if method in CLS_METHODS and family == "llava_next_video":  # its images are llava_next's (CLS rows, AnyRes):
        return method == "cls"  # the others run on its videos in tests/adapters/test_llava_video.py
    return True


#: CLS-scored methods: the vision tower's CLS attention where it has a CLS token (LLaVA), else (default
#: importance="received") the attention each patch receives (Qwen-VL); tests/engine/test_received.py. InternVL has a CLS
#: token: its default is "cls" (tests/adapters/test_internvl.py checks "received" there too)
CLS_METHODS = ("cls", "todre", "visionzip", "vispruner", "scope", "hiprune", "prumerge")
#: which CLS-scored methods the method x family tests run on each Qwen family (every method on at least one
#: family; visionzip where tokens are merge units in window order and where DeepStack levels are merged)
RECEIVED_MATRIX = {
    "qwen2_vl": ("cls", "prumerge"),
    "qwen2_5_vl": ("visionzip", "hiprune"),  # hiprune: its official Qwen port
    "qwen3_vl": ("visionzip", "scope", "prumerge"),  # prumerge: DeepStack levels merged by its weights
    "qwen3_vl_moe": ("todre",),
    "qwen3_5": ("cls",),
    "qwen3_5_moe": ("vispruner",),
    # SigLIP without CLS, scores pooled as the projector pools
    "gemma3": ("cls", "todre", "visionzip", "vispruner", "scope", "hiprune", "prumerge"),
}
#: methods that do not handle AnyRes / multi-crop images yet
SINGLE_CROP_METHODS = ()
#: families whose images are several vision-tower crops (LLaVA-NeXT's AnyRes, InternVL's tiles)
MULTI_CROP_FAMILIES = ("llava_next", "internvl")
#: multi-point methods whose default points read a linear-attention layer of the tiny Qwen3.5 (layers 0 and 3):
#: pdrop's last point (layer 3's own attention), sparsevlm's first (layer 0); tests/adapters/test_qwen3.py runs them at
#: full-attention layers
REFUSED_ON_TINY_QWEN35 = ("pdrop", "sparsevlm")
