"""Token merging inside the vision tower of LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision (``vtprune.methods.tower``), tiny
random models.

Independent route: the unpatched tower run block by block with eager attention written here and the reading of
ToMe's official merge from ``test_vit_functional`` (the patches each merged token holds traced with a one-hot
source, as ToMe's ``trace_source``), the projector, a representative position per merged token chosen here (for
LLaVA-OneVision's AnyRes-max packing: the model's own packing as a dense matrix read off one-hot features, shares and
representatives by a loop), and the unpatched language model fed those vectors at those positions.
"""

import pytest
import torch
import transformers.models.llava_onevision.modeling_llava_onevision as modeling
from test_vit_functional import _official_tome
from tiny import (
    assert_keep_all_is_bit_identical,
    greedy,
    last_logits,
    make_inputs,
    split_rows,
    video_inputs,
)
from tiny import vision_aspect as _aspect

import vtprune
from vtprune import flops
from vtprune.adapters import get_adapter
from vtprune.functional import vit as FV
from vtprune.methods.vit import ToMeConfig

FAMILIES = ["llava", "llava_next", "llava_onevision"]
P = 16  # tiny CLIP / SigLIP: 56 px / 14 px patches = a 4 x 4 grid


@pytest.mark.parametrize(
    "family,method",
    [(f, m) for f in ("llava", "llava_onevision") for m in vtprune.list_vit_methods()] + [("llava_next", "tome")],
)
def test_keep_all_is_bit_identical(family, method, model_factory):
    model = model_factory(family)
    with _aspect(model, "anyres_max_2"):  # LLaVA-OneVision: the 112x112 image's grid is downscaled
        inputs = make_inputs(model, family, [(3, 1, 4), (2, 1, 2)])
        assert_keep_all_is_bit_identical(model, inputs, method, ratio=1.0)


def _eager_tower_tome(model, pix, r, read=None):
    """Hidden state ``read`` (None: the last block's output, LLaVA-OneVision's layer -1) of the unpatched CLIP /
    SigLIP tower with ToMe (``r`` per block before it, proportional attention; CLIP's CLS token never merged, SigLIP
    has none), eager attention; returns ``(h [C, T, D], source [C, T, P] > 0)`` (``source[c, j, q]``: patch ``q``
    is in token ``j``)."""
    vm = model.model.vision_tower
    vm = getattr(vm, "vision_model", vm)  # SiglipVisionModel or its core
    cls = hasattr(vm, "pre_layrnorm")  # CLIP
    h = vm.pre_layrnorm(vm.embeddings(pix)) if cls else vm.embeddings(pix)
    c = h.shape[0]
    source = torch.eye(P).expand(c, P, P)
    if cls:
        source = torch.cat([torch.zeros(c, 1, P), source], 1)
    size = None
    for blk in vm.encoder.layers[:read]:
        a = blk.self_attn
        y = blk.layer_norm1(h)
        q, k, v = (
            t.view(c, t.shape[1], a.num_heads, -1).transpose(1, 2) for t in (a.q_proj(y), a.k_proj(y), a.v_proj(y))
        )
        logits = (q @ k.transpose(-2, -1)) * a.scale
        if size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(c, -1, h.shape[-1])
        h = h + a.out_proj(out)
        d = h.shape[-1]
        merged, size = _official_tome(k.mean(1), torch.cat([h, source], -1), size, r, cls, False)
        h, source = merged[..., :d], merged[..., d:]
        h = h + blk.mlp(blk.layer_norm2(h))
    return h, source > 0


def _representative(members):
    """The member patch nearest to the members' centroid on the 4 x 4 grid (ties: the lower index)."""
    idx = members.nonzero().squeeze(1).tolist()
    cy = sum(i // 4 for i in idx) / len(idx)
    cx = sum(i % 4 for i in idx) / len(idx)
    return min(idx, key=lambda i: ((i // 4 - cy) ** 2 + (i % 4 - cx) ** 2, i))


def test_llava_tome_against_independent_route(model_factory):
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(5, 1, 6)])
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        h, source = _eager_tower_tome(model, inputs["pixel_values"], r=2, read=3)  # vision_feature_layer = -2
        feats = model.model.multi_modal_projector(h[:, 1:])[0]  # [k, D]: the CLS row dropped ('default')
        src = source[0, 1:]  # [k, P] patches of each merged token (the CLS row dropped)
        reps = [_representative(m) for m in src]
        order = sorted(range(len(reps)), key=lambda j: reps[j])
        image = (ids == model.config.image_token_id).nonzero().squeeze(1)
        embeds = model.get_input_embeddings()(ids)
        text = [i for i in range(ids.numel()) if i not in set(image.tolist())]
        cols = sorted(text + [int(image[reps[j]]) for j in order])
        x = embeds.clone()
        x[image[[reps[j] for j in order]]] = feats[order]
        x = x[cols][None]
        pos = torch.tensor(cols)[None]
        want = model(inputs_embeds=x, position_ids=pos, attention_mask=torch.ones_like(pos)).logits[:, -1]
    assert len(reps) == P - 3 * 2
    with vtprune.patched(model, "tome", r=2):
        got = last_logits(model, inputs)
        st = vtprune.stats(model)
        assert st.visual_tokens_kept == [P - 6]
        assert st.kept_indices[0].tolist() == sorted(reps)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


def test_llava_next_tome_against_independent_route(model_factory):
    """AnyRes: 5 crops merged on their own; the model's own packing (unpad removes 2 of the 8 grid rows of a 90x112
    image) decides which patches stay; newlines stay; a merged token keeps its representative among its patches
    that stay."""
    model = model_factory("llava_next")
    inner = model.model
    gen = torch.Generator().manual_seed(5)
    pix, sizes = torch.randn(1, 5, 3, 56, 56, generator=gen), torch.tensor([[90, 112]])
    with torch.no_grad():
        n = inner.get_image_features(pix, sizes).pooler_output[0].shape[0]
        ids = torch.tensor([[7, 8, 9] + [model.config.image_token_id] * n + [10, 11, 12, 13]])
        h, source = _eager_tower_tome(model, pix[0], r=2, read=3)
        feats = inner.multi_modal_projector(h[:, 1:])  # [5, k, D]
        flat = torch.arange(5 * P, dtype=torch.float64).view(5, P, 1)
        packed, _ = inner.pack_image_features([flat], sizes, "default", torch.tensor([-1.0], dtype=torch.float64))
        packed = packed[0].reshape(-1).long().tolist()  # per visual token: crop * P + patch, -1 = newline
        assert len(packed) == n < 5 * P + 8 + 8
        stays = {i for i in packed if i >= 0}
        vectors = {}  # visual token index -> vector
        for c in range(5):
            for j, members in enumerate(source[c, 1:]):
                alive = members & torch.tensor([c * P + q in stays for q in range(P)])
                if alive.any():
                    vectors[packed.index(c * P + _representative(alive))] = feats[c, j]
        for t, i in enumerate(packed):
            if i < 0:
                vectors[t] = inner.image_newline
        kept = sorted(vectors)
        cols = [0, 1, 2] + [3 + t for t in kept] + list(range(3 + n, 7 + n))
        x = model.get_input_embeddings()(ids)[0]
        for t in kept:
            x[3 + t] = vectors[t]
        pos = torch.tensor(cols)[None]
        want = model(inputs_embeds=x[cols][None], position_ids=pos, attention_mask=torch.ones_like(pos)).logits[:, -1]
    assert len(kept) < 5 * (P - 6) + 8  # some merged tokens lay wholly in the unpadded-away rows
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pix, "image_sizes": sizes}
    with vtprune.patched(model, "tome", r=2):
        got = last_logits(model, inputs)
        assert vtprune.stats(model).kept_indices[0].tolist() == kept
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_half_budget_reaches_the_read_layer_and_the_llm(family, model_factory):
    model = model_factory(family)
    inputs = make_inputs(model, family, [(3, 1, 4), (2, 1, 2)])
    tower = model.model.vision_tower
    blocks = getattr(tower, "vision_model", tower).encoder.layers
    siglip = family == "llava_onevision"  # no CLS token; the projector reads the last block's output (layer -1)
    seen_blocks, seen_proj, seen_llm = [], [], []

    def tokens(a, kw):
        return (a[0] if a else kw["hidden_states"]).shape[1]

    spies = [
        b.register_forward_pre_hook(lambda m, a, kw: seen_blocks.append([tokens(a, kw)]), with_kwargs=True)
        for b in blocks
    ]
    spies += [
        b.register_forward_hook(
            lambda m, a, kw, out: seen_blocks[-1].append((out[0] if isinstance(out, tuple) else out).shape[1]),
            with_kwargs=True,
        )
        for b in blocks
    ]
    spies.append(
        model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen_proj.append(a[0].shape[1]))
    )
    spies.append(
        model.model.language_model.layers[0].register_forward_pre_hook(
            lambda m, a, kw: seen_llm.append(tokens(a, kw)), with_kwargs=True
        )
    )
    real = inputs["attention_mask"].sum(1).tolist()
    try:
        for method in vtprune.list_vit_methods():
            seen_blocks.clear()
            seen_proj.clear()
            with vtprune.patched(model, method, ratio=0.5), torch.no_grad():
                model(**inputs)
                st = vtprune.stats(model)
            assert seen_proj == [P // 2]  # half the patches reach the projector (LLaVA: the CLS row dropped)
            if not siglip:  # CLS + half the patches enter the block whose input the projector reads
                assert seen_blocks[-1][0] == 1 + P // 2
            else:  # every block may merge; the last one's output is read
                assert seen_blocks[-1][1] == P // 2 and seen_blocks[0][0] == P
            n_in, kept = st.visual_tokens_in, st.visual_tokens_kept
            if family == "llava":
                assert kept == [P // 2, P // 2]
            else:  # per crop half the patches, plus the newline tokens; unpadding may remove some
                crops = [3, 5]  # image sizes 56x112 (1x2 grid + base), 112x112 (2x2 grid + base)
                newlines = [4, 8]
                assert all(k <= c * P // 2 + nl for k, c, nl in zip(kept, crops, newlines)), kept
            assert seen_llm[-1] == max(r - n + k for r, n, k in zip(real, n_in, kept))  # the LLM's prefill
            assert st.prefill_flops < st.prefill_flops_full
            if method == "tome" and family != "llava_next":  # the FLOPs the blocks that ran and the projector saved
                crops = 2 if family == "llava" else 3 + 5
                full = flops.vit_flops(tower)
                reduced = flops.vit_flops(tower, [tuple(b) for b in seen_blocks])
                projector = 2 * (P - P // 2) * (32 * 64 + 64 * 64)  # linear_1 (32 -> 64), linear_2 (64 -> 64)
                text = model.config.text_config
                llm = sum(
                    flops.decoder_prefill_flops(text, r) - flops.decoder_prefill_flops(text, r - n + k)
                    for r, n, k in zip(real, n_in, kept)
                )
                assert reduced < full
                assert st.prefill_flops_full - st.prefill_flops == llm + crops * (full - reduced + projector)
    finally:
        for s in spies:
            s.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_rows_alone_and_cache(family, model_factory):
    model = model_factory(family)
    specs = {
        "llava": [(3, 1, 4), (9, 2, 2)],
        "llava_next": [(3, 1, 4), (9, 1, 2)],
        "llava_onevision": [(3, 1, 4), (2, 1, 2), (9, 2, 2)],
    }[family]  # 56x112; 112x112; two base crops
    with _aspect(model, "anyres_max_2"):  # LLaVA-OneVision: the 112x112 image's grid is downscaled
        batch, singles = split_rows(model, family, specs)
        _batch_equals_rows_alone_and_cache(model, family, batch, singles)


def _batch_equals_rows_alone_and_cache(model, family, batch, singles):
    with vtprune.patched(model, "tome", ratio=0.5):
        logits = last_logits(model, batch)
        kept = vtprune.stats(model).visual_tokens_kept
        for i, one in enumerate(singles):
            torch.testing.assert_close(last_logits(model, one)[0], logits[i], rtol=1e-4, atol=1e-4)
            assert vtprune.stats(model).visual_tokens_kept == [kept[i]]
        tokens = greedy(model, batch, n=3)
        assert torch.equal(greedy(model, batch, n=3, use_cache=False), tokens)
        if family == "llava":
            assert torch.equal(greedy(model, singles[0], n=3)[0], tokens[0])
            assert greedy(model, batch, n=3, num_beams=2).shape == tokens.shape
            assert vtprune.stats(model).visual_tokens_kept == [k for k in kept for _ in range(2)]


@pytest.mark.parametrize("family", FAMILIES)
def test_schedule_with_fastv(family, model_factory):
    model = model_factory(family)
    inputs = make_inputs(model, family, [(3, 1, 4), (2, 1, 2)])
    schedule = [ToMeConfig(ratio=0.5), vtprune.FastVConfig(keep=4, layer=2)]
    lengths = []
    hooks = [
        layer.register_forward_pre_hook(
            lambda m, a, kw, i=i: lengths.append((i, (a[0] if a else kw["hidden_states"]).shape[1])), with_kwargs=True
        )
        for i, layer in enumerate(model.model.language_model.layers)
    ]
    try:
        with vtprune.patched(model, schedule), torch.no_grad():
            model(**inputs)
            st = vtprune.stats(model)
    finally:
        for h in hooks:
            h.remove()
    with vtprune.patched(model, schedule):
        cached = greedy(model, inputs, n=3)
        assert torch.equal(greedy(model, inputs, n=3, use_cache=False), cached)
    tower, fastv = st.stages
    assert (tower.method, tower.layer, fastv.method, fastv.layer) == ("tome", None, "fastv", 2)
    assert fastv.visual_tokens_kept == [4, 4] and all(k > 4 for k in tower.visual_tokens_kept)
    real = inputs["attention_mask"].sum(1).tolist()
    widths = dict(lengths)
    assert widths[1] == max(r - n + k for r, n, k in zip(real, st.visual_tokens_in, tower.visual_tokens_kept))
    assert widths[3] == max(r - n + 4 for r, n in zip(real, st.visual_tokens_in))  # (the spies run before the engine)
    assert st.visual_tokens_kept == [4, 4]


def test_unpatch_restores(model_factory):
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(3, 1, 4)])
    ref = last_logits(model, inputs)
    proj = model.model.multi_modal_projector
    hooks = len(proj._forward_hooks)
    vtprune.patch(model, "pitome", keep=6)
    assert not torch.equal(last_logits(model, inputs), ref)
    vtprune.unpatch(model)
    blocks = model.model.vision_tower.encoder.layers
    assert all("forward" not in vars(b) for b in blocks)
    assert "get_image_features" not in vars(model.model) and len(proj._forward_hooks) == hooks
    assert torch.equal(last_logits(model, inputs), ref)


def test_bad_input(model_factory):
    model = model_factory("llava")
    with pytest.raises(ValueError, match="keep must be >= 2"):
        vtprune.patch(model, "tome", keep=1)  # 3 blocks before the read layer halve 16 patches at most to 2
    with pytest.raises(ValueError, match="ratio must be in"):
        vtprune.patch(model, "tome", ratio=1.5)
    with pytest.raises(ValueError, match="two methods act at one prune point"):
        vtprune.patch(model, [ToMeConfig(ratio=0.5), vtprune.DivPruneConfig(keep=4)])
    assert not vtprune.is_patched(model)
    model.config.vision_feature_layer = [-2, -1]
    try:
        with pytest.raises(ValueError, match="one vision_feature_layer"):
            vtprune.patch(model, "tome", ratio=0.5)
    finally:
        model.config.vision_feature_layer = -2
    assert not vtprune.is_patched(model)
    assert all("forward" not in vars(b) for b in model.model.vision_tower.encoder.layers)
    qwen = model_factory("qwen2_vl")
    with pytest.raises(ValueError, match="supports \\['llava', 'llava_next', 'llava_onevision'\\]"):
        vtprune.patch(qwen, "tome", ratio=0.5)
    with pytest.raises(ValueError, match="not one vtprune knows .*, nor a VLM"):
        vtprune.patch(torch.nn.Linear(2, 2), "tome", ratio=0.5)


def test_harness_names_a_tower_method():
    hmodel = pytest.importorskip("vtprune.harness.model", exc_type=ImportError)
    config = hmodel.method_config("pitome", keep=64, margin=0.9)
    assert isinstance(config, vtprune.PiToMeConfig) and (config.keep, config.margin) == (64, 0.9)
    with pytest.raises(TypeError, match="unknown option"):
        hmodel.method_config("tome", keep=64, layer=2)


# -------------------------------------------------------------------------------------------------- LLaVA-OneVision
def _onevision_route(model, ids, pix, sizes, aspect, source, feats):
    """The independent route of one LLaVA-OneVision image: ``source`` ``[C, T, P]`` bool (patch ``q`` of crop ``c``
    is in merged token ``j``; a dropped patch in none), ``feats`` ``[C, T, D]`` the projector's output of the merged
    tokens. The projector's output is spread over each crop's patches (a dropped patch: zeros); the model's own
    packing (unpad; ``anyres_max`` bilinear downscale) as a dense matrix read off one-hot features; each merged token
    keeps the visual token holding its largest share (ties: nearest to the share-weighted centroid, then the first),
    which carries the model's packing of the spread grid divided by the share of its blend that survived; newlines
    stay. Returns ``(kept visual token indices, last logits of the LLM fed those at their positions)``."""
    inner = model.model
    c, t = source.shape[:2]
    n = int((ids[0] == model.config.image_token_id).sum())
    nan = torch.tensor([float("nan")], dtype=torch.float64)
    with _aspect(model, aspect), torch.no_grad():
        spread = torch.einsum("cjq,cjd->cqd", source.to(feats.dtype), feats)  # each patch: its token's vector
        packed, _ = inner.pack_image_features(
            [spread], sizes, image_newline=inner.image_newline, vision_aspect_ratio=aspect
        )
        packed = packed[0]
        onehot = torch.eye(c * P, dtype=torch.float64).view(c, P, c * P)
        dense, _ = inner.pack_image_features(
            [onehot], sizes, image_newline=nan.expand(c * P), vision_aspect_ratio=aspect
        )
        dense = dense[0]  # [n, C P]: each visual token's weights on the crops' patches; newline rows NaN
        q = torch.arange(P)
        yx = [torch.stack([q // 4, q % 4], -1)] + [
            torch.stack([(k // 2) * 4 + q // 4, (k % 2) * 4 + q % 4], -1) for k in range(c - 1)
        ]  # base crop; the 2x2 grid's crops
        pos, _ = inner.pack_image_features(
            [torch.stack(yx).to(torch.float64)], sizes, image_newline=nan.expand(2), vision_aspect_ratio=aspect
        )
        pos = pos[0].nan_to_num(0.0)  # each visual token's position: its blend of patch coordinates (newlines: 0)
    newline = dense[:, 0].isnan()
    dense = dense.nan_to_num(0.0)
    assert len(dense) == n
    members = torch.zeros(c * P, c * t, dtype=torch.float64)  # patch -> merged token (block diagonal)
    for k in range(c):
        members[k * P : (k + 1) * P, k * t : (k + 1) * t] = source[k].T.to(torch.float64)
    share = dense @ members  # [n, merged tokens]: each token's share of each merged token
    reps = set()
    for m in range(share.shape[1]):
        col = share[:, m]
        if col.max() <= 0:
            continue  # all its patches unpadded away (or skipped by the downscale)
        top = [i for i in range(n) if col[i] >= col.max() - 1e-9]
        centre = (col[:, None] * pos).sum(0) / col.sum()
        dist = {i: float(((pos[i] - centre) ** 2).sum().sqrt()) for i in top}
        reps.add(min(top, key=lambda i: (round(dist[i], 9), i)))
    kept = sorted(reps | set(newline.nonzero().squeeze(1).tolist()))
    alive = share.sum(1) / dense.sum(1).clamp(min=1e-300)
    vectors = torch.where(newline[:, None], packed, (packed / alive[:, None].to(packed.dtype)))[kept]
    with torch.no_grad():
        cols = [0, 1, 2] + [3 + i for i in kept] + list(range(3 + n, 7 + n))
        x = model.get_input_embeddings()(ids)[0]
        x[[3 + i for i in kept]] = vectors.to(x.dtype)
        position = torch.tensor(cols)[None]
        want = model(
            inputs_embeds=x[cols][None], position_ids=position, attention_mask=torch.ones_like(position)
        ).logits[:, -1]
    return kept, want, dense


def _onevision_image(model, aspect):
    """A 90x112 image (a 2x2 AnyRes grid: 5 crops; unpadding keeps 6 of the 8 grid rows) in a prompt."""
    gen = torch.Generator().manual_seed(5)
    pix, sizes = torch.randn(1, 5, 3, 56, 56, generator=gen), torch.tensor([[90, 112]])
    with _aspect(model, aspect), torch.no_grad():
        n = model.model.get_image_features(pix, sizes).pooler_output[0].shape[0]
    ids = torch.tensor([[7, 8, 9] + [model.config.image_token_id] * n + [10, 11, 12, 13]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pix, "image_sizes": sizes}
    return inputs, n


@pytest.mark.parametrize("aspect", ["anyres_max_9", "anyres_max_2"])
def test_onevision_tome_against_independent_route(aspect, model_factory):
    """AnyRes-max: 5 crops merged on their own (SigLIP: every patch mergeable; ToMe r=2 in all 4 blocks: 8 tokens per
    crop); anyres_max_2 downscales the unpadded 6x8 grid to 4x6 (bilinear blends of unequal weights)."""
    model = model_factory("llava_onevision")
    inputs, n = _onevision_image(model, aspect)
    assert n == 16 + (4 * 7 if aspect == "anyres_max_2" else 6 * 9)
    with torch.no_grad():
        h, source = _eager_tower_tome(model, inputs["pixel_values"][0], r=2)
        assert source.shape == (5, P - 8, P) and bool((source.sum(1) == 1).all())
        feats = model.model.multi_modal_projector(h)  # [5, 8, D] ('full': every token)
    kept, want, dense = _onevision_route(
        model, inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"], aspect, source, feats
    )
    assert any(bool((dense[t] > 0).sum() > 1) for t in kept) == (aspect == "anyres_max_2")  # kept blends
    with _aspect(model, aspect), vtprune.patched(model, "tome", r=2):
        got = last_logits(model, inputs)
        st = vtprune.stats(model)
    assert st.kept_indices[0].tolist() == kept and st.visual_tokens_kept == [len(kept)] and len(kept) < n
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


def test_onevision_zerotprune_downscaled_blends_renormalised(model_factory):
    """Zero-TPrune drops patches: a downscaled token blending dropped patches carries the blend of what survived
    (the model's packing of the spread grid, dropped patches zero, divided by the surviving weight). The patches each
    token holds are read from the tower's group map (the merge itself is checked against the official code in
    test_vit_functional); the packing, placement and renormalisation here are the independent route's."""
    model = model_factory("llava_onevision")
    aspect = "anyres_max_2"
    inputs, _ = _onevision_image(model, aspect)
    proj = model.model.multi_modal_projector
    seen = {}
    spy = proj.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))  # before the spread hook
    try:
        with _aspect(model, aspect), vtprune.patched(model, "zerotprune", keep=6):
            got = last_logits(model, inputs)
            st = vtprune.stats(model)
            tower = next(m for m in model._vtprune_session.methods if hasattr(m, "session"))
            group = tower.session.state.group  # [5, P]: each patch's token, -1 dropped
    finally:
        spy.remove()
    feats = seen["out"]
    assert feats.shape[:2] == (5, 6) and bool((group < 0).any())
    source = group[:, None, :] == torch.arange(6)[None, :, None]  # [5, 6, P]
    kept, want, dense = _onevision_route(
        model, inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"], aspect, source, feats
    )
    dropped = (group < 0).reshape(-1).to(torch.float64)
    assert any(0 < float(dense[t] @ dropped) < float(dense[t].sum()) for t in kept)  # a kept blend lost a part
    assert st.kept_indices[0].tolist() == kept
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


def test_onevision_refusals_and_unpatch(model_factory):
    model = model_factory("llava_onevision")
    inputs = make_inputs(model, "llava_onevision", [(3, 1, 4)])
    ref = last_logits(model, inputs)
    cfg = model.config
    for attr, value, match in [
        ("vision_feature_layer", [-2, -1], "one vision_feature_layer"),
        ("vision_feature_select_strategy", "default", "needs vision_feature_select_strategy="),
    ]:
        old = getattr(cfg, attr)
        setattr(cfg, attr, value)
        try:
            with pytest.raises(ValueError, match=match):
                vtprune.patch(model, "tome", ratio=0.5)
        finally:
            setattr(cfg, attr, old)
        assert not vtprune.is_patched(model)
    tower = model.model.vision_tower
    blocks = getattr(tower, "vision_model", tower).encoder.layers
    assert all("forward" not in vars(b) for b in blocks)
    proj = model.model.multi_modal_projector
    hooks = len(proj._forward_hooks)
    videos, _ = video_inputs(model)
    vtprune.patch(model, "zerotprune", keep=6)
    assert not torch.equal(last_logits(model, inputs), ref)
    with pytest.raises(ValueError, match="images only; get_video_features"):
        model.model.get_video_features(**videos)
    vtprune.unpatch(model)
    assert all("forward" not in vars(b) for b in blocks)
    assert "get_image_features" not in vars(model.model) and "get_video_features" not in vars(model.model)
    assert len(proj._forward_hooks) == hooks
    assert torch.equal(last_logits(model, inputs), ref)


@pytest.mark.parametrize("seed", range(4))
def test_packed_representatives_of_one_patch_tokens_are_group_representatives(seed):
    """Tokens that are single patches (LLaVA-1.5 / -NeXT, OneVision without downscale) in the packing's order: the
    rule is group_representatives' (nearest to the members' centroid, then the lower index)."""
    gen = torch.Generator().manual_seed(seed)
    group = torch.randint(-1, 5, (1, 36), generator=gen)
    present = torch.rand(1, 36, generator=gen) > 0.3
    want = FV.group_representatives(group, 6, present)[0]
    src = torch.arange(36)[present[0]]  # the packing drops the absent patches
    members = group[0, src][:, None]
    pos = torch.stack([src // 6, src % 6], -1).to(torch.float64)
    got = FV.packed_representatives(members, torch.ones(len(src), 1, dtype=torch.float64), pos)
    assert src[got].tolist() == want.nonzero().squeeze(1).tolist()


def test_packed_representatives_shares_and_bad_input():
    # token 0 holds 0.75 of merged token 7, token 1 0.25 of it and all of merged token 3; token 2 nothing
    members = torch.tensor([[7, 7, -1], [7, 3, 3], [-1, -1, -1]])
    weight = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.0, 0.0, 0.0]], dtype=torch.float64)
    pos = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    assert FV.packed_representatives(members, weight, pos).tolist() == [True, True, False]
    with pytest.raises(TypeError, match="members must be int64"):
        FV.packed_representatives(members.float(), weight, pos)
    with pytest.raises(ValueError, match="weight must be a float"):
        FV.packed_representatives(members, weight[:2], pos)
    with pytest.raises(ValueError, match="pos must be a float"):
        FV.packed_representatives(members, weight, pos[:, :1])
    with pytest.raises(ValueError, match="weight must be >= 0"):
        FV.packed_representatives(members, -weight, pos)


@pytest.mark.parametrize("aspect", ["anyres_max_9", "anyres_max_2", "anyres_max_1"])
def test_onevision_pack_crop_weights_are_the_models_packing(aspect, model_factory):
    """The adapter's patch-to-token map (taps, weights, positions) equals the model's packing read as a dense matrix
    off one-hot features, with and without unpadding, for downscale factors ~1.2 to 2."""
    model = model_factory("llava_onevision")
    adapter = get_adapter(model)
    nan = torch.tensor([float("nan")], dtype=torch.float64)
    with _aspect(model, aspect):
        for size in ([90, 112], [112, 112], [56, 112], [112, 70]):
            sizes = torch.tensor([size])
            call = {"image_sizes": sizes, "vision_aspect_ratio": None}
            crops = adapter.crop_counts(call, 1)[0]
            src, weight, pos = adapter.pack_crop_weights(call, 0, crops, P)
            onehot = torch.eye(crops * P, dtype=torch.float64).view(crops, P, crops * P)
            dense, _ = model.model.pack_image_features(
                [onehot], sizes, image_newline=nan.expand(crops * P), vision_aspect_ratio=aspect
            )
            dense = dense[0].nan_to_num(0.0)
            mine = torch.zeros_like(dense)
            mine.scatter_add_(1, src.clamp(min=0), weight)
            torch.testing.assert_close(mine, dense, rtol=0, atol=1e-12)
            assert bool(((weight > 0) == (src >= 0)).all())
            # positions: the base crop's patches on its grid; a grid token's, the weighted mean of its patches' on the
            # whole crop grid (crop k >= 1 sits at row (k - 1) // npw, column (k - 1) % npw of the crop grid)
            _, npw = modeling.get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, 56)
            k, q = torch.arange(crops * P) // P, torch.arange(crops * P) % P
            yx = torch.stack([(k - 1).clamp(min=0) // npw * 4 + q // 4, (k - 1).clamp(min=0) % npw * 4 + q % 4], -1)
            token = dense[P:].sum(1) > 0
            want = (dense[P:] @ yx.to(torch.float64))[token] / dense[P:].sum(1, keepdim=True)[token]
            torch.testing.assert_close(pos[P:][token], want, rtol=0, atol=1e-9)
            assert torch.equal(pos[:P], torch.stack([q[:P] // 4, q[:P] % 4], -1).to(torch.float64))
