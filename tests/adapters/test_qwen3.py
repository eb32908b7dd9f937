"""Qwen3-VL (DeepStack, interleaved M-RoPE, video frames with timestamps) and Qwen3.5 (Gated DeltaNet + full
attention) against independent routes built by hand from the unpatched model's own modules:

* vision entry: the unpatched text model fed the kept tokens' embeddings, their original 3-D positions,
  ``visual_pos_masks`` of the kept tokens and every DeepStack level sliced to them;
* decoder points: a layer-by-layer reference that runs layers < K on the whole prompt, slices the hidden states,
  rotary tables and DeepStack rows to the kept tokens, and runs layers >= K (linear or not) on the rest.
"""

import sys

import pytest
import torch
from conftest import opts
from tiny import (
    IMAGE_ID,
    QWEN3,
    VEND_ID,
    VIDEO_ID,
    VSTART_ID,
    cache_keyword,
    greedy,
    keep_columns,
    last_logits,
    layer_route,
    make_inputs,
    split_rows,
)

import vtprune
from vtprune import compat

DEEPSTACK = ("qwen3_vl", "qwen3_vl_moe")


def _visual_features(inner, inputs, token_id):
    """(main features [V, D], DeepStack levels [[V, D], ...]) of the prompt's images or videos, in prompt order."""
    if token_id == IMAGE_ID:
        out = inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    else:
        out = inner.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    levels = [torch.cat(list(level)) for level in (getattr(out, "deepstack_features", None) or [])]
    return torch.cat(list(out.pooler_output)), levels


def _prompt(model, inputs, token_id=IMAGE_ID):
    """Embeddings with the visual features in place, 3-D positions, the visual mask and DeepStack levels."""
    inner = model.model
    ids = inputs["input_ids"]
    with torch.no_grad():
        embeds = inner.get_input_embeddings()(ids)
        feats, levels = _visual_features(inner, inputs, token_id)
        visual = ids == token_id
        embeds[visual] = feats
        pos, _ = inner.get_rope_index(
            ids,
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
            attention_mask=inputs["attention_mask"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
        )
    return embeds, pos, visual, levels


def _vision_route(model, inputs, kept, token_id=IMAGE_ID):
    """Last logits of the unpatched text model fed only the kept tokens (batch of one)."""
    embeds, pos, visual, levels = _prompt(model, inputs, token_id)
    keep = keep_columns(visual[0], kept)
    extra = {}
    if levels:  # DeepStack: the kept tokens' rows of every level, the mask of the kept visual tokens
        rows = kept.sort().values
        extra = dict(visual_pos_masks=visual[:, keep], deepstack_visual_embeds=[lvl[rows] for lvl in levels])
    with torch.no_grad():
        hidden = model.model.language_model(
            inputs_embeds=embeds[:, keep],
            position_ids=pos[..., keep],
            attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
            **extra,
        ).last_hidden_state
        return model.lm_head(hidden[:, -1]).float()


@pytest.mark.parametrize("family", QWEN3)
@pytest.mark.parametrize("method", ["random", "divprune", "zoo"])
def test_vision_entry_equals_text_model_fed_kept_tokens_and_deepstack(family, method, model_factory):
    model = model_factory(family)
    inputs = make_inputs(model, family, [(6, 2, 5)])
    with vtprune.patched(model, method, **opts(method, keep=5)):
        logits = last_logits(model, inputs)
        st = vtprune.stats(model)
    assert st.visual_tokens_kept == [10]  # two images, 5 each
    torch.testing.assert_close(logits, _vision_route(model, inputs, st.kept_indices[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", QWEN3)
@pytest.mark.parametrize("method,layer", [("fastv", 1), ("fastv", 2), ("dart", 2), ("pact", 3)])
def test_decoder_point_equals_layer_by_layer_reference(family, method, layer, model_factory):
    """Layer 1 on Qwen3-VL: DeepStack level 1 (added after layer 1) must follow the kept tokens. On the tiny
    Qwen3.5, layer 0 is linear attention, so K=1 is refused (see the test below)."""
    if family.startswith("qwen3_5") and layer == 1:
        pytest.skip("K=1 reads linear-attention layer 0 on the tiny Qwen3.5: refused, tested below")
    if method == "pact" and family in DEEPSTACK:
        pytest.skip("merging at a DeepStack layer is checked in test_merging_point_merges_deepstack_levels")
    model = model_factory(family)
    inputs = make_inputs(model, family, [(6, 1, 5)])
    with vtprune.patched(model, method, **opts(method, keep=4, layer=layer)):
        logits = last_logits(model, inputs)
        st = vtprune.stats(model)
    assert st.layer == layer and st.visual_tokens_kept == [4]
    if method == "pact":  # merged vectors: compare the mechanics only where pact keeps tokens unmerged
        return
    torch.testing.assert_close(
        logits, layer_route(model, _prompt(model, inputs), st.kept_indices[0], layer), rtol=1e-4, atol=1e-4
    )


def test_merging_point_merges_deepstack_levels_like_the_main_vectors(model_factory):
    """pact before layer 1 of Qwen3-VL merges clusters; DeepStack level 1 (added after layer 1) must be merged with
    the same clusters: the patched model equals a reference that merges hidden states and level rows by hand."""
    from vtprune import functional as F
    from vtprune.signals import rope_keys

    model = model_factory("qwen3_vl")
    inputs = make_inputs(model, "qwen3_vl", [(6, 1, 5)])
    with vtprune.patched(model, "pact", keep=4, layer=1):
        logits = last_logits(model, inputs)
    embeds, pos, visual, levels = _prompt(model, inputs)
    lm = model.model.language_model
    cols = visual[0].nonzero().squeeze(1)
    with torch.no_grad():
        cos, sin = lm.rotary_emb(embeds, pos)
        h = lm.layers[0](embeds, position_embeddings=(cos, sin), attention_mask=None, position_ids=None).clone()
        h[0, cols] = h[0, cols] + levels[0]
        attn = lm.layers[0].self_attn
        k_out = attn.k_proj(lm.layers[0].input_layernorm(embeds))
        keys = rope_keys(attn, k_out, (cos, sin), sys.modules[type(attn).__module__].apply_rotary_pos_emb)
        keys = keys.transpose(1, 2).reshape(1, keys.shape[2], -1)[0, cols]
        out = F.pact_merge(h[0, cols], keys, k=4)
        merged_level1 = torch.stack([levels[1][out.assignment == c].mean(0) for c in range(4)])
        keep = keep_columns(visual[0], out.kept)
        h[0, cols[out.kept]] = out.merged
        h, cos, sin = h[:, keep], cos[:, keep], sin[:, keep]
        for i in range(1, len(lm.layers)):
            h = lm.layers[i](h, position_embeddings=(cos, sin), attention_mask=None, position_ids=None)
            if i == 1:
                slots = keep.nonzero().squeeze(1)
                at = torch.isin(slots, cols[out.kept]).nonzero().squeeze(1)
                h = h.clone()
                h[0, at] = h[0, at] + merged_level1
        ref = model.lm_head(lm.norm(h)[:, -1]).float()
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_point_after_a_linear_attention_layer_is_refused_naming_layer_types(family, model_factory):
    model = model_factory(family)
    with pytest.raises(ValueError, match=r"linear_attention.*layer_types.*layer=\[2, 3\]"):
        vtprune.patch(model, "fastv", keep=4, layer=1)
    assert not vtprune.is_patched(model)


@pytest.mark.parametrize("family", QWEN3)
@pytest.mark.parametrize("method", ["divprune", "fastv"])
def test_batch_with_cache_and_beam_search_equals_rows_alone(family, method, model_factory):
    model = model_factory(family)
    specs = [(3, 1, 4), (9, 2, 2)]
    batch, singles = split_rows(model, family, specs)
    with vtprune.patched(model, method, **opts(method, ratio=0.4)):
        tokens = greedy(model, batch)
        beams = greedy(model, batch, num_beams=2)
        assert torch.equal(greedy(model, batch, use_cache=False), tokens)
        for i, one in enumerate(singles):
            assert torch.equal(greedy(model, one)[0], tokens[i])
            assert torch.equal(greedy(model, one, num_beams=2)[0], beams[i])


def _video(frames=2, h=4, w=6, timestamps=(11, 12)):
    """A Qwen3-VL video prompt: per temporal patch, a timestamp token, <vision_start>, its tokens, <vision_end>."""
    gen = torch.Generator().manual_seed(1)
    grid = torch.tensor([[frames, h, w]])
    per_frame = h * w // 4
    ids, types = [5, 6], [0, 0]
    for f in range(frames):
        ids += [timestamps[f % len(timestamps)], VSTART_ID] + [VIDEO_ID] * per_frame + [VEND_ID]
        types += [0, 0] + [2] * per_frame + [0]
    ids += [7, 8, 9]
    types += [0, 0, 0]
    return dict(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        pixel_values_videos=torch.randn(int(grid.prod()), 3 * 2 * 14 * 14, generator=gen),
        video_grid_thw=grid,
        mm_token_type_ids=torch.tensor([types]),
    ), frames * per_frame


@pytest.mark.parametrize("family", QWEN3)
@pytest.mark.parametrize("method", ["random", "divprune"])
def test_video_budget_covers_all_frames_and_keeps_timestamps(family, method, model_factory):
    model = model_factory(family)
    inputs, n = _video(frames=2)
    with vtprune.patched(model, method, **opts(method, keep=5)):
        logits = last_logits(model, inputs)
        tokens = greedy(model, inputs)
        st = vtprune.stats(model)
    assert st.visual_tokens_in == [n] and st.visual_tokens_kept == [5]  # one budget for the whole video
    torch.testing.assert_close(logits, _vision_route(model, inputs, st.kept_indices[0], VIDEO_ID), rtol=1e-5, atol=1e-5)
    assert tokens.shape == (1, 4)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_decoder_point_on_a_video_spanning_timestamped_frames(family, model_factory):
    """fastv / dart see a video's frames as one span (the timestamps between frames count as text after it)."""
    model = model_factory(family)
    inputs, n = _video(frames=2)
    for method in ("fastv", "dart"):
        with vtprune.patched(model, method, **opts(method, keep=6, layer=2)):
            tokens = greedy(model, inputs)
            assert torch.equal(greedy(model, inputs, use_cache=False), tokens)
            st = vtprune.stats(model)
        assert st.visual_tokens_in == [n] and st.visual_tokens_kept == [6]


def test_flops_and_state_bytes_of_the_hybrid_decoder(model_factory):
    """Pruning shortens the attention layers' KV cache; the linear layers' state does not depend on the length."""
    from vtprune import flops

    model = model_factory("qwen3_5")
    text = model.config.text_config
    full = flops.kv_cache_bytes(text, 100)
    assert full == 2 * text.num_key_value_heads * text.head_dim * 2 * 100 * 2  # two full-attention layers, fp16
    assert flops.linear_state_bytes(text) > 0 and flops.linear_state_bytes(model_factory("qwen3_vl").config) == 0


@pytest.fixture
def first_k():
    """A vision-entry method that keeps the first k tokens of a unit (so a video's later frames get none)."""
    from dataclasses import dataclass

    from vtprune import registry
    from vtprune.config import PruneConfig
    from vtprune.methods.base import Method

    cfg = dataclass(type("_FirstKConfig", (PruneConfig,), {}))
    cls = type(
        "_FirstK",
        (Method,),
        dict(stage="vision", signals=frozenset(), select=lambda self, image: torch.arange(image.k)),
    )
    registry.register_method("_first_k", cfg)(cls)
    yield "_first_k"
    registry._METHODS.pop("_first_k")


def test_refill_frames_by_hand():
    from vtprune.engine.units import refill_frames

    # frames of 6, 6, 6 tokens; the method kept 4 tokens of frame 0 only
    assert refill_frames(torch.tensor([0, 1, 2, 3]), [6, 6, 6]).tolist() == [0, 1, 9, 15]
    # already one per frame: unchanged; a budget below the frame count leaves frames empty
    assert refill_frames(torch.tensor([0, 7, 12]), [6, 6, 6]).tolist() == [0, 7, 12]
    assert refill_frames(torch.tensor([4]), [6, 6]).tolist() == [4]
    # ties between donors: the later frame gives its highest kept token
    assert refill_frames(torch.tensor([0, 1, 6, 7]), [6, 6, 6]).tolist() == [0, 1, 6, 15]


@pytest.mark.parametrize("empty_frames,expected", [("refill", [0, 1, 2, 3, 9, 15]), ("allow", [0, 1, 2, 3, 4, 5])])
def test_video_frames_keep_a_token_unless_the_config_allows_empty_frames(
    first_k, empty_frames, expected, model_factory
):
    model = model_factory("qwen3_vl")
    inputs, n = _video(frames=3, timestamps=(11, 12, 13))  # 3 frames of 6 tokens
    with vtprune.patched(model, first_k, keep=6, empty_frames=empty_frames):
        logits = last_logits(model, inputs)
        st = vtprune.stats(model)
    assert st.kept_indices[0].tolist() == expected
    torch.testing.assert_close(logits, _vision_route(model, inputs, st.kept_indices[0], VIDEO_ID), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="empty_frames"):
        vtprune.patch(model, "random", keep=4, empty_frames="drop")


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe", "qwen3_5"])
@pytest.mark.parametrize("method", ["random", "divprune"])
def test_second_turn_on_a_pruned_cache_equals_the_conversation_run_without_cache(family, method, model_factory):
    """A second ``generate`` on the pruned cache (new text only) gives what the whole conversation, images included,
    gives when pruned from scratch without a cache (a vision-entry selection does not depend on the text)."""
    model = model_factory(family)
    x = make_inputs(model, family, [(5, 1, 4)])
    kw = dict(do_sample=False, return_dict_in_generate=True)
    with vtprune.patched(model, method, **opts(method, keep=5)):
        o1 = model.generate(**x, max_new_tokens=4, **kw)
        ids2 = torch.cat([o1.sequences, torch.tensor([[11, 12, 13]])], 1)
        cache = compat.output_cache(o1)
        o2 = model.generate(
            input_ids=ids2,
            attention_mask=torch.ones_like(ids2),
            max_new_tokens=4,
            **{cache_keyword(model): cache},
            **kw,
        )
        types = torch.cat(
            [x["mm_token_type_ids"], torch.zeros(1, ids2.shape[1] - x["input_ids"].shape[1], dtype=torch.long)], 1
        )
        ref = model.generate(
            **{**x, "input_ids": ids2, "attention_mask": torch.ones_like(ids2), "mm_token_type_ids": types},
            max_new_tokens=4,
            use_cache=False,
            **kw,
        )
    assert torch.equal(o2.sequences, ref.sequences)


def test_frame_sizes_count_present_tokens_of_each_original_run():
    from vtprune.engine.units import Unit, frame_sizes

    image = Unit(row=0, positions=torch.arange(3, 9), present=torch.tensor([0, 2, 5]))  # one run, gaps from pruning
    assert frame_sizes(image) is None
    video = Unit(row=0, positions=torch.tensor([2, 3, 4, 7, 8, 9, 12, 13]), present=torch.tensor([0, 2, 6, 7]))
    assert frame_sizes(video) == [2, 0, 2]


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_vl"])
@pytest.mark.parametrize(
    "method,options", [("pdrop", dict(layers=[1, 2], ratios=[0.5, 0.25])), ("sparsevlm", dict(layers=[1, 2], keep=4))]
)
def test_multi_point_methods_at_full_attention_layers(family, method, options, model_factory):
    """PyramidDrop reads layer K's own attention, SparseVLM layer K-1's: on the tiny Qwen3.5 their default points
    (pdrop's last at layer 3, sparsevlm's first at K-1 = 0) read linear attention and are refused; at points whose
    signal layers are full attention they run, and batched rows equal rows alone."""
    model = model_factory(family)
    if family == "qwen3_5":
        with pytest.raises(ValueError, match="linear_attention"):
            vtprune.patch(model, method, **opts(method, keep=4)) if method == "sparsevlm" else vtprune.patch(
                model, method, **opts(method, ratio=0.5)
            )
    batch, singles = split_rows(model, family, [(3, 1, 4), (9, 2, 2)])
    with vtprune.patched(model, method, **opts(method, **options)):
        tokens = greedy(model, batch)
        points = [k + (method == "sparsevlm") for k in options["layers"]]  # sparsevlm prunes after layer k
        assert [s.layer for s in vtprune.stats(model).stages] == points
        for i, one in enumerate(singles):
            assert torch.equal(greedy(model, one)[0], tokens[i])


def test_attention_rows_of_a_video_spanning_frames_follow_the_span_view(model_factory, monkeypatch):
    """SparseVLM's rater attention on a Qwen3-VL video (frames separated by timestamps) comes in the same contiguous
    view as its hidden states: the span ``image_start .. +n`` holds the video tokens' columns, checked against the
    eager model's attention weights."""
    from vtprune.methods.sparsevlm import SparseVLM

    model = model_factory("qwen3_vl", attn="eager")
    inputs, n = _video(frames=2)
    seen = {}
    original = SparseVLM.select

    def spy(self, image):
        s = image.image_start
        seen["rows"] = image.attention_rows(image.text_columns)[..., s : s + n].float()
        seen["text"] = image.text_columns
        return original(self, image)

    monkeypatch.setattr(SparseVLM, "select", spy)
    with vtprune.patched(model, "sparsevlm", layers=[1], keep=4), torch.no_grad():
        model(**inputs)
    with torch.no_grad():
        ref = model(**inputs, output_attentions=True).attentions[1][0]  # layer 1: [H, S, S]
    video = (inputs["input_ids"][0] == VIDEO_ID).nonzero().squeeze(1)
    torch.testing.assert_close(seen["rows"], ref[:, seen["text"]][:, :, video].float(), rtol=1e-5, atol=1e-6)
