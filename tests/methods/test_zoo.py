"""ZOO-Prune: captured projector inputs, kept set vs an independent route, JVP vs literal estimator."""

import copy

import pytest
import torch
from tiny import ANYRES, FAMILIES, INTERNVL_TILE_TOKENS, make_inputs

import vtprune
from vtprune import functional as F
from vtprune.methods.zoo import ZOOPrune


def _spy_inputs(monkeypatch):
    seen = []
    original = ZOOPrune.select

    def spy(self, image):
        seen.append(image)
        return original(self, image)

    monkeypatch.setattr(ZOOPrune, "select", spy)
    return seen


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ANYRES])  # AnyRes: crops, newlines (below)
def test_projector_of_captured_inputs_gives_the_visual_tokens(family, model_factory, monkeypatch):
    # independent check of the capture and of Qwen2.5's window-order undo: P(x) must be the model's features
    model = model_factory(family)
    inputs = make_inputs(model, family, [(3, 2, 4)])
    seen = _spy_inputs(monkeypatch)
    with vtprune.patched(model, "zoo", keep=3, num_directions=4), torch.no_grad():
        model(**inputs)
    assert len(seen) == 2
    for image in seen:
        crops = image.n // INTERNVL_TILE_TOKENS if family == "internvl" else 1  # InternVL: one crop per tile
        assert image.projector_inputs.shape[:2] == (crops, image.n // crops)
        torch.testing.assert_close(
            image.projector(image.projector_inputs.flatten(0, 1)), image.features, rtol=1e-5, atol=1e-5
        )


def test_llava_next_crops_pack_to_every_visual_token(model_factory, monkeypatch):
    model = model_factory("llava_next")
    inputs = make_inputs(model, "llava_next", [(3, 1, 4)])
    seen = _spy_inputs(monkeypatch)
    with vtprune.patched(model, "zoo", keep=3, num_directions=4), torch.no_grad():
        model(**inputs)
    image = seen[0]
    crops = image.projector_inputs.shape[0]
    assert crops > 1 and image.projector_inputs.shape[1] == (56 // 14) ** 2
    sens = ZOOPrune(vtprune.ZOOConfig(keep=3, num_directions=4)).sensitivity(image)
    assert sens.shape == (image.n,) and bool(torch.isfinite(sens).all())


def test_zoo_keeps_the_reference_selection_from_the_unpatched_tower(model_factory):
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(4, 1, 6)])
    inner = model.model
    with torch.no_grad():
        hidden = inner.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][0, 1:]
        feats = inner.get_image_features(inputs["pixel_values"]).pooler_output[0]
    gen = torch.Generator().manual_seed(7)
    dirs = torch.randn(16, hidden.shape[1], generator=gen)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    proj = inner.multi_modal_projector
    for estimator, sens in (
        ("literal", F.zoo_sensitivity(proj, hidden, dirs, h=0.01)),
        ("jvp", F.zoo_sensitivity_jvp(proj, hidden, dirs)),
    ):
        ref = F.zoo_select(sens, feats, 5).sort().values
        with vtprune.patched(model, "zoo", keep=5, num_directions=16, seed=7, estimator=estimator), torch.no_grad():
            model(**inputs)
            assert vtprune.stats(model).kept_indices[0].tolist() == ref.tolist()


def _spearman(a, b):
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_jvp_estimator_agrees_with_the_literal_one_on_realistic_inputs():
    # a LLaVA-style projector (Linear -> GELU -> Linear) at a quarter of LLaVA-1.5-7B's widths, on
    # CLIP-like features (layer-normed scale), 576 tokens, the paper's m=64 and h=0.01
    from transformers import LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=dict(hidden_size=256, num_attention_heads=4), text_config=dict(hidden_size=1024))
    proj = LlavaMultiModalProjector(cfg)
    x = torch.randn(576, 256) * torch.rand(576, 1) * 2  # tokens of different scales
    dirs = torch.randn(64, 256)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    literal = F.zoo_sensitivity(proj, x, dirs, h=0.01)
    seq = torch.nn.Sequential(proj.linear_1, proj.act, proj.linear_2)
    jvp = F.zoo_sensitivity_jvp(seq, x, dirs)
    assert _spearman(literal, jvp) >= 0.99
    feats = proj(x).detach()
    for k in (64, 128, 192):
        a = set(F.zoo_select(literal, feats, k).tolist())
        b = set(F.zoo_select(jvp, feats, k).tolist())
        assert len(a ^ b) <= 2 * max(2, k // 50), (k, len(a ^ b))
    # the generic (any projector) route computes the same JVP as the MLP fast path
    torch.testing.assert_close(F.zoo_sensitivity_jvp(proj, x[:40], dirs), jvp[:40], rtol=1e-5, atol=1e-6)
    # a sketch of the output dimension estimates the same norms
    gen = torch.Generator().manual_seed(1)
    sketch = torch.randn(512, 1024, generator=gen) / 512**0.5
    assert _spearman(F.zoo_sensitivity_jvp(seq, x, dirs, sketch=sketch), jvp) >= 0.98


def test_bf16_model_scores_in_float32(model_factory):
    model = copy.deepcopy(model_factory("llava")).to(torch.bfloat16)
    inputs = make_inputs(model, "llava", [(4, 1, 6)])
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    proj_dtype = model.model.multi_modal_projector.linear_1.weight.dtype
    with vtprune.patched(model, "zoo", keep=5, num_directions=8), torch.no_grad():
        model(**inputs)
        session = model._vtprune_session
        assert all(p.dtype == torch.float32 for p in session.capture.float32_projector().parameters())
        assert vtprune.stats(model).visual_tokens_kept == [5]
    assert model.model.multi_modal_projector.linear_1.weight.dtype == proj_dtype == torch.bfloat16


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(num_directions=0), "num_directions must be an int >= 1"),
        (dict(h=0), "h must be a finite number > 0"),
        (dict(estimator="exact"), "estimator must be one of"),
        (dict(estimator="literal", sketch=64), "sketch=64 needs estimator='jvp'"),
        (dict(sketch=0), "sketch must be an int >= 1"),
        (dict(seed=1.5), "seed must be an int"),
    ],
)
def test_bad_zoo_options(options, match, model_factory):
    with pytest.raises(ValueError, match=match):
        vtprune.patch(model_factory("llava"), "zoo", keep=4, **options)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])  # MLP fast path and the generic JVP path
def test_zoo_runs_under_inference_mode(family, model_factory):
    model = model_factory(family)
    inputs = make_inputs(model, family, [(3, 1, 4)])
    with vtprune.patched(model, "zoo", keep=3, num_directions=4):
        with torch.no_grad():
            model(**inputs)
            ref = vtprune.stats(model).kept_indices[0]
        with torch.inference_mode():  # how lmms-eval and most serving code call models
            model(**inputs)
            assert torch.equal(vtprune.stats(model).kept_indices[0], ref)
