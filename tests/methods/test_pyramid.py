"""PyramidDrop (``pdrop``) and SparseVLM (``sparsevlm``): multi-point methods inside the LLM.

* Pure functions against from-scratch readings of the official code (loops, written here) on seeded inputs whose
  decisions are well separated.
* Model level: an independent layer-by-layer route — the UNPATCHED model's decoder layers run one by one by hand,
  each stage's ranking recomputed from scratch (layer K's input norm / q / k with RoPE for PyramidDrop; the pruning
  layer's rater rows for SparseVLM, recycling included), the sequence cut and, ``positions="compact"``, renumbered
  as the official code does — gives the patched model's logits; PyramidDrop with original positions against eager
  attention weights of the unpatched model with masks; every family: per-layer lengths, batch == rows alone, cache
  == no cache (keep-all bit-identical runs in tests/engine/test_patch.py for every registered method).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny import FAMILIES, IMAGE_ID, make_inputs, run_recording_layer_lengths, split_rows
from tiny import greedy as _generate
from tiny import last_logits as _last_logits

import vtprune
from vtprune import functional as F
from vtprune.engine import build_points
from vtprune.methods.pdrop import PDrop, stage_ratios


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- references (from-scratch readings of the official code) -------------------------------------------------------
def _ref_top(scores: list[float], k: int) -> list[int]:
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])


def _ref_pdrop(query, keys, start, n, keep):
    h, s, dh = keys.shape
    avg = [0.0] * s
    for head in range(h):
        logits = [
            sum(float(query[head, d]) * float(keys[head, j, d]) for d in range(dh)) / math.sqrt(dh) for j in range(s)
        ]
        m = max(logits)
        ex = [math.exp(x - m) for x in logits]
        for j in range(s):
            avg[j] += ex[j] / sum(ex) / h
    return _ref_top(avg[start : start + n], keep)


def _ref_dpc_knn(x, c):
    n, d = x.shape
    dist = [[math.dist(x[i].tolist(), x[j].tolist()) / math.sqrt(d) for j in range(n)] for i in range(n)]
    dens = [math.exp(-sum(v**2 for v in sorted(row)[:c]) / c) for row in dist]
    dmax = max(max(row) for row in dist)
    delta = [min([dist[i][j] for j in range(n) if dens[j] > dens[i]] or [dmax]) for i in range(n)]
    score = [delta[i] * dens[i] for i in range(n)]
    centres = sorted(range(n), key=lambda i: (-score[i], i))[:c]
    assign = [min(range(c), key=lambda a: (dist[i][centres[a]], a)) for i in range(n)]
    for a, ci in enumerate(centres):
        assign[ci] = a
    merged = torch.stack(
        [
            x[[i for i in range(n) if assign[i] == a]].double().sum(0)
            / (sum(1 for i in range(n) if assign[i] == a) + 1e-6)
            for a in range(c)
        ]
    )
    return merged, centres


def _ref_sparsevlm(attn, hidden, k):
    """v1.5 ``attn_postprocess_topk`` + the recycling block of ``LlamaModel.forward``."""
    h, r, v = attn.shape
    score = [sum(float(attn[a, b, j]) for a in range(h) for b in range(r)) / (h * r) for j in range(v)]
    kept = _ref_top(score, k)
    pruned = [j for j in range(v) if j not in kept]
    best = sorted(pruned, key=lambda j: (-score[j], j))[: int(len(pruned) * 0.3) + 1]
    merged, centres = _ref_dpc_knn(hidden[best], int(len(best) / 10) + 1)
    return kept, merged, [best[c] for c in centres]


def _ref_sparsevlm_plus(attn, gravity, heads, k):
    """SparseVLM+ (v2.0 9e1f649e): ``attn_logits / rope_weights``, ``select_attn_head_by_sum`` (the ``heads`` heads of
    largest rater x image sum; all of them when there are fewer), then v1.5's ``attn_postprocess_topk``; no
    recycling."""
    h, r, v = attn.shape
    corr = [[[float(attn[a, b, j]) / float(gravity[b, j]) for j in range(v)] for b in range(r)] for a in range(h)]
    mass = [sum(sum(row) for row in corr[a]) for a in range(h)]
    top = sorted(range(h), key=lambda a: (-mass[a], a))[:heads]
    score = [sum(corr[a][b][j] for a in top for b in range(r)) / (len(top) * r) for j in range(v)]
    return _ref_top(score, k)


def _ref_gravity(rows, cols, dh, theta=10000.0):
    """The official all-ones q/k through 1-D RoPE: ``(2 / sqrt(Dh)) sum_f cos(theta_f (p_i - p_j))``."""
    freqs = [theta ** (-2 * f / dh) for f in range(dh // 2)]
    return torch.tensor(
        [[2 * sum(math.cos(w * (p - q)) for w in freqs) / math.sqrt(dh) for q in cols] for p in rows],
        dtype=torch.float64,
    )


def _clusters(gen, groups, size, d=6, spread=0.05):
    centres = torch.randn(groups, d, generator=gen, dtype=torch.float64) * 3
    return centres.repeat_interleave(size, 0) + spread * torch.randn(
        groups * size, d, generator=gen, dtype=torch.float64
    )


# -- pure functions ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_pdrop_select_matches_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    h, s, dh = 3, 20, 8
    keys = torch.randn(h, s, dh, generator=gen, dtype=torch.float64) * 2
    query = torch.randn(h, dh, generator=gen, dtype=torch.float64) * 2
    kept = F.pdrop_select(query, keys, 4, 12, 5)
    assert kept.tolist() == _ref_pdrop(query, keys, 4, 12, 5)
    assert F.pdrop_select(query.float(), keys.float(), 4, 12, 5).tolist() == kept.tolist()


@pytest.mark.parametrize("seed", range(3))
def test_pdrop_select_mask_and_attention_rows(seed):
    """A masked key (padding, a later token, outside a sliding window) is as if absent: the reference run on the
    visible keys only; the engine's route (its own probabilities as ``attention=``) keeps what the reference keeps."""
    gen = torch.Generator().manual_seed(seed)
    h, s, dh = 3, 24, 8
    keys = torch.randn(h, s, dh, generator=gen, dtype=torch.float64) * 2
    query = torch.randn(h, dh, generator=gen, dtype=torch.float64) * 2
    mask = torch.ones(s, dtype=torch.bool)
    mask[:3] = False  # left padding
    mask[20:] = False  # after the query
    visible = mask.nonzero().squeeze(1)
    kept = F.pdrop_select(query, keys, 6, 12, 5, mask=mask)
    assert kept.tolist() == _ref_pdrop(query, keys[:, visible], 3, 12, 5)
    if seed != 1:  # the masked keys change the per-head normalisers, hence the head mean's ranking
        assert kept.tolist() != F.pdrop_select(query, keys, 6, 12, 5).tolist()
    probs = (torch.einsum("hd,hsd->hs", query, keys[:, visible]) / math.sqrt(dh)).softmax(-1)
    rows = torch.zeros(h, s, dtype=torch.float64)
    rows[:, visible] = probs
    assert F.pdrop_select(None, None, 6, 12, 5, attention=rows).tolist() == kept.tolist()
    assert F.pdrop_select(None, None, 6, 12, 5, attention=rows.float()).tolist() == kept.tolist()


def test_sparsevlm_raters_match_reference():
    gen = torch.Generator().manual_seed(0)
    vis, text = torch.randn(12, 5, generator=gen), torch.randn(7, 5, generator=gen)
    m = [0.0] * 7
    for v in range(12):
        logits = [float(vis[v] @ text[t]) for t in range(7)]
        ex = [math.exp(x - max(logits)) for x in logits]
        for t in range(7):
            m[t] += ex[t] / sum(ex) / 12
    assert F.sparsevlm_raters(vis, text).tolist() == [t for t in range(7) if m[t] > sum(m) / 7]
    assert F.sparsevlm_raters(vis, text[:1]).tolist() == [0]  # nothing above the mean: every token rates


@pytest.mark.parametrize("seed", range(3))
def test_dpc_knn_merge_matches_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    x = _clusters(gen, 4, 5)[torch.randperm(20, generator=gen)]
    merged, centres = F.dpc_knn_merge(x, 4)
    ref, ref_centres = _ref_dpc_knn(x, 4)
    assert centres.tolist() == ref_centres
    torch.testing.assert_close(merged, ref.to(merged.dtype), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_sparsevlm_select_matches_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    v = 40
    attn = torch.rand(2, 3, v, generator=gen, dtype=torch.float64).softmax(-1)
    hidden = _clusters(gen, 8, 5)[torch.randperm(v, generator=gen)]
    kept, merged, centres = F.sparsevlm_select(attn, hidden, 10, return_centres=True)
    ref_kept, ref_merged, ref_centres = _ref_sparsevlm(attn, hidden, 10)
    assert kept.tolist() == ref_kept and centres.tolist() == ref_centres
    assert merged.shape == (int((int(30 * 0.3) + 1) / 10) + 1, 6)
    torch.testing.assert_close(merged, ref_merged, rtol=1e-12, atol=1e-12)
    assert F.sparsevlm_select(attn, hidden, 10, recycle=False)[1].shape == (0, 6)


@pytest.mark.parametrize("seed", range(3))
def test_sparsevlm_plus_matches_reference(seed):
    """Gravity correction and priority heads against the reading of the v2.0 code; the gravity term of 1-D RoPE
    against its closed form, from the rotated all-ones vectors."""
    gen = torch.Generator().manual_seed(seed)
    h, r, v, dh = 6, 3, 40, 8
    attn = torch.rand(h, r, v, generator=gen, dtype=torch.float64).softmax(-1)
    attn[seed] *= 3  # one head with a clearly larger mass
    rows, cols = [50, 52, 55], list(range(5, 45))
    gravity = _ref_gravity(rows, cols, dh)
    for heads in (2, 6, 14):
        corrected = F.sparsevlm_plus_attention(attn, gravity, heads)
        assert corrected.shape[0] == min(heads, h)
        kept, merged = F.sparsevlm_select(corrected, torch.zeros(v, 4, dtype=torch.float64), 10, recycle=False)
        assert kept.tolist() == _ref_sparsevlm_plus(attn, gravity, heads, 10) and merged.shape[0] == 0
    pos = torch.arange(60, dtype=torch.float64)
    inv = 10000.0 ** (-torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    angles = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)
    ones = torch.ones(60, dh, dtype=torch.float64)
    rotated = _rotate(ones, angles.cos(), angles.sin())
    torch.testing.assert_close(F.rope_gravity(rotated[rows], rotated[cols]), gravity)


def test_sparsevlm_rank_count():
    p = torch.zeros(1, 4, 10, dtype=torch.float64)
    p[0, :2] = torch.rand(2, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p[0, 2] = p[0, 0] + p[0, 1]  # rank 2
    assert F.sparsevlm_rank_count(p, 13.5, 0) == 9  # min(int(2 * 13.5), 10 - 1)
    assert F.sparsevlm_rank_count(p, 0.8, 0) == 1
    assert F.sparsevlm_rank_count(p, 9, 6) == 9
    full = torch.eye(3, dtype=torch.float64)[None]
    assert F.sparsevlm_rank_count(full, 13.5, 0) == 3  # rank == V: the official layer prunes nothing


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (
            lambda: F.pdrop_select(torch.zeros(2, 4), torch.zeros(2, 5, 3), 0, 5, 2),
            ValueError,
            r"query must be \[H, Dh\]",
        ),
        (lambda: F.pdrop_select(torch.zeros(2, 3), torch.zeros(2, 5, 3), 3, 5, 2), ValueError, "inside the 5 keys"),
        (
            lambda: F.pdrop_select(torch.zeros(2, 3), torch.zeros(2, 5, 3), 0, 5, 6),
            ValueError,
            r"k must be in \[1, 5\]",
        ),
        (
            lambda: F.pdrop_select(torch.zeros(2, 3), torch.zeros(2, 5, 3), 0, 5, 2, attention=torch.zeros(2, 5)),
            ValueError,
            "either attention=",
        ),
        (lambda: F.pdrop_select(None, None, 0, 5, 2), ValueError, "or attention="),
        (lambda: F.pdrop_select(None, None, 3, 5, 2, attention=torch.zeros(2, 5)), ValueError, "inside the 5 keys"),
        (
            lambda: F.pdrop_select(torch.zeros(2, 3), torch.zeros(2, 5, 3), 0, 5, 2, mask=torch.zeros(5).bool()),
            ValueError,
            "at least one True",
        ),
        (lambda: F.sparsevlm_raters(torch.zeros(3, 4), torch.zeros(2, 5)), ValueError, "must share D"),
        (lambda: F.sparsevlm_select(torch.zeros(2, 3, 5), torch.zeros(4, 2), 2), ValueError, "one row per image token"),
        (lambda: F.sparsevlm_select(torch.zeros(3, 5), torch.zeros(5, 2), 2), ValueError, r"\[H, R, V\]"),
        (lambda: F.sparsevlm_rank_count(torch.zeros(1, 2, 3), float("nan"), 0), ValueError, "scale must be a finite"),
        (lambda: F.dpc_knn_merge(torch.zeros(4, 2), 5), ValueError, r"k must be in \[1, 4\]"),
        (
            lambda: F.sparsevlm_plus_attention(torch.ones(2, 3, 5), torch.ones(3, 4)),
            ValueError,
            r"gravity must be \[R, V\]",
        ),
        (lambda: F.sparsevlm_plus_attention(torch.ones(2, 3, 5), torch.ones(3, 5), 0), ValueError, r"heads must be in"),
        (lambda: F.rope_gravity(torch.ones(3, 4), torch.ones(5, 6)), ValueError, "agree on Dh"),
    ],
)
def test_pure_functions_reject_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# -- budgets -------------------------------------------------------------------------------------------------------
def test_pdrop_budget_maps_to_the_official_pyramid():
    method = PDrop(vtprune.PDropConfig(ratio=15 / 32))  # (8 + 8 / 2 + 8 / 4 + 8 / 8) / 32 of the image
    assert method.layers(32) == [8, 16, 24]
    assert method.schedule(576, 32) == {8: 288, 16: 144, 24: 72}
    assert PDrop(vtprune.PDropConfig(ratios=(0.5, 0.25, 0.125))).schedule(576, 32) == {8: 288, 16: 144, 24: 72}
    ratios = stage_ratios(576, 192.0, [2, 6, 12], 32)  # an average of 192 tokens per layer
    bounds = [2, 6, 12, 32]
    average = (2 * 576 + sum((bounds[s + 1] - bounds[s]) * 576 * ratios[s] for s in range(3))) / 32
    assert abs(average - 192) < 1e-6 and ratios[1] == pytest.approx(ratios[0] ** 2)
    with pytest.raises(ValueError, match="first 8 layers alone average 144"):
        PDrop(vtprune.PDropConfig(keep=64)).schedule(576, 32)


def test_pdrop_last_stage_budget_and_shallow_models():
    last = PDrop(vtprune.PDropConfig(keep=64, budget_kind="last"))
    assert last.layers(32) == [8, 16, 24] and last.schedule(576, 32) == {8: 276, 16: 133, 24: 64}  # lam = (1/9)^(1/3)
    shallow = PDrop(vtprune.PDropConfig(keep=64, budget_kind="last"))
    assert shallow.layers(3) == [1, 2] and shallow.schedule(256, 3) == {1: 128, 2: 64}  # the demo model
    with pytest.raises(ValueError, match="room for only 2 of the 3"):
        PDrop(vtprune.PDropConfig(ratios=(0.5, 0.25, 0.125))).layers(3)


def test_sparsevlm_counts_follow_the_official_table():
    method = vtprune.registry.get_method("sparsevlm").method_cls(vtprune.SparseVLMConfig(keep=128))
    assert method.layers(32) == [3, 7, 16]  # after the official pruning layers 2, 6, 15
    assert method.counts(576, 3) == [303, 110, 36]
    points = {p.layer: p for p in build_points([method], 32)}  # the plan's points carry the model's depth
    assert [points[k].budget(576, 576) for k in (3, 7, 16)] == [303, 110, 36]
    assert points[7].budget(100, 576) == 100  # a count at or above the tokens left keeps them all
    shallow = vtprune.registry.get_method("sparsevlm").method_cls(vtprune.SparseVLMConfig(keep=64))
    assert shallow.layers(3) == [1, 2] and shallow.counts(256, 2) == [round(c * 64 / 128) for c in (110, 36)]
    half = vtprune.registry.get_method("sparsevlm").method_cls(vtprune.SparseVLMConfig(keep=96))
    half.layers(32)
    assert half.counts(288, 3) == [round(c * 96 / 192) for c in (300, 200, 110)]  # 1/3 of 288: the 192 row, halved


@pytest.mark.parametrize(
    "options,exc,match",
    [
        (dict(method="pdrop", keep=4, ratios=(0.5,)), ValueError, "not both"),
        (dict(method="pdrop", ratios=(0.25, 0.5)), ValueError, "must not increase"),
        (dict(method="pdrop", ratios=(0.5, 0.25), layers=(1,)), ValueError, "one entry per stage"),
        (dict(method="pdrop", ratio=0.5, layers=(2, 1)), ValueError, "strictly ascending"),
        (dict(method="pdrop", ratio=0.5, layers=(1, 4)), ValueError, "layer=4 is out of range"),
        (dict(method="pdrop", ratio=0.5, layers="12"), TypeError, "layers must be a sequence"),
        (dict(method="pdrop", ratio=0.5, budget_kind="final"), ValueError, "budget_kind must be one of"),
        (dict(method="pdrop", ratios=(0.5,), budget_kind="last"), ValueError, "not to an explicit ratios"),
        (dict(method="sparsevlm", keep=4, version="v2.0"), ValueError, "SparseVLM\\+"),
        (dict(method="sparsevlm", keep=4, counts=(3, 2)), ValueError, "not both"),
        (dict(method="sparsevlm", counts=(3, 2), layers=(0, 1, 2)), ValueError, "one entry per pruning layer"),
        (dict(method="sparsevlm", keep=4, scale=2.0, bias=0.0), ValueError, "apply to version='v1'"),
        (dict(method="sparsevlm", keep=4, version="v1", scale=2.0), ValueError, "together"),
        (
            dict(method="sparsevlm", keep=4, layers=(0, 3)),
            ValueError,
            r"pruning layer\(s\) \[3\] of layers=\[0, 3\] out of "
            r"range .* 0 <= l <= 2",
        ),
        (dict(method="sparsevlm", keep=4, layers=(1, 1)), ValueError, r"strictly ascending .*got \[1, 1\]"),
        (
            dict(method="sparsevlm", keep=4, family="qwen3_5"),
            ValueError,
            r"layer\(s\) \[0\] of layers=\[0, 1, 2\] are \['linear_attention'\].*layers=.* from \[1, 2\]",
        ),
        (dict(method="sparsevlm", keep=4, recycle=1), TypeError, "recycle must be None .*, True or False"),
        (dict(method="sparsevlm", keep=4, heads=4), ValueError, "heads= .* applies to version='v2'"),
        (dict(method="sparsevlm", keep=4, version="v2", heads=0), ValueError, "heads must be an int >= 1"),
        (dict(method="sparsevlm", keep=4, version="v3"), ValueError, "'v2' SparseVLM\\+"),
        (dict(method="sparsevlm", version="v2", scale=1.0, bias=0.0), ValueError, "v2 takes counts="),
        (dict(method="pdrop", ratio=0.5, positions="compact", family="qwen2_vl"), ValueError, "3-D M-RoPE"),
    ],
)
def test_bad_options_raise_clear_errors(options, exc, match, model_factory):
    options = dict(options)
    model = model_factory(options.pop("family", "llava"))
    with pytest.raises(exc, match=match):
        vtprune.patch(model, options.pop("method"), **options)
    assert not vtprune.is_patched(model)


@pytest.mark.parametrize("version", ["v1.5", "v1", "v2"])
def test_sparsevlm_budget_of_every_token_keeps_them_all(version, model_factory):
    """keep >= the image's tokens prunes nothing, as ratio=1 (the scaled official counts would still drop some)."""
    from tiny import assert_keep_all_is_bit_identical

    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(3, 1, 4)])
    n = int((inputs["input_ids"] == IMAGE_ID).sum())
    assert_keep_all_is_bit_identical(model, inputs, "sparsevlm", keep=n, version=version)


def test_infeasible_average_budget_fails_at_patch(model_factory):
    """LLaVA-1.5 fixes the image's tokens (16 here): keep=3 is refused at patch, naming the floor, not from a hook at
    the first forward. ratio= is checked on any model; keep= where the count varies fails at the forward."""
    model = model_factory("llava")
    with pytest.raises(ValueError, match="average 4 of the image's 16"):
        vtprune.patch(model, "pdrop", keep=3)
    assert not vtprune.is_patched(model)
    with pytest.raises(ValueError, match=r"ratio=0.2 .*first drop after layer 1 of 4.* ratio above 0.25"):
        vtprune.patch(model_factory("qwen2_vl"), "pdrop", ratio=0.2)
    anyres = model_factory("llava_next")
    inputs = make_inputs(anyres, "llava_next", [(5, 1, 4)])
    with vtprune.patched(anyres, "pdrop", keep=3), pytest.raises(ValueError, match="cannot be met"):
        anyres(**inputs)
    vtprune.patch(model, "pdrop", keep=5)  # above the floor
    vtprune.unpatch(model)


def test_sparsevlm_counts_for_more_layers_than_the_table_fail_at_patch():
    from vtprune.methods.sparsevlm import SparseVLM

    method = SparseVLM(vtprune.SparseVLMConfig(keep=8, layers=(0, 1, 2, 3)))
    with pytest.raises(ValueError, match="official counts .* are for 3 pruning layers, got 4"):
        method.check_budget(6, 16)
    SparseVLM(vtprune.SparseVLMConfig(counts=(8, 6, 4, 2), layers=(0, 1, 2, 3))).check_budget(6, 16)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_tokens_is_the_placeholder_count(family, model_factory):
    """The adapter's fixed per-image token count (what patch checks budgets against) is the model's, or None."""
    from vtprune.adapters import get_adapter

    model = model_factory(family)
    tokens = get_adapter(model).image_tokens()
    assert tokens is None or family in ("llava", "gemma3")
    if tokens is not None:
        inputs = make_inputs(model, family, [(3, 2, 4)])
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2 * tokens


# -- model level: every family -------------------------------------------------------------------------------------
CONFIGS = {
    "pdrop": vtprune.PDropConfig(ratios=(0.5, 0.25, 0.125)),
    "pdrop-budget": vtprune.PDropConfig(ratio=0.5),
    "sparsevlm": vtprune.SparseVLMConfig(counts=(8, 5, 3)),
    "sparsevlm-v1": vtprune.SparseVLMConfig(version="v1", scale=0.8, bias=1.0, layers=(0, 1, 2)),
    "sparsevlm-v2": vtprune.SparseVLMConfig(version="v2", counts=(8, 5, 3), heads=2),  # SparseVLM+
}
#: the tiny Qwen3.5's layers 0 and 3 are linear attention, which these points read: refused there (the points
#: that run on it are tested in tests/adapters/test_qwen3.py)
CASES = [
    pytest.param(name, family, id=f"{name}-{family}")
    for name in CONFIGS
    for family in FAMILIES
    if not family.startswith("qwen3_5")
]


@pytest.mark.parametrize("name,family", CASES)
def test_each_stage_sees_its_count_and_stats_per_point(name, family, model_factory):
    model = model_factory(family)
    inputs = make_inputs(model, family, [(6, 1, 5)])
    seq = inputs["input_ids"].shape[1]
    seen, st = run_recording_layer_lengths(model, inputs, CONFIGS[name])
    n = st.visual_tokens_in[0]
    assert [s.layer for s in st.stages] == [1, 2, 3] and all(s.method == name.split("-")[0] for s in st.stages)
    counts = [n] + [s.visual_tokens_kept[0] for s in st.stages]
    assert counts == sorted(counts, reverse=True) and counts[-1] < n
    if name == "pdrop":
        assert counts[1:] == [int(n * r) for r in (0.5, 0.25, 0.125)]
    if name == "sparsevlm":  # kept + int(int(0.3 P) + 1) / 10) + 1 recycled tokens per pruning layer
        expected, left = [], n
        for c in (8, 5, 3):
            if c >= left:
                expected.append(left)
                continue
            expected.append(c + int((int((left - c) * 0.3) + 1) / 10) + 1)
            left = expected[-1]
        assert counts[1:] == expected
    assert seen == [(i, seq - n + counts[i]) for i in range(4)]
    assert st.visual_tokens_kept == [counts[-1]] and len(st.kept_indices[0]) == counts[-1]
    assert st.prefill_flops < st.prefill_flops_full


@pytest.mark.parametrize("name,family", CASES)
def test_batch_equals_rows_alone_and_cache_equals_no_cache(name, family, model_factory):
    model = model_factory(family)
    specs = [(3, 1, 4), (9, 2, 2), (2, 1, 12)] if family != "llava_next" else [(3, 1, 4), (2, 1, 9)]
    batch, singles = split_rows(model, family, specs)
    with vtprune.patched(model, CONFIGS[name]):
        logits = _last_logits(model, batch)
        tokens = _generate(model, batch)
        stages = [s.visual_tokens_kept for s in vtprune.stats(model).stages]
        for i, one in enumerate(singles):
            torch.testing.assert_close(_last_logits(model, one)[0], logits[i], rtol=1e-4, atol=1e-4)
            assert [s.visual_tokens_kept for s in vtprune.stats(model).stages] == [[s[i]] for s in stages]
            assert torch.equal(_generate(model, one)[0], tokens[i])
        assert torch.equal(_generate(model, batch, use_cache=False), tokens)


@pytest.mark.parametrize("name", ["pdrop", "sparsevlm"])
def test_compact_positions_cache_equals_no_cache(name, model_factory):
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(5, 1, 4), (2, 1, 9)])
    cfg = vtprune.PruneConfig.from_dict({**CONFIGS[name].to_dict(), "positions": "compact"})
    with vtprune.patched(model, cfg):
        run = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        with torch.no_grad():
            cached = model.generate(**inputs, use_cache=True, **run)
            uncached = model.generate(**inputs, use_cache=False, **run)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), rtol=1e-4, atol=1e-5)


# -- independent routes: the unpatched model's layers run one by one ----------------------------------------------
def _rope(lm, h, pos):
    return lm.rotary_emb(h, pos[None])


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _qk(layer, x, cos, sin):
    """Post-RoPE q [H, S, Dh], k [H, S, Dh] (kv heads expanded) of ``layer`` on its input ``x`` [S, D]."""
    attn = layer.self_attn
    dh = attn.head_dim
    y = layer.input_layernorm(x)
    q = attn.q_proj(y).view(x.shape[0], -1, dh).transpose(0, 1)
    k = attn.k_proj(y).view(x.shape[0], -1, dh).transpose(0, 1)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    return q, k.repeat_interleave(q.shape[0] // k.shape[0], 0)


def _route(model, inputs, name, compact):
    """Row 0 by hand: returns (last logits, [count per stage])."""
    inner, lm = model.model, model.model.language_model
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        x = inner.get_input_embeddings()(ids)
        visual = (ids == IMAGE_ID).nonzero().squeeze(1)
        x[visual] = inner.get_image_features(inputs["pixel_values"]).pooler_output[0]
        embeds = x.clone()
        start, n0 = int(visual[0]), visual.numel()
        n = n0
        pos = torch.arange(ids.numel())
        counts = []
        if name == "sparsevlm":
            text = torch.arange(start + n0, ids.numel())
            m = (embeds[visual] @ embeds[text].T).softmax(1).mean(0)
            raters = text[m > m.mean()] - (start + n0)  # relative to the text's start
        for i, layer in enumerate(lm.layers):
            cos, sin = (t[0] for t in _rope(lm, x, pos))
            if name == "pdrop" and i in (1, 2, 3):  # rank with layer i on its input, drop, then run layer i
                q, k = _qk(layer, x, cos, sin)
                s = x.shape[0]
                logits = (q[:, -1:] @ k.transpose(1, 2))[:, 0] / math.sqrt(q.shape[-1])
                p = logits.softmax(-1).mean(0)[start : start + n]
                keep = int(n0 * {1: 0.5, 2: 0.25, 3: 0.125}[i])
                top = torch.tensor(_ref_top(p.tolist(), keep)) + start
                cols = torch.cat([torch.arange(start), top, torch.arange(start + n, s)])
                x, pos, n = x[cols], (torch.arange(cols.numel()) if compact else pos[cols]), keep
                counts.append(n)
                cos, sin = (t[0] for t in _rope(lm, x, pos))
            out = layer(x[None], attention_mask=None, position_embeddings=(cos[None], sin[None]), position_ids=None)
            y = (out[0] if isinstance(out, tuple) else out)[0]
            if name == "sparsevlm" and i in (0, 1, 2):  # rank with layer i's own attention, prune its output
                q, k = _qk(layer, x, cos, sin)
                rows = start + n + raters
                logits = (q[:, rows] @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])
                causal = torch.arange(x.shape[0])[None, :] <= rows[:, None]
                attn = logits.masked_fill(~causal, float("-inf")).softmax(-1)[:, :, start : start + n]
                kept, merged, centres = _ref_sparsevlm(
                    attn.double(), y[start : start + n].double(), min((8, 5, 3)[i], n - 1)
                )
                kept = torch.tensor(kept)
                if compact:
                    y = torch.cat([y[:start], y[start + kept], merged.to(y.dtype), y[start + n :]])
                    pos = torch.arange(y.shape[0])
                else:
                    carriers = torch.cat([kept, torch.tensor(centres)]).sort().values
                    img = y[start + carriers].clone()
                    img[torch.searchsorted(carriers, torch.tensor(centres))] = merged.to(y.dtype)
                    y = torch.cat([y[:start], img, y[start + n :]])
                    pos = torch.cat([pos[:start], pos[start + carriers], pos[start + n :]])
                n = kept.numel() + merged.shape[0]
                counts.append(n)
            x = y
        return model.lm_head(lm.norm(x))[-1].float(), counts


@pytest.mark.parametrize("name", ["pdrop", "sparsevlm"])
@pytest.mark.parametrize("compact", [False, True], ids=["original", "compact"])
def test_equals_layer_by_layer_route(name, compact, model_factory):
    model = copy.deepcopy(model_factory("llava"))  # norms with non-unit weights: layer K's input norm is not K-1's
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.input_layernorm.weight.copy_(0.5 + torch.rand(layer.input_layernorm.weight.shape, generator=gen))
    inputs = make_inputs(model, "llava", [(6, 1, 5)])
    cfg = vtprune.PruneConfig.from_dict({**CONFIGS[name].to_dict(), "positions": "compact" if compact else "original"})
    with vtprune.patched(model, cfg), torch.no_grad():
        logits = model(**inputs).logits[0, -1].float()
        st = vtprune.stats(model)
    ref, counts = _route(model, inputs, name, compact)
    assert [s.visual_tokens_kept[0] for s in st.stages] == counts
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def _live_route(model, inputs, name):
    """Row 0 on the UNPATCHED model at its own positions (any family): every layer sees the whole prompt, with a 4-D
    mask hiding the tokens dropped so far; each stage's ranking is recomputed by hand in hooks — PyramidDrop from
    layer K's input (pre-hook), SparseVLM from the pruning layer's input and output (its merged tokens overwrite
    their centres' rows, as the default position rule says). Returns (last logits, [count per stage])."""
    lm = model.model.language_model
    ids = inputs["input_ids"][0]
    s = ids.numel()
    visual = (ids == IMAGE_ID).nonzero().squeeze(1)
    n0 = visual.numel()
    text = torch.arange(int(visual[-1]) + 1, s)
    present = visual.clone()  # columns of the image's tokens still in the sequence
    hidden = torch.zeros(s, dtype=torch.bool)
    state, counts = {}, []

    def mask(dtype):
        allowed = torch.ones(s, s, dtype=torch.bool).tril() & ~hidden[None, :]
        return torch.zeros(s, s, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]

    def pre(i):
        def hook(mod, args, kwargs):
            nonlocal present
            x = (args[0] if args else kwargs["hidden_states"])[0]
            if i == 0:
                state["embeds"] = x.clone()
            cos, sin = (t[0] for t in kwargs["position_embeddings"])
            if name == "pdrop" and i in (1, 2, 3):
                q, k = _qk(mod, x, cos, sin)
                logits = (q[:, -1:] @ k.transpose(1, 2))[:, 0] / math.sqrt(q.shape[-1])
                p = logits.masked_fill(hidden[None], float("-inf")).softmax(-1).mean(0)[present]
                keep = int(n0 * {1: 0.5, 2: 0.25, 3: 0.125}[i])
                drop = present[[j for j in range(present.numel()) if j not in _ref_top(p.tolist(), keep)]]
                hidden[drop] = True
                present = present[torch.tensor(_ref_top(p.tolist(), keep))]
                counts.append(keep)
            state["x"], state["rope"] = x, (cos, sin)
            kwargs["attention_mask"] = mask(x.dtype)
            return args, kwargs

        return hook

    def post(i):
        def hook(mod, args, kwargs, out):
            nonlocal present
            if not name.startswith("sparsevlm") or i not in (0, 1, 2):
                return None
            y = out[0] if isinstance(out, tuple) else out
            x, (cos, sin) = state["x"], state["rope"]
            emb = state["embeds"]
            m = (emb[visual] @ emb[text].T).softmax(1).mean(0)
            raters = text[m > m.mean()]
            q, k = _qk(mod, x, cos, sin)
            logits = (q[:, raters] @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])
            visible = (torch.arange(s)[None, :] <= raters[:, None]) & ~hidden[None, :]
            attn = logits.masked_fill(~visible, float("-inf")).softmax(-1)[:, :, present]
            n = present.numel()
            if name == "sparsevlm-v2":  # SparseVLM+: gravity of the rotated all-ones vectors, 2 priority heads
                ones = _rotate(torch.ones(s, q.shape[-1], dtype=torch.float64), cos.double(), sin.double())
                gravity = ones[raters] @ ones[present].T / math.sqrt(q.shape[-1])
                kept = _ref_sparsevlm_plus(attn.double(), gravity, 2, min((8, 5, 3)[i], n - 1))
                hidden[present[[j for j in range(n) if j not in kept]]] = True
                present = present[kept]
                counts.append(present.numel())
                return None
            kept, merged, centres = _ref_sparsevlm(attn.double(), y[0, present].double(), min((8, 5, 3)[i], n - 1))
            y = y.clone()
            y[0, present[centres]] = merged.to(y.dtype)
            carriers = torch.tensor(sorted(kept + centres))
            hidden[present[[j for j in range(n) if j not in carriers.tolist()]]] = True
            present = present[carriers]
            counts.append(present.numel())
            return (y, *out[1:]) if isinstance(out, tuple) else y

        return hook

    hooks = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(lm.layers)]
    hooks += [layer.register_forward_hook(post(i), with_kwargs=True) for i, layer in enumerate(lm.layers)]
    try:
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1].float()
    finally:
        for h in hooks:
            h.remove()
    return logits, counts


@pytest.mark.parametrize("name", ["pdrop", "sparsevlm", "sparsevlm-v2"])
@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])  # llava_next: 2 clusters
def test_original_positions_equal_masked_route_on_the_unpatched_model(name, family, model_factory):
    model = copy.deepcopy(model_factory(family))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.input_layernorm.weight.copy_(0.5 + torch.rand(layer.input_layernorm.weight.shape, generator=gen))
    inputs = make_inputs(model, family, [(6, 1, 5)])
    with vtprune.patched(model, CONFIGS[name]), torch.no_grad():
        logits = model(**inputs).logits[0, -1].float()
        st = vtprune.stats(model)
    ref, counts = _live_route(model, inputs, name)
    assert [s.visual_tokens_kept[0] for s in st.stages] == counts
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_sparsevlm_weights_reproduce_the_merged_tokens():
    """The recycling weights (how the engine merges Qwen3-VL's DeepStack levels the same way) give the merged
    vectors: ``weights @ hidden == merged``, each row summing to count / (count + 1e-6) over its cluster."""
    from vtprune import functional as F

    gen = torch.Generator().manual_seed(3)
    attn = torch.rand(2, 3, 40, generator=gen).softmax(-1)
    hidden = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    kept, merged, centres, weights = F.sparsevlm_select(attn, hidden, 10, return_weights=True)
    assert weights.shape == (centres.numel(), 40) and not bool(weights[:, kept].any())
    torch.testing.assert_close(weights.double() @ hidden, merged, rtol=1e-6, atol=1e-6)
    assert torch.equal(F.sparsevlm_select(attn, hidden, 10, return_centres=True)[2], centres)
