"""Shallow vision towers and budgets known at ``patch``: ``cls``'s start layer on towers of few layers, ``visionzip``'s
``contextual`` against ``keep`` at ``patch`` time (``ratio``: per image at forward time), and ``vtprune.stats`` after
beam search (one entry per expanded row)."""

import pytest
import tiny
import torch
from conftest import opts
from tiny import make_inputs
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

import vtprune
from vtprune import functional as F
from vtprune.methods.cls import VTCCLS


def _llava(vision_layers: int):
    """A tiny LLaVA (tests/tiny.py sizes) whose CLIP tower has ``vision_layers`` layers; eager attention, so the
    tower can report its attention weights for the reference."""
    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**dict(tiny._CLIP, num_hidden_layers=vision_layers)),
        text_config=LlamaConfig(**tiny._TEXT),
        image_token_id=tiny.IMAGE_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="eager")
    return tiny._finish(model)


# ------------------------------------------------------------------ cls: default start layer on shallow towers
@pytest.mark.parametrize(
    "num_layers,expected", [(24, list(range(16, 23))), (12, list(range(8, 11))), (4, [2]), (3, [1]), (2, [0])]
)
def test_cls_default_start_layer_is_clamped_into_range(num_layers, expected):
    # 2L/3 as long as it leaves a layer before the last one (16 of 24 for CLIP ViT-L, the official default),
    # else L-2
    assert VTCCLS(vtprune.CLSConfig(keep=4)).vision_layers(num_layers) == expected


@pytest.mark.parametrize("vision_layers,layers", [(3, [1]), (2, [0])])
def test_cls_patches_and_runs_on_shallow_towers(vision_layers, layers):
    model = _llava(vision_layers)
    inputs = make_inputs(model, "llava", [(4, 1, 5)])
    keep = 5
    with vtprune.patched(model, "cls", keep=keep), torch.no_grad():
        assert getattr(model, vtprune.api._ATTR).capture.vision_layers == layers
        logits = model(**inputs).logits
        st = vtprune.stats(model)
    assert torch.isfinite(logits).all()
    assert st.visual_tokens_in == [16] and st.visual_tokens_kept == [keep]
    # the kept tokens are the top-k of the CLS rows of exactly `layers`, from the tower's own attention weights
    with torch.no_grad():
        eager = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    cls_rows = torch.stack([eager[i][0, :, 0] for i in range(vision_layers)])  # [L, H, 1+P]
    expected = F.topk_indices(F.cls_scores(cls_rows, layers), keep)
    assert st.kept_indices[0].tolist() == expected.tolist()


@pytest.mark.parametrize(
    "vision_layers,start,allowed", [(3, 2, "0 <= start_layer <= 1"), (2, 1, "0 <= start_layer <= 0")]
)
def test_cls_explicit_start_layer_that_leaves_no_layer_raises(vision_layers, start, allowed):
    model = _llava(vision_layers)
    with pytest.raises(
        ValueError,
        match=rf"start_layer={start} leaves no vision layer.*{vision_layers}-layer "
        rf"tower.*allowed: {allowed}",
    ):
        vtprune.patch(model, "cls", keep=4, start_layer=start)
    assert not vtprune.is_patched(model)
    # an explicit start inside the range is used as given (not clamped)
    with vtprune.patched(model, "cls", keep=4, start_layer=0):
        assert getattr(model, vtprune.api._ATTR).capture.vision_layers == list(range(vision_layers - 1))


def test_cls_on_a_one_layer_tower_raises():
    with pytest.raises(ValueError, match="1-layer vision tower has no layer before its last one"):
        VTCCLS(vtprune.CLSConfig(keep=4)).vision_layers(1)
    model = _llava(1)
    with pytest.raises(ValueError, match="1-layer vision tower"):
        vtprune.patch(model, "cls", keep=4)
    assert not vtprune.is_patched(model)


# ------------------------------------------------------------------ visionzip: contextual vs keep at patch time
@pytest.mark.parametrize("keep,contextual", [(8, 8), (8, 12), (1, 1)])
def test_visionzip_contextual_not_below_keep_raises_at_patch_time(keep, contextual, model_factory):
    model = model_factory("llava")
    match = rf"contextual={contextual} leaves no dominant token in keep={keep}.*allowed: 0 <= contextual < keep"
    with pytest.raises(ValueError, match=match):
        vtprune.patch(model, "visionzip", keep=keep, contextual=contextual)
    assert not vtprune.is_patched(model)
    with pytest.raises(ValueError, match=match):
        vtprune.VisionZipConfig(keep=keep, contextual=contextual)
    with pytest.raises(ValueError, match=match):
        vtprune.PruneConfig.from_dict({"method": "visionzip", "keep": keep, "contextual": contextual})
    vtprune.VisionZipConfig(keep=keep, contextual=keep - 1)  # the largest allowed value


def test_visionzip_ratio_budget_is_checked_per_image_at_forward_time(model_factory):
    # with ratio= the budget depends on the image's token count: nothing to refuse at patch time
    cfg = vtprune.VisionZipConfig(ratio=0.25, contextual=4)
    assert cfg.split(8) == (4, 4) and cfg.split(1) == (1, 0)
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(4, 1, 5)])  # 16 visual tokens: a budget of 4
    match = r"contextual=4 leaves no dominant token in a budget of 4 tokens \(ratio=0.25 of 16 visual tokens\)"
    with vtprune.patched(model, cfg), torch.no_grad(), pytest.raises(ValueError, match=match):
        model(**inputs)
    assert not vtprune.is_patched(model)


# ------------------------------------------------------------------ stats after beam search
@pytest.mark.parametrize("method", ["random", "fastv"])  # a vision-stage and an llm-stage method
def test_stats_after_beam_search_has_one_entry_per_beam_row(method, model_factory):
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(4, 1, 5)])  # batch 1
    with vtprune.patched(model, method, **opts(method, keep=5)), torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        greedy = vtprune.stats(model)
        model.generate(**inputs, max_new_tokens=2, do_sample=False, num_beams=2)
        beams = vtprune.stats(model)
    assert greedy.visual_tokens_kept == [5]
    # generate expands the batch to batch * num_beams rows before the prefill: one entry per row
    assert beams.visual_tokens_in == [16, 16] and beams.visual_tokens_kept == [5, 5]
    assert len(beams.kept_indices) == 2
    assert beams.kept_indices[0].tolist() == beams.kept_indices[1].tolist() == greedy.kept_indices[0].tolist()
    # and the FLOPs count the prefill of every row, as it runs
    assert beams.prefill_flops == 2 * greedy.prefill_flops
    assert beams.prefill_flops_full == 2 * greedy.prefill_flops_full
