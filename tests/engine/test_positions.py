"""positions="compact": kept tokens renumbered 0, 1, ... as if the dropped ones had never been in the prompt."""

import pytest
import torch
from conftest import opts
from tiny import make_inputs, split_rows

import vtprune


def _keep_mask(model, inputs, kept):
    ids = inputs["input_ids"][0]
    visual = (ids == model.config.image_token_id).nonzero().squeeze(1)
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    keep[visual] = False
    keep[visual[kept]] = True
    return keep, visual


@pytest.mark.parametrize("method", ["random", "divprune"])
def test_vision_stage_compact_equals_a_prompt_without_the_dropped_tokens(method, model_factory):
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(5, 1, 4)])
    with vtprune.patched(model, method, **opts(method, keep=5, positions="compact")), torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        kept = vtprune.stats(model).kept_indices[0]
        run = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
        out = model.generate(**inputs, **run)
    keep, visual = _keep_mask(model, inputs, kept)
    inner = model.model
    with torch.no_grad():
        embeds = inner.get_input_embeddings()(inputs["input_ids"])
        embeds[0, visual] = inner.get_image_features(inputs["pixel_values"]).pooler_output[0]
        route = dict(inputs_embeds=embeds[:, keep], attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long))
        ref = model(**route, position_ids=torch.arange(int(keep.sum()))[None]).logits[:, -1]
        ref_out = model.generate(**route, **run)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.sequences[:, -5:], ref_out.sequences[:, -5:])
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref_out.logits), rtol=1e-4, atol=1e-5)


def test_llm_stage_compact_renumbers_layers_from_k(model_factory):
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(5, 1, 4)])
    layer = 2
    with vtprune.patched(model, "fastv", keep=4, layer=layer, positions="compact"), torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        kept = vtprune.stats(model).kept_indices[0]
    # decode steps continue the compact numbering: with a selection that later tokens cannot change (PACT clusters
    # the image tokens' own keys), generating with the KV cache equals re-running the whole prompt every step
    with vtprune.patched(model, "pact", keep=4, layer=layer, positions="compact"), torch.no_grad():
        run = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        cached = model.generate(**inputs, use_cache=True, **run)
        uncached = model.generate(**inputs, use_cache=False, **run)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), rtol=1e-4, atol=1e-5)
    keep, _ = _keep_mask(model, inputs, kept)
    lm = model.model.language_model
    with torch.no_grad():
        h = model(**inputs, output_hidden_states=True).hidden_states[layer][:, keep]
        rope = lm.rotary_emb(h, torch.arange(h.shape[1])[None])
        for decoder_layer in lm.layers[layer:]:
            h = decoder_layer(h, attention_mask=None, position_embeddings=rope, position_ids=None)
            h = h[0] if isinstance(h, tuple) else h
        ref = model.lm_head(lm.norm(h))[:, -1]
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["random", "fastv"])
def test_compact_batch_equals_rows_alone(method, model_factory):
    model = model_factory("llava_next")
    batch, singles = split_rows(model, "llava_next", [(3, 1, 4), (2, 1, 9)])
    with vtprune.patched(model, method, **opts(method, ratio=0.3, positions="compact")), torch.no_grad():
        tokens = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, -4:]
        for i, one in enumerate(singles):
            assert torch.equal(model.generate(**one, max_new_tokens=4, do_sample=False)[0, -4:], tokens[i])


def test_compact_is_refused_where_it_has_no_meaning(model_factory):
    with pytest.raises(ValueError, match="3-D M-RoPE"):
        vtprune.patch(model_factory("qwen2_vl"), "random", keep=3, positions="compact")
    with pytest.raises(ValueError, match="late drop"):
        vtprune.patch(model_factory("llava"), "todre", keep=3, positions="compact")
    with pytest.raises(ValueError, match="positions must be one of"):
        vtprune.patch(model_factory("llava"), "random", keep=3, positions="packed")
    assert vtprune.RandomConfig(keep=3, positions="compact").to_dict()["positions"] == "compact"


def test_beam_search_on_a_pruned_model_equals_the_kept_token_prompt(model_factory):
    # beam search expands and reorders the batch and its KV cache; every beam of a sample shares one layout
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(5, 1, 4)])
    with vtprune.patched(model, "divprune", keep=5), torch.no_grad():
        model(**inputs)
        kept = vtprune.stats(model).kept_indices[0]
        beams = model.generate(**inputs, max_new_tokens=4, num_beams=3, do_sample=False)[:, -4:]
    keep, visual = _keep_mask(model, inputs, kept)
    inner = model.model
    with torch.no_grad():
        embeds = inner.get_input_embeddings()(inputs["input_ids"])
        embeds[0, visual] = inner.get_image_features(inputs["pixel_values"]).pooler_output[0]
        pos = torch.arange(keep.numel())[keep][None]
        ref = model.generate(
            inputs_embeds=embeds[:, keep],
            position_ids=pos,
            attention_mask=torch.ones_like(pos),
            max_new_tokens=4,
            num_beams=3,
            do_sample=False,
        )[:, -4:]
    assert torch.equal(beams, ref)
