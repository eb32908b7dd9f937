"""Token merging inside the vision tower of LLaVA-1.5 / LLaVA-NeXT (``vtprune.methods.tower``), tiny random models.

Independent route: the unpatched tower run block by block with eager attention written here and the reading of
ToMe's official merge from ``test_vit_functional`` (the patches each merged token holds traced with a one-hot
source, as ToMe's ``trace_source``), the projector, a representative position per merged token chosen here, and
the unpatched language model fed those vectors at those positions.
"""

import pytest
import torch
from test_vit_functional import _official_tome
from tiny import (
    assert_keep_all_is_bit_identical,
    greedy,
    last_logits,
    make_inputs,
    split_rows,
)

import vtprune
from vtprune import flops
from vtprune.methods.vit import ToMeConfig

FAMILIES = ["llava", "llava_next"]
P = 16  # tiny CLIP: 56 px / 14 px patches = a 4 x 4 grid


@pytest.mark.parametrize("family,method", [("llava", m) for m in vtprune.list_vit_methods()] + [("llava_next", "tome")])
def test_keep_all_is_bit_identical(family, method, model_factory):
    model = model_factory(family)
    inputs = make_inputs(model, family, [(3, 1, 4), (2, 1, 2)])
    assert_keep_all_is_bit_identical(model, inputs, method, ratio=1.0)


def _eager_tower_tome(model, pix, r, read):
    """Hidden state ``read`` of the unpatched CLIP tower with ToMe (``r`` per block before it, proportional
    attention), eager attention; returns ``(h [C, T, D], source [C, T, P] > 0)``."""
    vm = model.model.vision_tower
    h = vm.pre_layrnorm(vm.embeddings(pix))
    c = h.shape[0]
    source = torch.cat([torch.zeros(c, 1, P), torch.eye(P).expand(c, P, P)], 1)
    size = None
    for blk in vm.encoder.layers[:read]:
        a = blk.self_attn
        y = blk.layer_norm1(h)
        q, k, v = (t.view(c, t.shape[1], a.num_heads, -1).transpose(1, 2) for t in (a.q_proj(y), a.k_proj(y),
                                                                                     a.v_proj(y)))
        logits = (q @ k.transpose(-2, -1)) * a.scale
        if size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(c, -1, h.shape[-1])
        h = h + a.out_proj(out)
        d = h.shape[-1]
        merged, size = _official_tome(k.mean(1), torch.cat([h, source], -1), size, r, True, False)
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
    tower = model.model.vision_tower.encoder.layers
    seen_tower, seen_llm = [], []
    spies = [tower[-1].register_forward_pre_hook(lambda m, a, kw: seen_tower.append(
        (a[0] if a else kw["hidden_states"]).shape[1]), with_kwargs=True),
        model.model.language_model.layers[0].register_forward_pre_hook(lambda m, a, kw: seen_llm.append(
            (a[0] if a else kw["hidden_states"]).shape[1]), with_kwargs=True)]
    real = inputs["attention_mask"].sum(1).tolist()
    try:
        for method in vtprune.list_vit_methods():
            seen_tower.clear()
            with vtprune.patched(model, method, ratio=0.5), torch.no_grad():
                model(**inputs)
                st = vtprune.stats(model)
            assert seen_tower == [1 + P // 2]  # CLS + half the patches enter the block whose input the projector reads
            n_in, kept = st.visual_tokens_in, st.visual_tokens_kept
            if family == "llava":
                assert kept == [P // 2, P // 2]
            else:  # per crop half the patches, plus the newline tokens; unpadding may remove some
                crops = [3, 5]  # image sizes 56x112 (1x2 grid + base), 112x112 (2x2 grid + base)
                newlines = [4, 8]
                assert all(k <= c * P // 2 + nl for k, c, nl in zip(kept, crops, newlines)), kept
            assert seen_llm[-1] == max(r - n + k for r, n, k in zip(real, n_in, kept))  # the LLM's prefill
            assert st.prefill_flops < st.prefill_flops_full
            if family == "llava" and method == "tome":  # 16 -> 8 patches over blocks 0..2: 3, 3, 2 (CLS + patches)
                blocks = [(17, 14), (14, 11), (11, 9), (9, 9)]
                tower = flops.vit_flops(model.model.vision_tower) - flops.vit_flops(model.model.vision_tower, blocks)
                projector = 2 * (P - P // 2) * (32 * 64 + 64 * 64)  # linear_1 (32 -> 64), linear_2 (64 -> 64)
                text = model.config.text_config
                llm = sum(flops.decoder_prefill_flops(text, r) - flops.decoder_prefill_flops(text, r - n + k)
                          for r, n, k in zip(real, n_in, kept))
                assert st.prefill_flops_full - st.prefill_flops == llm + 2 * (tower + projector)
    finally:
        for s in spies:
            s.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_rows_alone_and_cache(family, model_factory):
    model = model_factory(family)
    specs = [(3, 1, 4), (9, 1, 2)] if family == "llava_next" else [(3, 1, 4), (9, 2, 2)]
    batch, singles = split_rows(model, family, specs)
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
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw, i=i: lengths.append(
        (i, (a[0] if a else kw["hidden_states"]).shape[1])), with_kwargs=True)
        for i, layer in enumerate(model.model.language_model.layers)]
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
