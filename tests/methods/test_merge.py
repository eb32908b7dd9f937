"""Merging methods (``Selection`` with replacement vectors), at both stages, against independent routes.

Two toy merging methods are registered for the duration of these tests only: one replaces the kept projected
features (vision stage), one the kept hidden states entering layer K (llm stage). The routes they are compared
with never touch the engine: the unpatched model is fed the kept (and replaced) tokens directly.
"""

from dataclasses import dataclass

import pytest
import torch
from tiny import make_inputs

import vtprune
from vtprune import registry
from vtprune.config import PruneConfig
from vtprune.methods.base import ImageInputs, Method, Selection


def _toy_kept(n: int, k: int) -> torch.Tensor:
    return torch.linspace(0, n - 1, k).round().long().unique()


@dataclass
class _ToyConfig(PruneConfig):
    layer: int = 2


def _register(name, stage, select):
    cls = type(
        name,
        (Method,),
        dict(
            stage=stage,
            signals=frozenset({"features"} if stage == "vision" else {"hidden"}),
            select=select,
            layer=lambda self, n: self.config.layer if stage == "llm" else None,
        ),
    )
    config = type(f"{name}Config", (_ToyConfig,), {})
    config = dataclass(config)
    registry.register_method(name, config)(cls)
    return name


def _vision_select(self, image: ImageInputs):
    kept = _toy_kept(image.n, image.k)
    return Selection(kept, image.features[kept] + image.features.mean(0))


def _llm_select(self, image: ImageInputs):
    kept = _toy_kept(image.n, image.k)
    rows = image.hidden[image.image_start : image.image_start + image.n]
    return Selection(kept, 0.5 * rows[kept] + 0.5 * rows.mean(0))


@pytest.fixture(scope="module")
def toys():
    names = [_register("_toy_merge_vision", "vision", _vision_select), _register("_toy_merge_llm", "llm", _llm_select)]
    yield names
    for name in names:
        registry._METHODS.pop(name)


def _image_positions(model, inputs):
    return (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)


def _keep_mask(inputs, visual, kept):
    keep = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)
    keep[visual] = False
    keep[visual[kept]] = True
    return keep


def test_vision_stage_merged_features_reach_the_lm(toys, model_factory):
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(5, 1, 4)])
    with vtprune.patched(model, toys[0], keep=5), torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        assert vtprune.stats(model).visual_tokens_kept == [5]
    inner = model.model
    visual = _image_positions(model, inputs)
    kept = _toy_kept(visual.numel(), 5)
    with torch.no_grad():
        feats = inner.get_image_features(inputs["pixel_values"]).pooler_output[0]
        embeds = inner.get_input_embeddings()(inputs["input_ids"])
        embeds[0, visual] = feats
        embeds[0, visual[kept]] = feats[kept] + feats.mean(0)
        keep = _keep_mask(inputs, visual, kept)
        pos = torch.arange(keep.numel())[keep][None]
        ref = model(inputs_embeds=embeds[:, keep], position_ids=pos, attention_mask=torch.ones_like(pos)).logits[:, -1]
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_llm_stage_merged_hidden_states_enter_layer_k(toys, model_factory):
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(5, 1, 4)])
    layer = 2
    with vtprune.patched(model, toys[1], keep=6, layer=layer), torch.no_grad():
        logits = model(**inputs).logits[:, -1]
    lm = model.model.language_model
    visual = _image_positions(model, inputs)
    kept = _toy_kept(visual.numel(), 6)
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[layer].clone()  # input of layer K
        rows = hidden[0, visual]
        hidden[0, visual[kept]] = 0.5 * rows[kept] + 0.5 * rows.mean(0)
        keep = _keep_mask(inputs, visual, kept)
        h = hidden[:, keep]
        pos = torch.arange(keep.numel())[keep][None]
        rope = lm.rotary_emb(h, pos)
        for decoder_layer in lm.layers[layer:]:
            h = decoder_layer(h, attention_mask=None, position_embeddings=rope, position_ids=None)
            h = h[0] if isinstance(h, tuple) else h
        ref = model.lm_head(lm.norm(h))[:, -1]
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_merged_vectors_of_the_wrong_shape_raise(toys, model_factory):
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(5, 1, 4)])

    def bad(self, image):
        kept = _toy_kept(image.n, image.k)
        return Selection(kept, image.features[kept][:, :3])

    registry.get_method(toys[0]).method_cls.select = bad
    try:
        with vtprune.patched(model, toys[0], keep=5), pytest.raises(RuntimeError, match="merged vectors of shape"):
            model(**inputs)
    finally:
        registry.get_method(toys[0]).method_cls.select = _vision_select
