import dataclasses
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
from vtprune.methods.base import Method  # noqa: E402


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


def _record(method: str):
    from vtprune.registry import get_method

    return get_method(method)


#: methods that prune at several decoder layers (their own checks: tests/methods/test_pyramid.py); checks that assume
#: one prune point with ``keep`` tokens after it skip them. From the record: the method overrides ``Method.layers``
MULTI_POINT_METHODS = tuple(
    m for m in vtprune.list_methods(host="vlm") if _record(m).method_cls.layers is not Method.layers
)
#: methods whose ``keep`` is the average number of visual tokens over the decoder layers: their config's
#: ``budget_kind`` option defaults to ``"average"``
AVERAGE_BUDGET_METHODS = tuple(
    m for m in vtprune.list_methods(host="vlm") if getattr(_record(m).config_cls, "budget_kind", None) == "average"
)


def refused(method: str, family: str) -> bool:
    """Whether patching ``family`` with ``method`` raises (its signal or point does not exist there)."""
    if isinstance(method, str) and refused_by_capabilities(method, family):
        return True
    return isinstance(method, str) and reads_linear_layer(method, family)


@functools.cache
def reads_linear_layer(method: str, family: str) -> bool:
    """Whether a default prune point of ``method`` (at the tests' :func:`budget`) reads its signal from a
    linear-attention layer of the tiny hybrid Qwen3.5 (:data:`tiny.QWEN35_LAYER_TYPES`: layers 0 and 3; e.g. pdrop's
    last point reads layer 3's own attention, sparsevlm's first layer 0): ``patch`` refuses it there.
    tests/adapters/test_qwen3.py runs such methods at full-attention layers."""
    spec = _record(method)
    if not family.startswith("qwen3_5") or spec.host != "vlm" or spec.stage != "llm":
        return False
    from vtprune.engine.plan import build_points

    types = tiny.QWEN35_LAYER_TYPES
    points = build_points([spec.method_cls(spec.make_config(budget(method, 4)))], len(types))
    return any(types[layer] != "full_attention" for p in points for layer in p.signal_layers)


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
    that a CLS-scored method (:func:`cls_scored`) named in :data:`RECEIVED_MATRIX` runs on the families there only
    where it is named (its signal, importance="received", is checked on every family by tests/engine/test_received.py;
    the full product would add minutes to the suite). A CLS-scored method the matrix does not name (a new one) runs on
    every family."""
    if refused(method, family):
        return False
    if cls_scored(method) and family in RECEIVED_MATRIX and method in _NAMED:
        return method in RECEIVED_MATRIX[family]
    return True


def cls_scored(method: str) -> bool:
    """From the record: the method reads signal ``cls_attention`` and has an ``importance`` option, i.e. the vision
    tower's CLS attention where it has a CLS token (LLaVA), else (default importance="received") the attention each
    patch receives (Qwen-VL); tests/engine/test_received.py. InternVL has a CLS token: its default is "cls"
    (tests/adapters/test_internvl.py checks "received" there too)."""
    spec = _record(method)
    return "cls_attention" in spec.signals and "importance" in {f.name for f in dataclasses.fields(spec.config_cls)}


#: which CLS-scored methods the method x family tests run on each Qwen family (each named method on at least one
#: family; visionzip where tokens are merge units in window order and where DeepStack levels are merged), and on
#: LLaVA-NeXT-Video, whose images are llava_next's (CLS rows, AnyRes): the others run on its videos in
#: tests/adapters/test_llava_video.py. Gemma 3 (SigLIP without CLS, scores pooled as the projector pools) runs all
RECEIVED_MATRIX = {
    "qwen2_vl": ("cls", "prumerge"),
    "qwen2_5_vl": ("visionzip", "hiprune"),  # hiprune: its official Qwen port
    "qwen3_vl": ("visionzip", "scope", "prumerge"),  # prumerge: DeepStack levels merged by its weights
    "qwen3_vl_moe": ("todre",),
    "qwen3_5": ("cls",),
    "qwen3_5_moe": ("vispruner",),
    "llava_next_video": ("cls",),
}
_NAMED = {m for ms in RECEIVED_MATRIX.values() for m in ms}
#: families whose images are several vision-tower crops (LLaVA-NeXT's AnyRes, InternVL's tiles)
MULTI_CROP_FAMILIES = ("llava_next", "internvl")
