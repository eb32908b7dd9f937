"""``fastvid`` and ``flashvid`` on Qwen2-VL / Qwen2.5-VL and LLaVA-NeXT-Video videos.

Independent route: the unpatched model's own video features and, from its eager vision attention (the softmax rows
transformers computes per frame block in the last vision block, recorded on the way), the attention each patch
receives, averaged over heads and queries, then over the 2x2 merge unit, put back in raster order with the model's
own window index (Qwen2.5-VL). The functional call on those gives the kept tokens and merged vectors; the pruned
logits must equal the unpatched text model fed exactly those vectors at the kept tokens' original 3-D positions.
LLaVA-NeXT-Video (each frame one CLIP crop): the same from the last CLIP layer's eager softmax per frame, the CLS key
dropped, each token the 2x2 average of its patches (``avg_pool2d``), at the original 1-D positions."""

import pytest
import tiny
import torch
from tiny import PAD_ID, VEND_ID, VIDEO_ID, VSTART_ID

import vtprune
from vtprune import functional as F

FRAMES, H, W = 4, 4, 6  # 4 temporal patches of 4 x 6 patches: 4 frames of 6 tokens
N = H * W // 4
OPTIONS = {
    "fastvid": dict(ratio=0.5, c=2),
    "flashvid": dict(ratio=0.5, min_segments=2, alpha=0.5),
}


def _video(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(FRAMES * H * W, 3 * 2 * 14 * 14, generator=gen), torch.tensor([[FRAMES, H, W]])


def _row(seed, before=3):
    gen = torch.Generator().manual_seed(50 + seed)
    text = torch.randint(3, 80, (before + 4,), generator=gen).tolist()
    ids = text[:before] + [VSTART_ID] + [VIDEO_ID] * (FRAMES * N) + [VEND_ID] + text[before:]
    types = [0] * (before + 1) + [2] * (FRAMES * N) + [0] * 5
    pix, grid = _video(seed)
    return ids, types, pix, grid


def _inputs(rows):
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    types = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (row, row_types, _, _) in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
        types[i, width - len(row) :] = torch.tensor(row_types)
    return dict(
        input_ids=ids,
        attention_mask=mask,
        mm_token_type_ids=types,
        pixel_values_videos=torch.cat([r[2] for r in rows]),
        video_grid_thw=torch.cat([r[3] for r in rows]),
    )


def _sharp(family):
    """A tiny eager model whose last vision block has 8x larger q / k projections: attention far from uniform, so
    the received attention and FastVID's mean-query softmax rank tokens differently (near uniform, both are linear
    in the mean query and agree)."""
    model = tiny.build(family, attn="eager")
    qkv = model.model.visual.blocks[-1].attn.qkv
    with torch.no_grad():
        qkv.weight[: 2 * qkv.out_features // 3] *= 8
    return model


def _features_and_attention(model, pix, grid, monkeypatch, mean_query=False):
    """The unpatched model's video features ``[T, N, D]`` and each token's score ``[T, N]`` in the last vision block:
    the attention it receives, from the eager softmax rows transformers computes there, or (``mean_query``) FastVID's
    official score from the eager call's post-rotary queries and keys."""
    visual = model.model.visual
    last = visual.blocks[-1].attn
    module = __import__(type(last).__module__, fromlist=["eager_attention_forward"])
    original = module.eager_attention_forward
    rows = []

    def recording(mod, query, key, *args, **kwargs):
        out, weights = original(mod, query, key, *args, **kwargs)
        if mod is last:
            if mean_query:  # official FastVID: the frame's mean query over its units' mean keys, softmax, head mean
                q, k = query[0].float().mean(1), key[0].float().unflatten(1, (-1, 4)).mean(2)  # [H, Dh], [H, U, Dh]
                units = (torch.einsum("hd,hud->hu", q, k) / q.shape[-1] ** 0.5).softmax(-1).mean(0)
                rows.append(units.repeat_interleave(4))
            else:  # [L]: mean over heads and queries of the frame's softmax rows (official FlashVID)
                rows.append(weights[0].mean(dim=(0, 1)))
        return out, weights

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    with torch.no_grad():
        feats = torch.cat(list(model.model.get_video_features(pix, grid).pooler_output))
    monkeypatch.setattr(module, "eager_attention_forward", original)
    received = torch.cat(rows).float().reshape(-1, 4).mean(-1)  # per merge unit, in the tower's order
    if hasattr(visual, "fullatt_block_indexes"):  # Qwen2.5-VL holds units in window order: the model's own index
        try:
            from transformers.vision_utils import get_vision_window_index

            window = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)[0]
        except ImportError:
            window = visual.get_window_index(grid)[0]
        received = received[torch.argsort(window)]
    return feats.reshape(FRAMES, N, -1), received.reshape(FRAMES, N)


def _expected(method, feats, attn):
    o = OPTIONS[method]
    if method == "fastvid":
        return F.fastvid_select(feats, attn / attn.sum(1, keepdim=True), retention_ratio=o["ratio"], c=o["c"])
    return F.flashvid_select(
        feats, attn, F.flashvid_frame_tokens(N, o["ratio"]), alpha=o["alpha"], min_segments=o["min_segments"]
    )


def _route(model, one, kept, tokens):
    """Last logits of the unpatched text model fed the row's text and only the kept video tokens, with ``tokens`` as
    their vectors, at their original 3-D positions."""
    inner = model.model
    ids = one["input_ids"]
    visual = (ids[0] == VIDEO_ID).nonzero().squeeze(1)
    with torch.no_grad():
        embeds = inner.get_input_embeddings()(ids)
        pos, _ = inner.get_rope_index(
            ids,
            video_grid_thw=one["video_grid_thw"],
            attention_mask=one["attention_mask"],
            mm_token_type_ids=one["mm_token_type_ids"],
        )
        keep = one["attention_mask"][0].bool().clone()
        keep[visual] = False
        keep[visual[kept]] = True
        embeds[0, visual[kept]] = tokens.to(embeds.dtype)
        hidden = inner.language_model(
            inputs_embeds=embeds[:, keep], position_ids=pos[..., keep], attention_mask=torch.ones(1, int(keep.sum()))
        ).last_hidden_state
        return model.lm_head(hidden[:, -1]).float()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("method", ["fastvid", "flashvid"])
def test_selection_and_logits_follow_the_official_reading_batched(method, family, monkeypatch):
    model = _sharp(family)
    rows = [_row(0, before=5), _row(1, before=2)]
    batch, singles = _inputs(rows), [_inputs([r]) for r in rows]
    with vtprune.patched(model, method, **OPTIONS[method]), torch.no_grad():
        logits = model(**batch).logits[:, -1].float()
        st = vtprune.stats(model)
        alone = [model(**one).logits[:, -1].float() for one in singles]
    for i, (one, (_, _, pix, grid)) in enumerate(zip(singles, rows)):
        feats, attn = _features_and_attention(model, pix, grid, monkeypatch, mean_query=method == "fastvid")
        kept, tokens = _expected(method, feats, attn)
        assert kept.numel() < FRAMES * N
        assert st.kept_indices[i].tolist() == kept.tolist()
        assert st.visual_tokens_kept[i] == kept.numel()
        torch.testing.assert_close(logits[i], _route(model, one, kept, tokens)[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits[i], alone[i][0], rtol=1e-4, atol=1e-4)  # the row alone


def test_fastvid_attention_received_reads_the_attention_each_token_receives(monkeypatch):
    model = _sharp("qwen2_5_vl")
    one = _inputs([_row(3)])
    with vtprune.patched(model, "fastvid", ratio=0.5, c=2, attention="received"), torch.no_grad():
        logits = model(**one).logits[:, -1].float()
        st = vtprune.stats(model)
    feats, attn = _features_and_attention(model, one["pixel_values_videos"], one["video_grid_thw"], monkeypatch)
    kept, tokens = F.fastvid_select(feats, attn / attn.sum(1, keepdim=True), retention_ratio=0.5, c=2)
    assert st.kept_indices[0].tolist() == kept.tolist()
    torch.testing.assert_close(logits[0], _route(model, one, kept, tokens)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["fastvid", "flashvid"])
def test_generate_with_cache_equals_without(method, model_factory):
    model = model_factory("qwen2_5_vl")
    inputs = _inputs([_row(2)])
    with vtprune.patched(model, method, **OPTIONS[method]), torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        plain = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("method", ["fastvid", "flashvid"])
@pytest.mark.parametrize("family", ["qwen3_vl", "llava_onevision"])
def test_families_without_per_frame_attention_refuse_at_patch(method, family, model_factory):
    model = model_factory(family)
    with pytest.raises(ValueError, match=f"{method} reads each video frame's attention.*{family}.*supported"):
        vtprune.patch(model, method, ratio=0.5)
    assert not vtprune.is_patched(model)


@pytest.mark.parametrize("method", ["fastvid", "flashvid"])
def test_a_keep_below_the_frame_count_is_refused(method, model_factory):
    model = model_factory("qwen2_vl")
    with vtprune.patched(model, method, keep=FRAMES - 1), pytest.raises(ValueError, match=f"keep >= {FRAMES}"):
        model(**_inputs([_row(0)]))


@pytest.mark.parametrize(
    "method,options,match",
    [
        ("fastvid", dict(attention="cls"), "attention must be one of"),
        ("fastvid", dict(c=0), "c must be an int >= 1"),
        ("fastvid", dict(p=1.5), "p must be an int >= 1"),
        ("fastvid", dict(tau=float("nan")), "tau must be a finite float"),
        ("fastvid", dict(tau_ignore=2.0), "tau_ignore must be in \\[-1, 1\\]"),
        ("fastvid", dict(d=-0.1), "d must be in \\[0, 1\\]"),
        ("fastvid", dict(beta=1.5), "beta must be in"),
        ("flashvid", dict(alpha=1.1), "alpha must be in \\[0, 1\\]"),
        ("flashvid", dict(temporal_threshold=-2), "temporal_threshold must be in"),
        ("flashvid", dict(segment_threshold="x"), "segment_threshold must be a finite float"),
        ("flashvid", dict(min_segments=0), "min_segments must be an int >= 1"),
        ("flashvid", dict(selection="div"), "selection must be one of"),
        ("flashvid", dict(expansion=0), "expansion must be a float > 0"),
        ("flashvid", dict(alpha=0, temporal_threshold=1), "keeps no token"),
    ],
)
def test_bad_options_are_refused_at_config(method, options, match):
    from vtprune.registry import get_method

    with pytest.raises((ValueError, TypeError), match=match):
        get_method(method).config_cls(ratio=0.25, **options)


def test_registry_records_video_methods_that_merge():
    from vtprune.registry import get_method

    for name in ("fastvid", "flashvid"):
        spec = get_method(name)
        assert spec.modalities == {"video"} and spec.method_cls.merges
    assert {"fastvid", "flashvid"} <= set(vtprune.list_methods(modality="video"))
    assert not {"fastvid", "flashvid"} & set(vtprune.list_methods(modality="image"))


# -- LLaVA-NeXT-Video: each frame one CLIP crop, pooled 2x2 (average) before the projector -------------------------
LNV_FRAMES = 4


def _lnv_sharp():
    """A tiny eager LLaVA-NeXT-Video whose last CLIP layer has 8x larger q / k projections (attention far from
    uniform, so the two FastVID readings rank tokens differently)."""
    model = tiny.build("llava_next_video", attn="eager")
    attn = model.model.vision_tower.encoder.layers[-1].self_attn
    with torch.no_grad():
        attn.q_proj.weight *= 8
        attn.k_proj.weight *= 8
    return model


def _lnv_row(model, seed, before=3):
    pix, (n,) = tiny.video_inputs(model, (LNV_FRAMES,), seed)
    gen = torch.Generator().manual_seed(70 + seed)
    text = torch.randint(3, 80, (before + 4,), generator=gen).tolist()
    ids = text[:before] + [VIDEO_ID] * n + text[before:]
    return dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), **pix)


def _lnv_batch(rows):
    width = max(r["input_ids"].shape[1] for r in rows)
    ids = torch.full((len(rows), width), PAD_ID)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r["input_ids"].shape[1] :] = r["input_ids"][0]
        mask[i, width - r["input_ids"].shape[1] :] = 1
    pix = torch.cat([r["pixel_values_videos"] for r in rows])
    return dict(input_ids=ids, attention_mask=mask, pixel_values_videos=pix)


def _lnv_features_and_attention(model, pix, monkeypatch, mean_query):
    """The unpatched model's video features ``[T, N, D]`` and each token's score ``[T, N]`` from the last CLIP layer's
    eager attention of each frame crop (CLS first): the attention each patch receives (mean over heads and queries),
    or (``mean_query``) the softmax of the crop's mean query over every key, head-averaged; the CLS key dropped, each
    token the mean of its 2x2 window of patches (``avg_pool2d``, as the model's resampler pools the frame)."""
    last = model.model.vision_tower.encoder.layers[-1].self_attn
    module = __import__(type(last).__module__, fromlist=["eager_attention_forward"])
    original = module.eager_attention_forward
    rows = []

    def recording(mod, query, key, value, mask, scaling, *args, **kwargs):
        out, weights = original(mod, query, key, value, mask, scaling, *args, **kwargs)
        if mod is last:  # query / key [T, H, 1 + P, Dh]
            if mean_query:
                q = query.float().mean(2)  # [T, H, Dh]
                rows.append((torch.einsum("thd,thpd->thp", q, key.float()) * scaling).softmax(-1).mean(1))
            else:
                rows.append(weights.float().mean(dim=(1, 2)))
        return out, weights

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    with torch.no_grad():
        feats = model.model.get_video_features(pix).pooler_output[0]
    monkeypatch.setattr(module, "eager_attention_forward", original)
    patches = rows[-1][:, 1:]  # [T, P]: the CLS key dropped
    side = round(patches.shape[1] ** 0.5)
    pooled = torch.nn.functional.avg_pool2d(patches.reshape(-1, 1, side, side), 2).reshape(LNV_FRAMES, -1)
    return feats.reshape(LNV_FRAMES, pooled.shape[1], -1), pooled


def _lnv_expected(method, feats, attn):
    o = OPTIONS[method]
    if method == "fastvid":
        return F.fastvid_select(feats, attn / attn.sum(1, keepdim=True), retention_ratio=o["ratio"], c=o["c"])
    n = feats.shape[1]
    return F.flashvid_select(
        feats, attn, F.flashvid_frame_tokens(n, o["ratio"]), alpha=o["alpha"], min_segments=o["min_segments"]
    )


def _lnv_route(model, one, kept, tokens):
    """Last logits of the UNPATCHED language model fed the row's text and only the kept video tokens (``tokens`` as
    their vectors) at their original 1-D positions."""
    ids = one["input_ids"]
    visual = (ids[0] == VIDEO_ID).nonzero().squeeze(1)
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[visual] = False
    keep[visual[kept]] = True
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(ids)
        embeds[0, visual[kept]] = tokens.to(embeds.dtype)
        hidden = model.model.language_model(
            inputs_embeds=embeds[:, keep], position_ids=torch.arange(ids.shape[1])[None, keep]
        ).last_hidden_state
        return model.lm_head(hidden[:, -1]).float()


@pytest.mark.parametrize("method", ["fastvid", "flashvid"])
def test_llava_next_video_selection_and_logits_follow_the_official_reading_batched(method, monkeypatch):
    model = _lnv_sharp()
    rows = [_lnv_row(model, 0, before=5), _lnv_row(model, 1, before=2)]
    batch = _lnv_batch(rows)
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with vtprune.patched(model, method, **OPTIONS[method]), torch.no_grad():
        logits = model(**batch).logits[:, -1].float()
        st = vtprune.stats(model)
        alone = [model(**one).logits[:, -1].float() for one in rows]
    for i, one in enumerate(rows):
        feats, attn = _lnv_features_and_attention(model, one["pixel_values_videos"], monkeypatch, method == "fastvid")
        kept, tokens = _lnv_expected(method, feats, attn)
        assert 0 < kept.numel() < feats.shape[0] * feats.shape[1]
        assert st.kept_indices[i].tolist() == kept.tolist()
        assert st.frame_tokens_kept[i] == [[int(((kept // feats.shape[1]) == t).sum()) for t in range(LNV_FRAMES)]]
        torch.testing.assert_close(logits[i], _lnv_route(model, one, kept, tokens)[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits[i], alone[i][0], rtol=1e-4, atol=1e-4)  # the row alone


def test_llava_next_video_fastvid_readings_differ_and_received_follows_its_own(monkeypatch):
    """``attention="received"`` reads the attention each patch receives; on these inputs it keeps other tokens than
    the mean-query reading (so each test above can fail on the wrong signal)."""
    model = _lnv_sharp()
    one = _lnv_row(model, 3)
    with vtprune.patched(model, "fastvid", ratio=0.5, c=2, attention="received"), torch.no_grad():
        logits = model(**one).logits[:, -1].float()
        got = vtprune.stats(model).kept_indices[0]
    feats, attn = _lnv_features_and_attention(model, one["pixel_values_videos"], monkeypatch, mean_query=False)
    kept, tokens = F.fastvid_select(feats, attn / attn.sum(1, keepdim=True), retention_ratio=0.5, c=2)
    assert got.tolist() == kept.tolist()
    torch.testing.assert_close(logits[0], _lnv_route(model, one, kept, tokens)[0], rtol=1e-4, atol=1e-4)
    _, other = _lnv_features_and_attention(model, one["pixel_values_videos"], monkeypatch, mean_query=True)
    mean_query, _ = F.fastvid_select(feats, other / other.sum(1, keepdim=True), retention_ratio=0.5, c=2)
    assert mean_query.tolist() != kept.tolist()


@pytest.mark.parametrize("method", ["fastvid", "flashvid"])
def test_llava_next_video_generate_with_cache_equals_without(method, model_factory):
    model = model_factory("llava_next_video")
    inputs = _lnv_row(model, 2)
    with vtprune.patched(model, method, **OPTIONS[method]), torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        plain = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("method", ["fastvid", "flashvid"])
def test_llava_next_video_with_conv_pooling_is_refused_at_patch(method):
    model = tiny.build("llava_next_video")
    model.config.spatial_pool_mode = "conv"
    with pytest.raises(ValueError, match="spatial_pool_mode='conv'.*'average' or 'max'"):
        vtprune.patch(model, method, ratio=0.5)
    assert not vtprune.is_patched(model)
