"""PruMerge / PruMerge+: the pure function against a literal reading of the official code, bad inputs, the method's
config, and the model-level route on the tiny LLaVA."""

import numpy as np
import pytest
import tiny
import torch
from tiny import make_inputs

import vtprune
from vtprune import functional as F
from vtprune.methods.prumerge import PruMergeConfig

# -- a literal re-implementation of 42Shawn/LLaVA-PruMerge 097c0411, clip_encoder.py (batch of 1) -----------------


def _official_outlier_ratio(attn):  # outlier_dectection, lines 34-47
    attn_np = attn.to(dtype=torch.float32).cpu().numpy().flatten()
    q1, q3 = np.percentile(attn_np, 25), np.percentile(attn_np, 75)
    upper = q3 + 1.5 * (q3 - q1)
    return len(np.where(attn_np > upper)[0]) / len(attn_np)


def _official_complement(idx, dim):  # complement_idx, lines 12-25
    a = torch.arange(dim).unsqueeze(0).expand(idx.shape[0], -1)
    masked = torch.scatter(a, -1, idx, 0)
    compl, _ = torch.sort(masked, dim=-1)
    return compl[:, idx.shape[1] :]


def _official(q, k, image_features, plus):
    """token_prune_merge_advanced(_plus) with if_adaptive=True, from the hooked q/k ``[1, N+1, C]`` and the features
    ``[1, N, C]``: the token list it emits (indices, then the extra row) and the vectors."""
    B, N, C = image_features.shape
    attn = F_softmax((q @ k.transpose(-2, -1)) * C**-0.5)
    cls_attn = attn[:, 0, 1:]
    reduction_ratio = _official_outlier_ratio(cls_attn)
    _, idx = torch.topk(cls_attn, int(N * reduction_ratio), dim=1, largest=True)
    if plus:
        step_length = int(1 / reduction_ratio)
        seq = torch.arange(0, 575, int(step_length / 3))
        flat = idx.flatten()
        filtered = torch.tensor([x for x in seq if x not in flat], dtype=torch.long)
        idx = torch.cat((idx, filtered.unsqueeze(0)), dim=1)
    index = idx.unsqueeze(-1).expand(-1, -1, C)
    key_wo_cls = k[:, 1:]
    x_others = torch.gather(image_features, 1, index)
    x_others_attn = torch.gather(cls_attn, 1, idx)
    key_others = torch.gather(key_wo_cls, 1, index)
    compl = _official_complement(idx, N)
    non_topk = torch.gather(image_features, 1, compl.unsqueeze(-1).expand(-1, -1, C))
    non_topk_key = torch.gather(key_wo_cls, 1, compl.unsqueeze(-1).expand(-1, -1, C))
    non_topk_attn = torch.gather(cls_attn, 1, compl)
    key_others_norm = torch.nn.functional.normalize(key_others, p=2, dim=-1)
    non_topk_key_norm = torch.nn.functional.normalize(non_topk_key, p=2, dim=-1)
    left = x_others.shape[1]
    updated = torch.zeros_like(x_others)
    for i in range(left):
        kn = key_others_norm[0, i].unsqueeze(0).unsqueeze(0)
        rest_x = torch.cat([x_others[0, :i].unsqueeze(0), x_others[0, i + 1 :].unsqueeze(0), non_topk], dim=1)
        rest_attn = torch.cat(
            [x_others_attn[0, :i].unsqueeze(0), x_others_attn[0, i + 1 :].unsqueeze(0), non_topk_attn], dim=1
        )
        rest_keys = torch.cat(
            [key_others_norm[0, :i].unsqueeze(0), key_others_norm[0, i + 1 :].unsqueeze(0), non_topk_key_norm], dim=1
        )
        sim = torch.bmm(kn, rest_keys.transpose(1, 2))
        _, cluster = torch.topk(sim, k=32, dim=2, largest=True)
        tokens = rest_x[:, cluster.squeeze(), :]
        weights = rest_attn[:, cluster.squeeze()].unsqueeze(-1)
        updated[0, i] = x_others[0, i] + torch.sum(tokens * weights, dim=1)
    extra = torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=1, keepdim=True)
    return idx[0], torch.cat([updated, extra], dim=1)[0]


def F_softmax(x):
    return torch.softmax(x, dim=-1)


def _inputs(seed, n=576, c=64, strong=24):
    """q / k of one layer (CLS first) where ``strong`` patches align with the CLS query (clear outliers), and
    features; float64 so that the official float path and ours agree to rounding."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(c, generator=g, dtype=torch.float64)
    k = torch.randn(n + 1, c, generator=g, dtype=torch.float64)
    hot = torch.randperm(n, generator=g)[:strong] + 1
    k[hot] += q * torch.linspace(0.25, 0.5, strong, dtype=torch.float64).unsqueeze(1)
    return q, k, torch.randn(n, c, generator=g, dtype=torch.float64)


def _separated(q, k):
    """The official decisions are well separated: no attention value near the IQR bound, no near ties."""
    a = F.prumerge_attention(q, k)
    q1, q3 = np.percentile(a.numpy(), 25), np.percentile(a.numpy(), 75)
    bound = q3 + 1.5 * (q3 - q1)
    return float((a - bound).abs().min()) > 1e-9 and float(a.sort().values.diff().min()) > 1e-12


@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_select_matches_a_literal_reading_of_the_official_code(plus, seed):
    q, k, x = _inputs(seed)
    assert _separated(q, k)
    kept, merged = F.prumerge_select(q, k, x, plus=plus)
    idx, vectors = _official(q[None, None], k[None], x[None], plus)
    assert kept.tolist() == idx.tolist()  # the emission order: attention-ranked, then PruMerge+'s spatial tokens
    assert merged.shape == (len(idx) + 1, x.shape[1])
    torch.testing.assert_close(merged, vectors, rtol=1e-9, atol=1e-9)
    count = F.prumerge_count(F.prumerge_attention(q, k))
    assert 0 < count < len(kept) if plus else len(kept) == count  # plus adds spatial tokens


def test_count_is_the_iqr_outliers_and_reads_the_official_int_literally():
    row = torch.tensor([1.0] * 10 + [2.0] * 10 + [50.0, 60.0])  # Q1 1, Q3 2, bound 3.5: two outliers
    assert F.prumerge_count(row) == 2
    row49 = torch.cat([torch.ones(24), torch.full((24,), 2.0), torch.tensor([100.0])])  # N = 49, one outlier
    assert F.prumerge_count(row49) == int(49 * (1 / 49)) == 0  # the official int(N * ratio) drops it
    assert F.prumerge_count(torch.ones(16)) == 0


def test_weights_give_the_merged_vectors_and_the_extra_row_sums_the_pruned():
    q, k, x = _inputs(3, n=100, strong=6)
    kept, merged, w = F.prumerge_select(q, k, x, return_weights=True)
    torch.testing.assert_close(merged, w @ x)
    a = F.prumerge_attention(q, k)
    pruned = torch.ones(100, dtype=torch.bool)
    pruned[kept] = False
    torch.testing.assert_close(merged[-1], (a[pruned, None] * x[pruned]).sum(0))
    assert ((w[:-1] > 0).sum(1) == 33).all()  # itself + 32 neighbours
    torch.testing.assert_close(w[torch.arange(len(kept)), kept], 1 + torch.zeros(len(kept), dtype=w.dtype))


@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("keep", [1, 2, 10, 60, 99])
def test_keep_emits_exactly_keep_vectors(plus, keep):
    q, k, x = _inputs(4, n=100, strong=8)
    kept, merged = F.prumerge_select(q, k, x, plus=plus, keep=keep)
    assert merged.shape[0] == keep and kept.numel() == keep - 1 and kept.unique().numel() == keep - 1
    a = F.prumerge_attention(q, k)
    c = F.prumerge_count(a)
    top = torch.argsort(a, descending=True)
    assert kept[: min(c, keep - 1)].tolist() == top[: min(c, keep - 1)].tolist()  # the outliers first
    if not plus:
        assert kept.tolist() == top[: keep - 1].tolist()


def test_keep_plus_spreads_spatial_tokens_with_a_coarser_step():
    q, k, x = _inputs(5, n=100, strong=8)
    c = F.prumerge_count(F.prumerge_attention(q, k))
    kept, _ = F.prumerge_select(q, k, x, plus=True, keep=c + 6)  # 5 slots after the outliers
    spatial = kept[c:]
    assert spatial.numel() == 5 and spatial.tolist() == sorted(spatial.tolist())
    assert int(spatial.max()) > 50  # spread over the image, not the first rows


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((torch.ones(2, 4), torch.ones(5, 4), torch.ones(4, 3)), {}, ValueError, r"query must be 1-D"),
        ((torch.ones(4), torch.ones(5, 3), torch.ones(4, 3)), {}, ValueError, r"must agree on C"),
        ((torch.ones(4), torch.ones(5, 4), torch.ones(3, 3)), {}, ValueError, r"one row per patch"),
        ((torch.ones(4), torch.ones(5, 4), torch.ones(4, 3)), {"plus": 1}, TypeError, r"plus must be a bool"),
        ((torch.ones(4), torch.ones(5, 4), torch.ones(4, 3)), {"keep": 0}, ValueError, r"keep must be in \[1, 4\]"),
        ((torch.ones(4), torch.ones(5, 4), torch.ones(4, 3)), {"keep": 5}, ValueError, r"keep must be in \[1, 4\]"),
        (([1.0], torch.ones(5, 4), torch.ones(4, 3)), {}, TypeError, r"query must be a torch.Tensor"),
    ],
)
def test_bad_inputs_are_refused(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        F.prumerge_select(*args, **kwargs)


# -- the method --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"plus": 1}, TypeError, r"plus must be a bool"),
        ({"count": "iqr"}, ValueError, r"count must be one of \('adaptive', 'budget'\)"),
        ({"count": "budget"}, ValueError, r"count='budget' needs a budget"),
        ({"layer": -1}, ValueError, r"layer must be None or an int >= 0"),
        ({"keep": 0}, ValueError, r"keep must be >= 1"),
    ],
)
def test_bad_options_are_refused_at_construction(options, error, match):
    with pytest.raises(error, match=match):
        PruMergeConfig(**options)


def test_the_count_follows_the_budget_unless_adaptive_is_asked():
    assert PruMergeConfig().adaptive and PruMergeConfig(keep=64, count="adaptive").adaptive
    assert not PruMergeConfig(keep=64).adaptive and not PruMergeConfig(ratio=0.25).adaptive
    assert PruMergeConfig().budget(16) == 15  # nominal, below n so that the method runs


def test_cls_importance_on_a_tower_without_a_cls_token_is_refused_at_patch(model_factory):
    model = model_factory("qwen2_vl")
    with pytest.raises(ValueError, match="importance='received'"):
        vtprune.patch(model, "prumerge", importance="cls")
    assert not vtprune.is_patched(model)


def test_bad_importance_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"importance must be one of \('cls', 'received'\)"):
        PruMergeConfig(importance="row")


# -- other families: a from-scratch reading of the official code on the signals the method received ----------------


def _official_on_scores(cls_attn, keys, feats, plus):
    """The official token list and vectors (``_official`` from step ``if if_adaptive`` on) of one crop, given its
    attention ``[N]``, patch keys ``[N, C]`` and features ``[N, D]``; ``575`` read as ``N - 1``."""
    n = cls_attn.shape[0]
    attn = cls_attn[None]
    ratio = _official_outlier_ratio(attn)
    _, idx = torch.topk(attn, int(n * ratio), dim=1, largest=True)
    if plus:
        seq = torch.arange(0, n - 1, int(int(1 / ratio) / 3))
        filtered = torch.tensor([x for x in seq if x not in idx.flatten()], dtype=torch.long)
        idx = torch.cat((idx, filtered.unsqueeze(0)), dim=1)
    out = []
    others = [i for i in range(n) if i not in idx[0].tolist()]  # the official complement, ascending
    units = torch.nn.functional.normalize(keys, p=2, dim=-1)
    for pos, i in enumerate(idx[0].tolist()):
        rest = idx[0, :pos].tolist() + idx[0, pos + 1 :].tolist() + others
        sim = units[rest] @ units[i]
        near = [rest[j] for j in torch.topk(sim, k=min(32, len(rest))).indices.tolist()]
        out.append(feats[i] + (feats[near] * cls_attn[near, None]).sum(0))
    out.append((feats[others] * cls_attn[others, None]).sum(0))
    return idx[0], torch.stack(out), others


def _recorded(monkeypatch, model, inputs, **options):
    """Run the patched model once; the VisionInputs and Selection of each select call."""
    from vtprune.methods.prumerge import PruMerge

    calls, original = [], PruMerge.select

    def select(self, image):
        out = original(self, image)
        calls.append((image, out))
        return out

    monkeypatch.setattr(PruMerge, "select", select)
    with vtprune.patched(model, "prumerge", **options), torch.no_grad():
        model(**inputs)
    return calls


def _reference(image, attn, keys, plus):
    """Per crop, the official reading on that crop's visual tokens: the image's kept slots (ascending) and their
    projected vectors. ``attn`` ``[C, P]`` / ``keys`` ``[C, P, E]``: each crop patch's attention and key; a token's
    attention is the mean of its patches', its key their concatenation, its feature its projector input row (a
    crop's patch where the projector reads patches, LLaVA; the token's own row where it reads merge units, Qwen)."""
    c, big_p = attn.shape
    rows_per_crop = image.projector_inputs.shape[1]
    x_all = image.projector_inputs.reshape(-1, image.projector_inputs.shape[-1]).float()
    patches = image.token_patches(c, big_p)  # [n, m] flat crop patches per token, -1: none
    slots, vectors = [], []
    for crop in range(c):
        tokens = [t for t in range(image.n) if patches[t, 0] >= 0 and int(patches[t, 0]) // big_p == crop]
        if not tokens:
            continue
        local = patches[tokens] - crop * big_p  # [t, m]
        a = attn[crop][local].mean(1)
        k = keys[crop][local].flatten(1)
        rows = [crop * rows_per_crop + int(local[i, 0]) if rows_per_crop == big_p else t for i, t in enumerate(tokens)]
        idx, merged, others = _official_on_scores(a, k, x_all[rows], plus)
        emitted = [tokens[i] for i in idx.tolist()]
        if others:
            emitted.append(tokens[max(others, key=lambda j: float(a[j]))])
        else:
            merged = merged[:-1]
        slots += emitted
        vectors.append(image.projector(merged))
    order = torch.argsort(torch.tensor(slots))
    return torch.tensor(slots)[order], torch.cat(vectors)[order]


def _peaked(model, names, scale, seed=1):
    """Redraw the weights of the vision attention projections ``names`` (``std = scale / sqrt(fan_in)``, seeded) so
    that the tiny tower's attention has clear IQR outliers, well separated from the bound and from each other (the
    tiny models' own attention is close to uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            w = model.get_submodule(name).weight
            w.copy_(torch.randn(w.shape, generator=g) * scale / w.shape[1] ** 0.5)
    return model


def _check_separated(attn):
    """Each crop's attention: at least one outlier, none near the IQR bound, no near ties."""
    for row in attn:
        q1, q3 = np.percentile(row.numpy(), 25), np.percentile(row.numpy(), 75)
        bound = q3 + 1.5 * (q3 - q1)
        assert F.prumerge_count(row) > 0
        assert float((row - bound).abs().min()) > 0.05 * float(row.mean())
        assert float(row.sort().values.diff().min()) > 1e-5 * float(row.mean())


@pytest.mark.parametrize("plus", [False, True])
def test_anyres_runs_the_official_reading_on_each_crop(monkeypatch, plus):
    model = _peaked(
        tiny.build("llava_next"), [f"model.vision_tower.encoder.layers.3.self_attn.{m}_proj" for m in "qk"], 1.5
    )
    inputs = make_inputs(model, "llava_next", [(3, 1, 5)])
    ((image, sel),) = _recorded(monkeypatch, model, inputs, plus=plus)
    qk = image.vision_qk[:, 0]  # [C, 2, 1+P, E]
    attn = torch.stack([torch.softmax(k @ q[0] * q.shape[-1] ** -0.5, 0)[1:] for q, k in qk])  # official CLS row
    _check_separated(attn)
    slots, vectors = _reference(image, attn, qk[:, 1, 1:], plus)
    assert image.vision_qk.shape[0] == 3  # base crop + a 1 x 2 grid of crops
    assert sel.kept.tolist() == slots.tolist()
    torch.testing.assert_close(sel.merged.float(), vectors, rtol=1e-5, atol=1e-5)


def _qwen_inputs(side=16):
    """One Qwen2-VL image of ``side x side`` patches (``side**2 / 4`` visual tokens, more than PruMerge's 32
    neighbours, so that the key similarity decides which tokens merge) inside a short prompt."""
    g = torch.Generator().manual_seed(0)
    n = side * side // 4
    ids = [5, 6, 7, tiny.VSTART_ID] + [tiny.IMAGE_ID] * n + [tiny.VEND_ID, 8, 9, 10]
    types = [0] * 4 + [1] * n + [0] * 4
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": torch.randn(side * side, 3 * 2 * 14 * 14, generator=g),
        "image_grid_thw": torch.tensor([[1, side, side]]),
        "mm_token_type_ids": torch.tensor([types]),
    }


@pytest.mark.parametrize("plus", [False, True])
def test_no_cls_towers_read_the_received_attention_and_head_mean_keys(monkeypatch, plus):
    model = _peaked(tiny.build("qwen2_vl"), ["model.visual.blocks.1.attn.qkv"], 4.0)
    ((image, sel),) = _recorded(monkeypatch, model, _qwen_inputs(), plus=plus)
    assert image.vision_qk is None and image.cls_attention is None and image.n == 64
    attn = image.received[:, 0].float()  # [1, P]: per patch; a token's is its 2 x 2 unit's mean
    _check_separated(image.pack_crop_scores(attn)[None])
    slots, vectors = _reference(image, attn, image.vision_keys[:, 0], plus)
    assert sel.kept.tolist() == slots.tolist()
    torch.testing.assert_close(sel.merged.float(), vectors, rtol=1e-5, atol=1e-5)


def _route(model, inputs, plus, keep):
    """The unpatched model's own vision states, PruMerge on them (q/k of the last layer recomputed from its input,
    hidden_states[-2]), the merged vectors projected, and the language model fed the text plus those vectors at the
    kept slots, with their original positions: its last logits and the kept slots."""
    inner = model.model
    with torch.no_grad():
        hs = inner.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        layer = inner.vision_tower.encoder.layers[-1]
        x = layer.layer_norm1(hs[-2][0])
        q, k = layer.self_attn.q_proj(x), layer.self_attn.k_proj(x)
        feats = hs[-2][0, 1:]
        kept, merged = F.prumerge_select(q[0], k, feats, plus=plus, keep=keep)
        attn = F.prumerge_attention(q[0], k)
        pruned = torch.ones(feats.shape[0], dtype=torch.bool)
        pruned[kept] = False
        slots = torch.cat([kept, attn.masked_fill(~pruned, -1).argmax().view(1)])
        order = torch.argsort(slots)
        vectors = inner.multi_modal_projector(merged[order])
        ids = inputs["input_ids"][0]
        embeds = inner.get_input_embeddings()(ids)
        visual = (ids == model.config.image_token_id).nonzero().squeeze(1)
        embeds[visual[slots[order]]] = vectors
        keep_mask = ids != model.config.image_token_id
        keep_mask[visual[slots]] = True
        cols = keep_mask.nonzero().squeeze(1)
        out = model(inputs_embeds=embeds[cols][None], position_ids=cols[None], attention_mask=torch.ones(1, len(cols)))
    return out.logits[0, -1], slots.sort().values


@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("keep", [None, 6])
def test_the_patched_model_equals_the_unpatched_model_fed_the_merged_tokens(model_factory, plus, keep):
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(3, 1, 5)])
    expected, slots = _route(model, inputs, plus, keep)
    options = {"plus": plus} if keep is None else {"plus": plus, "keep": keep}
    with vtprune.patched(model, "prumerge", **options), torch.no_grad():
        logits = model(**inputs).logits[0, -1]
        st = vtprune.stats(model)
    assert st.kept_indices[0].tolist() == slots.tolist()
    assert keep is None or st.visual_tokens_kept == [keep]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_adaptive_count_with_a_nominal_budget_is_the_same_at_every_budget(model_factory):
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(3, 1, 5)])
    kept = []
    for keep in (4, 8):
        with vtprune.patched(model, "prumerge", keep=keep, count="adaptive"), torch.no_grad():
            model(**inputs)
            st = vtprune.stats(model)
        assert st.visual_tokens_nominal == [keep]
        kept.append(st.kept_indices[0].tolist())
    assert kept[0] == kept[1]
