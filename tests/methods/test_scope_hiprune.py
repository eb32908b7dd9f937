"""scope and hiprune: the pure functions against from-scratch readings of the official code, their bad inputs, and the
methods on the tiny models against the eager vision tower's own attention (keep-all, batch, cache, every family:
the registry-parametrized tests)."""

import pytest
import torch
from tiny import make_inputs

import vtprune
from vtprune import functional as F


# -- from-scratch readings of the official code (written here, independently of vtprune) ---------------------------
def _scope_official(feats, k, cls_attn, alpha=1.0):
    """kinredon/SCOPE @ 6bf73069, scope/clip_encoder.py SCOPE() lines 140-199, batch of one, as written there."""
    vectors, attn = feats[None], cls_attn[None]
    norm_vectors = vectors / vectors.norm(dim=-1, keepdim=True)
    cosine_simi = torch.bmm(norm_vectors, norm_vectors.transpose(1, 2))
    b, n = vectors.shape[:2]
    selected = torch.zeros(b, n, dtype=torch.bool)
    selected_idx = torch.empty(b, k, dtype=torch.long)
    cur_max = torch.zeros(b, n, dtype=vectors.dtype)
    powered = attn**alpha
    for i in range(k):
        unselected = ~selected
        gains = torch.maximum(
            torch.zeros(1, dtype=vectors.dtype),
            cosine_simi.masked_fill(~unselected.unsqueeze(1), 0) - cur_max.unsqueeze(2),
        ).sum(dim=1)
        gains = gains * powered
        gains = gains.masked_fill(~unselected, float("-inf"))
        best = gains.argmax(dim=1)
        selected[torch.arange(b), best] = True
        selected_idx[:, i] = best
        cur_max = torch.maximum(cur_max, cosine_simi[torch.arange(b), best])
    return sorted(selected_idx[0].tolist())


def _global_attention(attn):
    """[H, 1+N, 1+N] attention probabilities -> [N]: mean over heads, then over queries, CLS key dropped
    (HiPrune llava_arch.py lines 148 / 152)."""
    return attn[None].mean(dim=1).mean(dim=1)[:, 1:][0]


def _hiprune_official(shallow, deep, visual_token_num, alpha, side=24):
    """Danielement321/HiPrune @ 6e83a124, LLaVA/llava/model/llava_arch.py lines 153-174, one image; ``side`` is the
    hard-coded 24 (and 575 = side * side - 1) of the official code."""
    n = shallow.shape[0]
    deep = deep.clone()[None]
    shallow_token_num = round(visual_token_num * float(alpha) / 5)
    idx = torch.topk(shallow[None], k=shallow_token_num, dim=1)[1]
    idx = torch.cat([idx, idx - 1, idx + 1, idx - side, idx + side], dim=1).clamp(0, side * side - 1)
    idx = torch.unique(idx, sorted=False).unsqueeze(0)
    deep_token_num = visual_token_num - idx.shape[1]
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask.scatter_(1, idx, 1)
    deep[0] -= mask.int().squeeze()
    deep_idx = torch.topk(deep[0].unsqueeze(0), k=deep_token_num, dim=1)[1]
    kept = torch.sort(torch.cat([idx, deep_idx], dim=1), dim=1)[0]
    index_mask = torch.zeros(1, n, dtype=torch.bool).scatter_(1, kept, True)
    return index_mask[0].nonzero().squeeze(1).tolist()


def _attention(gen, n, heads=4):
    return torch.softmax(torch.randn(heads, n + 1, n + 1, generator=gen, dtype=torch.float64) * 3, dim=-1)


# -- SCOPE ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,k,alpha", [(576, 32, 1.0), (300, 120, 1.0), (100, 30, 0.5), (100, 30, 0.0), (40, 40, 2.0)])
def test_scope_matches_official_reading(n, k, alpha):
    gen = torch.Generator().manual_seed(n + k)
    feats = torch.randn(n, 32, generator=gen, dtype=torch.float64)
    attn = torch.rand(n, generator=gen, dtype=torch.float64)
    assert F.scope_select(attn, feats, k, alpha).tolist() == _scope_official(feats, k, attn, alpha)


def test_scope_decisions_follow_coverage_and_saliency():
    # four clusters of duplicates: coverage picks one token per cluster before any second; saliency picks which one
    base = torch.eye(4, 8, dtype=torch.float64)
    feats = base.repeat_interleave(3, dim=0)  # tokens 3c, 3c+1, 3c+2 are cluster c
    attn = torch.tensor([1, 3, 2] * 4, dtype=torch.float64)
    assert F.scope_select(attn, feats, 4).tolist() == [1, 4, 7, 10]
    assert F.scope_select(attn, feats, 4).tolist() == _scope_official(feats, 4, attn)
    assert F.scope_select(attn, feats.float(), 4, alpha=0.0).tolist() == [0, 3, 6, 9]  # coverage only: lower index


# -- HiPrune -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,alpha", [(192, 0.1), (128, 0.1), (64, 0.1), (64, 0.5), (100, 1.0), (5, 0.1)])
def test_hiprune_matches_official_reading(k, alpha):
    gen = torch.Generator().manual_seed(k)
    shallow = _global_attention(_attention(gen, 576))
    deep = _global_attention(_attention(gen, 576))
    kept = F.hiprune_select(shallow, deep, k, alpha)
    assert kept.tolist() == _hiprune_official(shallow, deep, k, alpha)
    assert kept.numel() == k


def test_hiprune_neighbours_at_row_ends_and_grid_edges():
    # 4 x 4 grid; 2 anchors (k=10, alpha=1): token 4 (first column of row 1) and token 3 (last column of row 0)
    obj = torch.zeros(16, dtype=torch.float64)
    obj[4], obj[3] = 1.0, 0.9
    deep = torch.arange(16, dtype=torch.float64) / 100  # registers: the highest indices outside the buffer
    kept = F.hiprune_select(obj, deep, 10, alpha=1.0)
    # anchor 4: 3 (row 0's last, no row check), 5, 0 (4 - 4), 8; anchor 3: 2, 4, 0 (3 - 4 clamped to 0), 7
    buffer = {0, 2, 3, 4, 5, 7, 8}
    assert buffer <= set(kept.tolist()) and set(kept.tolist()) - buffer == {13, 14, 15}
    assert kept.tolist() == _hiprune_official(obj, deep, 10, 1.0, side=4)
    # the last row's + width is clamped to the last token
    obj = torch.zeros(16, dtype=torch.float64)
    obj[13] = 1.0
    assert set(F.hiprune_select(obj, -deep, 5, alpha=1.0).tolist()) == {9, 12, 13, 14, 15}


def test_hiprune_counts_and_deviations():
    assert [F.hiprune_anchor_count(k, 0.1) for k in (64, 128, 192, 25, 26)] == [1, 3, 4, 0, 1]  # round half to even
    # a buffer larger than the budget (official: topk of a negative count fails): its highest object attention
    obj = torch.tensor([0.0, 0.5, 0.9, 0.1] + [0.0] * 12)
    kept = F.hiprune_select(obj, torch.rand(16), 3, alpha=1.0)  # 1 anchor (2) + neighbours 1, 3, 0 (clamped), 6
    assert kept.tolist() == [1, 2, 3]
    # a non-square grid needs width; neighbours then step by width
    obj = torch.zeros(12)
    obj[5] = 1.0
    assert set(F.hiprune_select(obj, torch.zeros(12), 5, 1.0, width=4).tolist()) == {1, 4, 5, 6, 9}


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: F.scope_select(torch.rand(5), torch.rand(4, 3), 2), ValueError, "agree on N"),
        (lambda: F.scope_select(torch.rand(5), torch.rand(5, 3), 6), ValueError, "k must be in"),
        (lambda: F.scope_select(torch.rand(5), torch.rand(5, 3), 0), ValueError, "k must be in"),
        (lambda: F.scope_select(torch.rand(5), torch.rand(5, 3), 2, alpha=-1.0), ValueError, "alpha"),
        (lambda: F.scope_select(torch.rand(5), torch.rand(5, 3), 2, alpha=float("nan")), ValueError, "alpha"),
        (lambda: F.scope_select(-torch.rand(5), torch.rand(5, 3), 2), ValueError, ">= 0"),
        (lambda: F.scope_select(torch.rand(5, 1), torch.rand(5, 3), 2), ValueError, "cls_attn"),
        (lambda: F.scope_select([0.1] * 5, torch.rand(5, 3), 2), TypeError, "cls_attn"),
        (lambda: F.scope_select(torch.rand(5), torch.full((5, 3), float("nan")), 2), ValueError, "NaN"),
        (lambda: F.hiprune_select(torch.rand(16), torch.rand(15), 2), ValueError, "agree on N"),
        (lambda: F.hiprune_select(torch.rand(16), torch.rand(16), 17), ValueError, "k must be in"),
        (lambda: F.hiprune_select(torch.rand(16), torch.rand(16), 2, alpha=1.5), ValueError, "alpha"),
        (lambda: F.hiprune_select(torch.rand(12), torch.rand(12), 2), ValueError, "width"),
        (lambda: F.hiprune_select(torch.rand(12), torch.rand(12), 2, width=0), ValueError, "width"),
        (lambda: F.hiprune_select(torch.rand(12), torch.rand(12), 2, width=2.5), TypeError, "width"),
        (lambda: F.hiprune_select(torch.rand(16, 1), torch.rand(16), 2), ValueError, "object_attn"),
        (lambda: F.hiprune_select(torch.rand(16), [0.1] * 16, 2), TypeError, "deep_attn"),
    ],
)
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize(
    "method,options,match",
    [
        ("scope", {"alpha": -0.5}, "alpha"),
        ("scope", {"alpha": "1"}, "alpha"),
        ("scope", {"layer": -1}, "layer"),
        ("scope", {"importance": "max"}, "importance"),
        ("hiprune", {"alpha": 2.0}, "alpha"),
        ("hiprune", {"object_layer": 1.5}, "object_layer"),
        ("hiprune", {"deep_layer": -2}, "deep_layer"),
        ("hiprune", {"importance": "cls_row"}, "importance"),
    ],
)
def test_bad_options_are_refused_at_config(method, options, match):
    config_cls = {"scope": vtprune.ScopeConfig, "hiprune": vtprune.HiPruneConfig}[method]
    with pytest.raises(ValueError, match=match):
        config_cls(keep=4, **options)


@pytest.mark.parametrize("method,option", [("scope", "layer"), ("hiprune", "object_layer"), ("hiprune", "deep_layer")])
def test_layer_out_of_range_is_refused_at_patch(model_factory, method, option):
    model = model_factory("llava")
    with pytest.raises(ValueError, match=f"{option}=9 is out of range"):
        vtprune.patch(model, method, keep=4, **{option: 9})
    assert not vtprune.is_patched(model)


# -- model level: the kept tokens from the eager tower's own attention and hidden states ---------------------------
def _kept(model, inputs, method, **options):
    with vtprune.patched(model, method, **options), torch.no_grad():
        model(**inputs)
        return vtprune.stats(model).kept_indices[0].tolist()


def test_scope_keeps_the_official_tokens_from_the_eager_tower(model_factory):
    model = model_factory("llava", "eager")
    inputs = make_inputs(model, "llava", [(4, 1, 6)])
    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
    attn = out.attentions[-2][0, :, 0, 1:].sum(0).double()  # official: summed over heads (same selection as mean)
    feats = out.hidden_states[-2][0, 1:].double()
    for keep, alpha in [(6, 1.0), (10, 1.0), (5, 0.5)]:
        assert _kept(model, inputs, "scope", keep=keep, alpha=alpha) == _scope_official(feats, keep, attn, alpha)


def test_hiprune_keeps_the_official_tokens_from_the_eager_tower(model_factory):
    model = model_factory("llava", "eager")
    inputs = make_inputs(model, "llava", [(4, 1, 6)])
    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    for keep, alpha, obj_layer in [(12, 1.0, 1), (10, 0.5, 0), (8, 0.5, 1)]:
        shallow = _global_attention(out.attentions[obj_layer][0].double())
        deep = _global_attention(out.attentions[-2][0].double())
        expected = _hiprune_official(shallow, deep, keep, alpha, side=4)
        assert _kept(model, inputs, "hiprune", keep=keep, alpha=alpha, object_layer=obj_layer) == expected


@pytest.mark.parametrize("method", ["scope", "hiprune"])
@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_exact_budget_on_anyres_and_merge_units(model_factory, method, family):
    model = model_factory(family)
    inputs = make_inputs(model, family, [(4, 1, 6)])
    with vtprune.patched(model, method, keep=9, alpha=1.0), torch.no_grad():
        model(**inputs)
        st = vtprune.stats(model)
    assert st.visual_tokens_kept == [9] and len(set(st.kept_indices[0].tolist())) == 9
