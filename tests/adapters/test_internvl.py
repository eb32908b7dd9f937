"""InternVL specifics (the method x family tests cover it too): the pixel-shuffle mapping of patches to LLM tokens,
CLS scores against the eager tower's attention weights pooled by hand, tiles joined into one image, beam search."""

import pytest
import torch
from conftest import opts
from tiny import INTERNVL_TILE_TOKENS, INTERNVL_TILES, greedy, make_inputs, split_rows

import vtprune
from vtprune.adapters import get_adapter


def _by_hand(side: int) -> torch.Tensor:
    """Token (i, j) of the 2x pixel shuffle carries patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1) (row-major
    patch ids), read off the four view / permute steps of InternVLModel.pixel_shuffle."""
    rows = []
    for i in range(side // 2):
        for j in range(side // 2):
            rows.append([(2 * i + di) * side + 2 * j + dj for di in (0, 1) for dj in (0, 1)])
    return torch.tensor(rows)


def test_projector_rows_are_the_pixel_shuffled_patches(model_factory):
    """Each projector input row is the concatenation of the vision features of exactly the patches token_patch_ids
    names (checked on the model's own tensors), and that mapping is the 2 x 2 block read by hand."""
    model = model_factory("internvl")
    adapter = get_adapter(model)
    pix = make_inputs(model, "internvl", [(2, 1, 2)])["pixel_values"]  # 3 tiles
    seen = []
    hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            model.model.get_image_features(pix)
            patches = model.model.vision_tower(pixel_values=pix).last_hidden_state[:, 1:]  # [tiles, P, D]
    finally:
        hook.remove()
    ids = adapter.token_patch_ids(patches.shape[1])
    assert torch.equal(ids, _by_hand(4))
    assert torch.equal(adapter.token_patch_ids(64), _by_hand(8))
    torch.testing.assert_close(seen[0], patches[:, ids].flatten(-2), rtol=0, atol=0)
    # per-raw-patch scores: the sum over each token's 2 x 2 block; per-token scores: unchanged
    scores = torch.arange(16, dtype=torch.float64)[None]
    assert adapter.pack_crop_scores(scores, {}, 0).tolist() == [
        0 + 1 + 4 + 5,
        2 + 3 + 6 + 7,
        8 + 9 + 12 + 13,
        10 + 11 + 14 + 15,
    ]
    assert adapter.pack_crop_scores(scores[:, :4], {}, 0).tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="neither per raw patch"):
        adapter.pack_crop_scores(scores[:, :9], {}, 0)
    # several crops (joined tiles): each crop's patches map to its own tokens
    two = torch.arange(32, dtype=torch.float64).view(2, 16)
    assert torch.equal(adapter.pack_crop_scores(two, {}, 0)[4:], adapter.pack_crop_scores(two[1:], {}, 0))


def _top_tokens_by_hand(patch_scores, k):
    """``patch_scores`` [tiles, 16] (4 x 4 patches per tile) -> the ascending indices of the image's k best tokens,
    a token's score being the sum over its 2 x 2 patches, tiles in order."""
    ids = _by_hand(4)
    tokens = torch.cat([torch.stack([tile[i].sum() for i in ids]) for tile in patch_scores])
    assert tokens.numel() == patch_scores.shape[0] * INTERNVL_TILE_TOKENS
    return tokens.topk(k).indices.sort().values.tolist()


@pytest.mark.parametrize("importance", ["cls", "received"])
def test_scores_equal_eager_attention_pooled_by_hand(importance, model_factory):
    """The CLS rows / the attention each patch receives that vtprune recomputes (after InternViT's q/k norms) equal the
    eager tower's attention weights, and ``cls`` keeps the top tokens of the scores pooled through the pixel shuffle
    by hand, over all tiles of the image."""
    model = model_factory("internvl", attn="eager")
    inputs = make_inputs(model, "internvl", [(3, 1, 4)])  # one image of 3 tiles (2 + thumbnail)
    tiles = INTERNVL_TILES[0]
    with vtprune.patched(model, "cls", keep=5, start_layer=1, importance=importance), torch.no_grad():
        session = getattr(model, vtprune.api._ATTR)
        out = model.model.get_image_features(inputs["pixel_values"])
        infos = [session.capture.info(out.pooler_output[t]) for t in range(tiles)]
        model(**inputs)
        kept = vtprune.stats(model).kept_indices[0]
    with torch.no_grad():
        eager = model.model.vision_tower(pixel_values=inputs["pixel_values"], output_attentions=True).attentions
    weights = torch.stack([eager[1], eager[2]], 1)  # layers 1..L-2 of 4: [tiles, L, H, 1+P, 1+P]
    if importance == "cls":
        expected = weights[:, :, :, 0]  # CLS query rows [tiles, L, H, 1+P]
        got = torch.cat([i.cls_attention for i in infos])
        scores = expected[..., 1:].mean(2).sum(1)  # head mean, CLS key dropped, summed over layers: [tiles, P]
    else:
        expected = weights.mean(dim=(2, 3))[..., 1:]  # mean over heads and queries (CLS too), patch keys [tiles, L, P]
        got = torch.cat([i.received for i in infos])
        scores = expected.sum(1)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)
    assert kept.tolist() == _top_tokens_by_hand(scores, 5)


def test_tiles_of_an_image_share_one_budget(model_factory):
    model = model_factory("internvl")
    inputs = make_inputs(model, "internvl", [(3, 2, 4), (2, 1, 5)])  # images of 3 + 1 tiles, then 4 tiles
    with vtprune.patched(model, "random", keep=6), torch.no_grad():
        model(**inputs)
        st = vtprune.stats(model)
    per_image = [t * INTERNVL_TILE_TOKENS for t in INTERNVL_TILES]
    assert st.visual_tokens_in == [per_image[0] + per_image[1], per_image[2]]
    assert st.visual_tokens_kept == [6 + 4, 6]  # the one-tile image has 4 tokens: all kept
    assert st.prefill_flops < st.prefill_flops_full
    vision = vtprune.flops.vision_flops(model.config, num_images=sum(INTERNVL_TILES))
    assert st.prefill_flops_full - vision == sum(
        vtprune.flops.decoder_prefill_flops(model.config.text_config, int(n)) for n in inputs["attention_mask"].sum(1)
    )


@pytest.mark.parametrize("method", ["cls", "visionzip"])  # a scoring and a merging method
def test_beam_search_and_cache_rows_alone(method, model_factory):
    """generate encodes the tiles beforehand and, for beams, re-stacks them: the signals still reach the method."""
    model = model_factory("internvl")
    batch, singles = split_rows(model, "internvl", [(3, 1, 4), (9, 2, 2)])
    with vtprune.patched(model, method, **opts(method, ratio=0.4)):
        beams = greedy(model, batch, num_beams=2)
        assert torch.equal(greedy(model, batch, use_cache=False), greedy(model, batch))
        for i, one in enumerate(singles):
            assert torch.equal(greedy(model, one, num_beams=2)[0], beams[i])


def test_visionzip_works_per_tile_with_pixel_shuffled_keys(model_factory):
    """Per tile: dominant tokens by the pooled CLS scores, contextual ones merged by the cosine of their 2 x 2 patches'
    keys concatenated (token_patches); every kept token lies in its tile's share of the budget."""
    model = model_factory("internvl")
    adapter = get_adapter(model)
    ids = adapter.token_patches({}, 0, 2, 16)
    assert torch.equal(ids, torch.cat([_by_hand(4), _by_hand(4) + 16]))
    inputs = make_inputs(model, "internvl", [(3, 1, 4)])  # 3 tiles of 4 tokens
    with vtprune.patched(model, "visionzip", keep=6, contextual=0, layer=2), torch.no_grad():
        model(**inputs)
        kept = vtprune.stats(model).kept_indices[0]
    assert torch.bincount(kept // INTERNVL_TILE_TOKENS, minlength=3).tolist() == [2, 2, 2]  # budget split evenly
    with torch.no_grad():
        eager = (
            model_factory("internvl", attn="eager")
            .model.vision_tower(pixel_values=inputs["pixel_values"], output_attentions=True)
            .attentions[2]
        )
    tiles = [_top_tokens_by_hand(eager[t : t + 1, :, 0, 1:].mean(1), 2) for t in range(3)]
    assert kept.tolist() == [t * INTERNVL_TILE_TOKENS + i for t, top in enumerate(tiles) for i in top]


def test_refusals_say_why(model_factory):
    model = model_factory("internvl")
    model.config.vision_feature_select_strategy = "full"
    try:
        with pytest.raises(ValueError, match="vision_feature_select_strategy='default'"):
            vtprune.patch(model, "cls", keep=4)
    finally:
        model.config.vision_feature_select_strategy = "default"
    assert not vtprune.is_patched(model)
