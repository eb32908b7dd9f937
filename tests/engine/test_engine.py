"""The engine's structure: module sizes, the frozen plan (no per-model state on a method), the method-input records."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vtprune
from vtprune.engine import build_points
from vtprune.methods.base import DecoderInputs, ImageInputs, Method, VisionInputs
from vtprune.methods.pdrop import PDrop

ENGINE = Path(vtprune.__file__).parent / "engine"


@pytest.mark.parametrize("path", sorted(ENGINE.glob("*.py")), ids=lambda p: p.name)
def test_engine_modules_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 400, f"vtprune/engine/{path.name} has {lines} lines; split it by responsibility (<= 400)"


# the default boundaries (L/4, L/2, 3L/4) and ratios 1/2, 1/4, 1/8 of a 256-token image
DEPTHS = {4: {1: 128, 2: 64, 3: 32}, 6: {1: 128, 3: 64, 4: 32}}


@pytest.mark.parametrize("order", [(4, 6), (6, 4)])
def test_one_method_bound_to_two_depths_keeps_each_plan(order):
    method = PDrop(vtprune.PDropConfig(ratios=(0.5, 0.25, 0.125)))
    plans = {depth: build_points([method], depth) for depth in order}  # bound to both before any budget is read
    for depth in reversed(order):
        assert {p.layer: p.budget(256, 256) for p in plans[depth]} == DEPTHS[depth]
        assert all(p.num_layers == depth for p in plans[depth])
    assert {k: v for k, v in vars(method).items() if k != "config"} == {}  # nothing cached on the method


def test_sparsevlm_plan_reads_its_points_from_the_plan():
    method = vtprune.registry.get_method("sparsevlm").method_cls(vtprune.SparseVLMConfig(keep=128))
    deep, shallow = build_points([method], 32), build_points([method], 3)
    assert [p.budget(576, 576) for p in deep] == [303, 110, 36]  # official v1.5 counts for 128
    assert [p.budget(576, 576) for p in shallow] == [110, 36]  # fewer layers: the last rows
    assert [p.budget(576, 576) for p in deep] == [303, 110, 36]  # unchanged by the later binding


def test_image_inputs_builds_the_record_its_fields_belong_to():
    feats = torch.randn(6, 4)
    vision = ImageInputs(n=6, k=2, features=feats, extra={"grid": None})
    decoder = ImageInputs(n=6, k=2, hidden=torch.randn(9, 4), image_start=1)
    assert type(vision) is VisionInputs and type(decoder) is DecoderInputs
    assert isinstance(vision, ImageInputs) and isinstance(decoder, ImageInputs)
    assert vision.hidden is None and vision.text_attention is None  # the other kind's fields read as None
    assert decoder.cls_attention is None and decoder.features is None and decoder.image_start == 1
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vision.nope  # noqa: B018

    class Toy(Method):
        name = "toy"
        signals = frozenset({"features"})

    vision.hide_undeclared(Toy(vtprune.PruneConfig(keep=2)))
    assert vision.features is feats
    for field in ("cls_attention", "hidden", "text_attention"):  # undeclared: raises, own field or the other kind's
        with pytest.raises(RuntimeError, match=f"method 'toy' read ImageInputs.{field}, which signal"):
            getattr(vision, field)
