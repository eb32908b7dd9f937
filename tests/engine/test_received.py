"""importance="received": the attention each patch receives (mean over heads and queries of its block), recomputed
from the tower's q/k while it keeps its fast attention, checked against the attention weights of an EAGER copy of
the tower, pooled to LLM tokens by hand (Qwen: 2x2 merge units, Qwen2.5-VL's window order undone)."""

import copy
import sys

import pytest
import torch
from conftest import opts
from tiny import make_inputs
from transformers import AttentionInterface

import vtprune
from vtprune import functional as F
from vtprune.adapters.base import ModelAdapter

QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
_RECORD = "vtprune_test_recording_eager"
_SEEN: list = []  # (module, attention weights [1, H, T, T], keys [1, H, T, Dh]) per block, in call order


def _recording_eager(module, query, key, value, attention_mask, **kwargs):
    eager = sys.modules[type(module).__module__].eager_attention_forward
    out, weights = eager(module, query, key, value, attention_mask, **kwargs)
    _SEEN.append((module, weights.detach(), key.detach()))
    return out, weights


AttentionInterface.register(_RECORD, _recording_eager)


def _eager_qwen_blocks(model, inputs, layer):
    """Per block of vision layer ``layer`` of an eager deep copy: (weights [H, T, T], keys [H, T, Dh])."""
    ref = copy.deepcopy(model)
    ref.config.vision_config._attn_implementation = _RECORD
    _SEEN.clear()
    with torch.no_grad():
        if "pixel_values_videos" in inputs:
            ref.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        else:
            ref.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    target = ref.model.visual.blocks[layer].attn
    return [(w[0], k[0]) for m, w, k in _SEEN if m is target]


def _unwindow(values, model, grid):
    """Undo Qwen2.5-VL's window order (merge units of 4 patches), by the model's own window index."""
    visual = model.model.visual
    if not hasattr(visual, "fullatt_block_indexes"):
        return values
    from transformers.vision_utils import get_vision_window_index

    window, _ = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)
    units = values.reshape(-1, 4, *values.shape[1:])
    return units[torch.argsort(window)].reshape(values.shape)


def _captured(model, inputs, method, **options):
    """What the capture recorded per image of one feature call, and the per-image kept indices of a forward."""
    with vtprune.patched(model, method, **opts(method, **options)), torch.no_grad():
        session = getattr(model, vtprune.api._ATTR)
        kw = {k: inputs[k] for k in ("image_sizes", "image_grid_thw") if k in inputs}
        out = model.model.get_image_features(inputs["pixel_values"], **kw)
        infos = [session.capture.info(f) for f in out.pooler_output]
        model(**inputs)
        kept = vtprune.stats(model).kept_indices
    return infos, kept


@pytest.mark.parametrize("family", QWEN)
def test_qwen_received_equals_eager_attention_pooled_by_hand(family, model_factory):
    model = model_factory(family)
    inputs = make_inputs(model, family, [(3, 2, 4)])  # images of 8x8 and 6x10 patches (Qwen2.5-VL: 4 + 6 windows)
    infos, kept = _captured(model, inputs, "cls", keep=5)  # default importance on Qwen: received; layers [0]
    blocks = _eager_qwen_blocks(model, inputs, 0)
    grid = inputs["image_grid_thw"]
    expected_blocks = 4 + 6 if family == "qwen2_5_vl" else 2  # windows of 2x2 merge units / one block per image
    assert len(blocks) == expected_blocks
    received = torch.cat([w.float().mean(dim=(0, 1)) for w, _ in blocks])  # mean over heads, then queries
    keys = torch.cat([k.float().mean(0) for _, k in blocks])  # head-mean keys [N, Dh]
    received, keys = _unwindow(received, model, grid), _unwindow(keys, model, grid)
    sizes = grid.prod(-1).tolist()
    for info, patches, _keys in zip(infos, received.split(sizes), keys.split(sizes)):
        assert info.cls_attention is None and info.received.shape == (1, 1, patches.numel())
        torch.testing.assert_close(info.received[0, 0], patches, rtol=1e-5, atol=1e-7)
        tokens = patches.reshape(-1, 4).mean(1)  # a token = 4 consecutive patches (its 2x2 merge unit)
        torch.testing.assert_close(info.pack(info.received.sum(1)), tokens, rtol=1e-5, atol=1e-7)
        assert info.token_patches(1, patches.numel()).tolist() == torch.arange(patches.numel()).view(-1, 4).tolist()
    first = received.split(sizes)[0].reshape(-1, 4).mean(1)
    assert kept[0][:5].tolist() == F.topk_indices(first, 5).tolist()  # cls keeps the top-5 of the first image


def test_qwen_video_received_per_frame_window(model_factory):
    """A Qwen2.5-VL video of 2 temporal patches x 4 x 6: its windowed layer attends within 2 windows per frame."""
    from test_video import _video_inputs

    family = "qwen2_5_vl"
    model = model_factory(family)
    inputs, n = _video_inputs()
    with vtprune.patched(model, "cls", keep=5), torch.no_grad():
        session = getattr(model, vtprune.api._ATTR)
        out = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        info = session.capture.info(out.pooler_output[0])
        model(**inputs)
        kept = vtprune.stats(model).kept_indices[0]
    blocks = _eager_qwen_blocks(model, inputs, 0)
    assert [w.shape[-1] for w, _ in blocks] == [16, 8, 16, 8]
    received = _unwindow(torch.cat([w.float().mean(dim=(0, 1)) for w, _ in blocks]), model, inputs["video_grid_thw"])
    torch.testing.assert_close(info.received[0, 0], received, rtol=1e-5, atol=1e-7)
    tokens = received.reshape(-1, 4).mean(1)
    assert tokens.numel() == n and kept.tolist() == F.topk_indices(tokens, 5).tolist()


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_clip_received_equals_eager_attention(family, model_factory):
    model = model_factory(family)
    inputs = make_inputs(model, family, [(3, 2, 4)])
    infos, _ = _captured(model, inputs, "cls", keep=5, start_layer=1, importance="received")  # layers [1, 2]
    crops = [info.crops for info in infos]
    assert crops == ([1, 1] if family == "llava" else [3, 5])  # LLaVA-NeXT: base + 2 / 4 crops of 56 x 56
    ref = copy.deepcopy(model)
    ref.config.vision_config._attn_implementation = "eager"
    pix = inputs["pixel_values"]
    if pix.ndim == 5:  # the processor pads every image to 5 crops; the model drops the padding ones
        pix = torch.cat([pix[i, :c] for i, c in enumerate(crops)])
    with torch.no_grad():
        attn = ref.model.vision_tower(pix, output_attentions=True).attentions
    expected = torch.stack([attn[i].float().mean(dim=(1, 2))[:, 1:] for i in (1, 2)], dim=1)  # [crops, L, P]
    torch.testing.assert_close(torch.cat([info.received for info in infos]), expected, rtol=1e-5, atol=1e-7)
    assert all(info.cls_attention is None for info in infos)


def test_received_attention_against_a_dense_reading():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(11, 4, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(11, 2, 8, generator=gen, dtype=torch.float64)  # grouped keys: heads 0, 1 -> 0; 2, 3 -> 1
    cu = torch.tensor([0, 4, 4, 11])  # an empty block in the middle
    out = F.received_attention(q, k, cu, 0.4)
    assert out.dtype == torch.float64
    expected = torch.zeros(11, dtype=torch.float64)
    for a, b in ((0, 4), (4, 11)):
        for h in range(4):
            w = torch.softmax(q[a:b, h] @ k[a:b, h // 2].T * 0.4, dim=-1)  # [queries, keys]
            expected[a:b] += w.mean(0) / 4
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out[:4].sum(), torch.tensor(1.0, dtype=torch.float64))
    chunked = F.received_attention(q.float(), k.float(), cu, 0.4, block_elements=1)  # one query row at a time
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, expected.float())


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda q, k, cu: F.received_attention(q, torch.randn(6, 3, 8), cu, 0.5), ValueError, "multiple of Hkv"),
        (lambda q, k, cu: F.received_attention(q, k[:5], cu, 0.5), ValueError, "k must be"),
        (lambda q, k, cu: F.received_attention(q, k, torch.tensor([0, 3]), 0.5), ValueError, "ascend from 0 to N=6"),
        (lambda q, k, cu: F.received_attention(q, k, torch.tensor([0, 4, 2, 6]), 0.5), ValueError, "ascend"),
        (lambda q, k, cu: F.received_attention(q, k, cu.float(), 0.5), TypeError, "integer"),
        (lambda q, k, cu: F.received_attention(q, k, cu, 0.0), ValueError, "scaling"),
        (lambda q, k, cu: F.received_attention(q, k, cu, 0.5, block_elements=0), ValueError, "block_elements"),
        (lambda q, k, cu: F.received_attention(q[0], k, cu, 0.5), ValueError, "q must be 3-D"),
    ],
)
def test_received_attention_bad_inputs(call, exc, match):
    q, k, cu = torch.randn(6, 4, 8), torch.randn(6, 2, 8), torch.tensor([0, 2, 6])
    with pytest.raises(exc, match=match):
        call(q, k, cu)


@pytest.mark.parametrize("method", ["cls", "todre", "visionzip", "vispruner"])
def test_importance_option_is_checked(method, model_factory):
    with pytest.raises(ValueError, match=r"importance must be one of \('cls', 'received'\)"):
        vtprune.patch(model_factory("llava"), method, keep=4, importance="attention")
    with pytest.raises(ValueError, match="importance must be one of"):
        vtprune.patch(model_factory("llava"), method, keep=4, importance=1)
    model = model_factory("qwen2_vl")
    with pytest.raises(ValueError, match="importance='cls' needs the vision tower's CLS attention.*no CLS token"):
        vtprune.patch(model, method, **opts(method, keep=4, importance="cls"))
    assert not vtprune.is_patched(model)


def test_an_adapter_without_vision_qk_names_its_family(model_factory):
    model = model_factory("qwen2_vl")
    with pytest.raises(ValueError, match="'qwen2_vl'.*vision_qk is not implemented"):
        ModelAdapter(model).vision_qk(None, (), {})


def test_cls_default_on_clip_is_unchanged_by_the_option(model_factory):
    """LLaVA defaults to importance="cls"; "received" reads another signal (here: another kept set)."""
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(3, 1, 4)])
    infos, kept = _captured(model, inputs, "cls", keep=5)
    _, kept_cls = _captured(model, inputs, "cls", keep=5, importance="cls")
    _, kept_received = _captured(model, inputs, "cls", keep=5, importance="received")
    assert infos[0].received is None and infos[0].cls_attention is not None
    assert kept[0].tolist() == kept_cls[0].tolist()
    assert kept_received[0].tolist() != kept_cls[0].tolist()


def _hand_visionzip(scores, keys, k):
    dominant, contextual = k - round(k * 10 / 64), round(k * 10 / 64)
    return F.visionzip_select(scores, keys, dominant, contextual)


def test_visionzip_on_qwen_reads_merge_units(model_factory):
    """Qwen2.5-VL: a token's score is its merge unit's mean received attention, its key the unit's 4 head-mean
    keys concatenated (window order undone), from the eager copy; contextual targets are the merger applied to the
    mean of the concatenated patch states."""
    family = "qwen2_5_vl"
    model = model_factory(family)
    inputs = make_inputs(model, family, [(3, 1, 4)])
    layer = 0  # L - 2 of the tiny 2-layer tower (a windowed layer)
    blocks = _eager_qwen_blocks(model, inputs, layer)
    grid = inputs["image_grid_thw"]
    received = _unwindow(torch.cat([w.float().mean(dim=(0, 1)) for w, _ in blocks]), model, grid)
    keys = _unwindow(torch.cat([k.float().mean(0) for _, k in blocks]), model, grid)
    scores, unit_keys = received.reshape(-1, 4).mean(1), keys.reshape(-1, 4 * keys.shape[-1])
    k = 7
    kept, merge = _hand_visionzip(scores, unit_keys, k)
    assert bool(((merge != 0).sum(1) > 1).any())  # some contextual token absorbed others
    with vtprune.patched(model, "visionzip", keep=k), torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        st = vtprune.stats(model)
    assert st.kept_indices[0].tolist() == kept.tolist()
    # the unpatched LM fed the kept tokens at their original positions, contextual ones = merger(target + mean)
    inner, merger = model.model, model.model.visual.merger
    seen = []
    hook = merger.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            feats = inner.get_image_features(inputs["pixel_values"], grid).pooler_output[0]
    finally:
        hook.remove()
    states = _unwindow(seen[0], model, grid)  # [patches, D] the merger's input, in patch order
    units = states.reshape(-1, 4 * states.shape[-1])  # one row per token: its 4 patches concatenated
    with torch.no_grad():
        vectors = feats[kept].clone()
        for row, weights in enumerate(merge):
            if int((weights != 0).sum()) > 1:
                vectors[row] = merger((weights @ units).reshape(4, -1))[0]
        ids = inputs["input_ids"][0]
        visual = (ids == model.config.image_token_id).nonzero().squeeze(1)
        embeds = inner.get_input_embeddings()(inputs["input_ids"])
        embeds[0, visual[kept]] = vectors
        pos, _ = inner.get_rope_index(
            inputs["input_ids"],
            image_grid_thw=grid,
            video_grid_thw=None,
            attention_mask=inputs["attention_mask"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
        )
        keep = torch.ones(ids.numel(), dtype=torch.bool)
        keep[visual] = False
        keep[visual[kept]] = True
        ref = model(
            inputs_embeds=embeds[:, keep],
            position_ids=pos[..., keep],
            attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
        ).logits[:, -1]
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_visionzip_anyres_selects_within_each_crop(model_factory):
    """LLaVA-NeXT: the budget is split evenly over the image's crops (VisionZip keeps the same number per crop),
    each crop runs the official selection on its own tokens (CLS rows of that crop, keys of that crop), and the
    row separators are not kept (the official code computes image_newline but never concatenates it)."""
    family = "llava_next"
    model = model_factory(family)
    inputs = make_inputs(model, family, [(3, 1, 4)])
    k = 21
    infos, kept = _captured(model, inputs, "visionzip", keep=k)
    info = infos[0]
    assert info.crops == 3  # base + 2 crops
    crops, patches = info.crops, info.cls_attention.shape[-1] - 1
    ids = info.token_patches(crops, patches)[:, 0]
    scores = info.pack(F.cls_scores(info.cls_attention, slice(None)))
    keys = info.vision_keys[:, 0, 1:].reshape(crops * patches, -1)
    kept = kept[0]
    assert kept.numel() == k and bool((ids[kept] >= 0).all())  # no separator
    per_crop = [((ids // patches == c) & (ids >= 0)).nonzero().squeeze(1) for c in range(crops)]
    counts = [int(torch.isin(kept, t).sum()) for t in per_crop]
    assert counts == [7] * crops
    for tokens in per_crop:
        local, _ = _hand_visionzip(scores[tokens], keys[ids[tokens]], 7)
        assert kept[torch.isin(kept, tokens)].tolist() == tokens[local].tolist()
