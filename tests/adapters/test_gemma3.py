"""Gemma 3: what the method x family tests do not reach (they run every method on the tiny Gemma 3 too).

Independent routes: the unpatched model fed only the kept tokens (their ``token_type_ids``: one bidirectional block
per image's kept tokens), eager attention weights, the projector's pooling done by hand.
"""

import pytest
import torch
from tiny import make_inputs

import vtprune


def _kept_prompt(model, inputs, kept):
    """The unpatched model's inputs for the prompt of the kept tokens (row 0): kept ids, their token types and
    original positions, and a ``get_image_features`` that returns the kept tokens' features."""
    ids = inputs["input_ids"][0]
    visual = (ids == model.config.image_token_id).nonzero().squeeze(1)
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    keep[visual] = False
    keep[visual[kept]] = True
    route = dict(
        input_ids=ids[keep][None],
        attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
        token_type_ids=inputs["token_type_ids"][0, keep][None],
        position_ids=torch.arange(ids.numel())[keep][None],
        pixel_values=inputs["pixel_values"],
    )
    original = model.model.get_image_features

    def kept_features(pixel_values, **kwargs):
        out = original(pixel_values, **kwargs)
        out.pooler_output = out.pooler_output[:, kept]
        return out

    return route, kept_features


def test_beam_search_equals_the_kept_token_prompt(model_factory, monkeypatch):
    model = model_factory("gemma3")
    inputs = make_inputs(model, "gemma3", [(5, 1, 4)])
    with vtprune.patched(model, "divprune", keep=5), torch.no_grad():
        model(**inputs)
        kept = vtprune.stats(model).kept_indices[0]
        beams = model.generate(**inputs, max_new_tokens=4, num_beams=3, do_sample=False)[:, -4:]
    route, kept_features = _kept_prompt(model, inputs, kept)
    monkeypatch.setattr(model.model, "get_image_features", kept_features)  # the unpatched model, kept features
    with torch.no_grad():
        ref = model.generate(**route, max_new_tokens=4, num_beams=3, do_sample=False)[:, -4:]
    assert torch.equal(beams, ref)


def test_patch_scores_pool_as_the_projector_pools(model_factory):
    model = model_factory("gemma3")
    adapter = vtprune.adapters.get_adapter(model)
    scores = torch.randn(1, 64, dtype=torch.float64)
    by_hand = scores.view(4, 2, 4, 2).mean((1, 3)).reshape(-1)  # 8 x 8 patches, 2 x 2 windows, row-major tokens
    torch.testing.assert_close(adapter.pack_crop_scores(scores, {}, 0), by_hand, rtol=0, atol=1e-12)
    assert torch.equal(adapter.pack_crop_scores(scores[:, :16], {}, 0), scores[0, :16])  # already per token
    with pytest.raises(ValueError, match=r"\[1, 64\] \(patches\) or \[1, 16\]"):
        adapter.pack_crop_scores(scores[:, :10], {}, 0)


@pytest.mark.parametrize("layer", [2, 3])  # reads layer 1 (global) / layer 2 (sliding: only its window is seen)
def test_last_token_attention_equals_eager_attention_weights(layer, model_factory):
    model = model_factory("gemma3", attn="eager")
    inputs = make_inputs(model, "gemma3", [(3, 1, 4), (8, 1, 2)])
    seen = []
    with vtprune.patched(model, "fastv", keep=4, layer=layer), torch.no_grad():
        method = getattr(model, vtprune.api._ATTR).method
        select = method.select
        method.select = lambda image: seen.append(image.text_attention) or select(image)
        model(**inputs)
    with torch.no_grad():
        eager = model(**inputs, output_attentions=True).attentions[layer - 1]  # [B, H, S, S]
    assert len(seen) == 2
    for row, attention in enumerate(seen):
        torch.testing.assert_close(attention, eager[row, :, -1].float(), rtol=1e-5, atol=1e-6)
    if layer == 3:  # the window (8 slots) hides the image from the last token at the sliding layer
        assert float(seen[0][:, :-8].abs().sum()) == 0.0


def test_received_equals_eager_attention_pooled_by_hand(model_factory):
    """importance="received" (the default on Gemma's CLS-free SigLIP): the attention each patch receives at the layers
    the method reads, against an eager copy of the tower, then each token's 2 x 2 window averaged by hand."""
    import copy

    from vtprune import functional as F

    model = model_factory("gemma3")
    inputs = make_inputs(model, "gemma3", [(3, 2, 4)])
    with vtprune.patched(model, "cls", keep=5, start_layer=1), torch.no_grad():  # vision layers [1, 2] of 4
        session = getattr(model, vtprune.api._ATTR)
        out = model.model.get_image_features(inputs["pixel_values"])
        infos = [session.capture.info(f) for f in out.pooler_output]
        model(**inputs)
        kept = vtprune.stats(model).kept_indices[0]
    ref = copy.deepcopy(model)
    ref.config.vision_config._attn_implementation = "eager"
    with torch.no_grad():
        attn = ref.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    expected = torch.stack([attn[i].float().mean(dim=(1, 2)) for i in (1, 2)], dim=1)  # [images, L, 64 patches]
    for i, info in enumerate(infos):
        assert info.cls_attention is None and info.received.shape == (1, 2, 64)
        torch.testing.assert_close(info.received[0], expected[i], rtol=1e-5, atol=1e-7)
        tokens = expected[i].sum(0).view(4, 2, 4, 2).mean((1, 3)).reshape(-1)  # 2 x 2 windows of the 8 x 8 grid
        torch.testing.assert_close(info.pack(info.received.sum(1)), tokens, rtol=1e-5, atol=1e-7)
        if i == 0:
            assert kept[:5].tolist() == F.topk_indices(tokens, 5).tolist()
    windows = infos[0].token_patches(1, 64)  # token 0: patches 0, 1, 8, 9; token 1: 2, 3, 10, 11
    assert windows[:2].tolist() == [[0, 1, 8, 9], [2, 3, 10, 11]] and windows.shape == (16, 4)


def test_visionzip_contextual_tokens_are_the_projector_of_merged_windows(model_factory):
    """visionzip on Gemma 3: a contextual token is the projector applied to the weighted mean of the merged tokens'
    patch states (window by window): checked by feeding those states, tiled over the patch grid, through the model's
    own projector module (its average pooling, norm and projection)."""
    model = model_factory("gemma3")
    inputs = make_inputs(model, "gemma3", [(3, 1, 4)])
    seen = []
    from vtprune.methods.visionzip import VisionZip

    original = VisionZip.select

    def spy(self, image):
        out = original(self, image)
        seen.append((image, out))
        return out

    VisionZip.select = spy
    try:
        with vtprune.patched(model, "visionzip", keep=7), torch.no_grad():
            model(**inputs)
    finally:
        VisionZip.select = original
    image, sel = seen[0]
    states = image.projector_inputs[0].reshape(16, 4, -1)  # [tokens, 2 x 2 patches, D]
    proj = model.model.multi_modal_projector
    context = (sel.weights != 0).sum(1) > 1
    assert bool(context.any())
    with torch.no_grad():
        for row in context.nonzero().squeeze(1).tolist():
            mixed = (sel.weights[row][:, None, None] * states).sum(0)  # [4, D]: the window's merged patches
            grid = mixed.view(2, 2, -1).repeat(4, 4, 1)  # an 8 x 8 tower output whose every window is this one
            expected = proj(grid.reshape(1, 64, -1))[0, 0]
            torch.testing.assert_close(sel.merged[row].float(), expected.float(), rtol=1e-5, atol=1e-6)


def test_llm_stage_compact_renumbers_each_layer_type_from_k(model_factory):
    """positions="compact" at a decoder point: layers >= K run the kept tokens numbered 0, 1, ... with each layer
    type's own rotary tables (local / global bases) and masks (the kept image tokens one block; the window over the
    kept sequence), checked layer by layer on the unpatched decoder layers."""
    model = model_factory("gemma3")
    inputs = make_inputs(model, "gemma3", [(5, 1, 4)])
    layer = 2
    with vtprune.patched(model, "fastv", keep=4, layer=layer, positions="compact"), torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        kept = vtprune.stats(model).kept_indices[0]
    ids = inputs["input_ids"][0]
    visual = (ids == model.config.image_token_id).nonzero().squeeze(1)
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    keep[visual] = False
    keep[visual[kept]] = True
    lm, text = model.model.language_model, model.config.text_config
    image = (inputs["token_type_ids"][0] == 1)[keep]
    n = int(keep.sum())
    full = torch.ones(n, n, dtype=torch.bool).tril() | (image[:, None] & image[None, :])  # one image: one block
    near = (torch.arange(n)[:, None] - torch.arange(n)[None, :]) < text.sliding_window
    masks = {"full_attention": full[None, None], "sliding_attention": (full & near)[None, None]}
    with torch.no_grad():
        h = model(**inputs, output_hidden_states=True).hidden_states[layer][:, keep]
        pos = torch.arange(n)[None]
        for i, decoder_layer in enumerate(lm.layers[layer:], start=layer):
            kind = text.layer_types[i]
            h = decoder_layer(
                h, attention_mask=masks[kind], position_embeddings=lm.rotary_emb(h, pos, kind), position_ids=None
            )
            h = h[0] if isinstance(h, tuple) else h
        ref = model.lm_head(lm.norm(h))[:, -1]
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_token_type_ids_of_another_shape_are_refused(model_factory):
    model = model_factory("gemma3")
    inputs = make_inputs(model, "gemma3", [(5, 1, 4)])
    bad = dict(inputs, token_type_ids=inputs["token_type_ids"][:, 1:])
    with vtprune.patched(model, "random", keep=5), torch.no_grad():
        with pytest.raises(ValueError, match=r"token_type_ids has shape \(1, 26\); expected the shape of input_ids"):
            model(**bad)
        model(**inputs)  # still usable
        assert vtprune.stats(model).visual_tokens_kept == [5]
