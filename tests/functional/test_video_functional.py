"""Video functions of vtprune.functional (EVS, VidCom2, frame budgets, DySeg, FastVID) against from-scratch,
line-by-line readings of the official code on seeded inputs with well-separated decisions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import vtprune.functional as F


def rand(seed, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def scenes(seed, sizes, n=16, dim=8, noise=(0.05, 0.6)):
    """A video of scenes: one base frame per scene, each next frame the previous plus noise (alternating small /
    large, so that runs of near-duplicates and near-threshold similarities both occur)."""
    g = torch.Generator().manual_seed(seed)
    frames = []
    for size in sizes:
        base = torch.randn(n, dim, generator=g, dtype=torch.float64) + 3 * torch.randn(
            dim, generator=g, dtype=torch.float64
        )
        for j in range(size):
            if j:
                base = base + noise[j % 2] * torch.randn(n, dim, generator=g, dtype=torch.float64)
            frames.append(base.clone())
    return torch.stack(frames)


# ---------------------------------------------------------------- EVS (vLLM vllm/multimodal/evs.py)


def ref_evs(video, q, merge=2):
    """vLLM compute_retention_mask, read line by line (grid (T, H, W) of patches, spatial merge 2)."""
    t, n, d = video.shape
    h, w = 2 * merge, n // 2 * merge  # n = (H / merge) * (W / merge) with H / merge = 2
    embeds = video.reshape(t * n, d).reshape(t, h // merge, w // merge, d)
    tpf = (h // merge) * (w // merge)
    dis = 1 - torch.nn.functional.cosine_similarity(embeds[1:, ...], embeds[:-1, ...], dim=-1)
    dis = torch.cat([255 * torch.ones_like(embeds[:1, :, :, 0]), dis], dim=0)
    flat = dis.view(-1)
    order = torch.argsort(flat, dim=-1, descending=True, stable=True)
    count = max(tpf, int(tpf * t * (1 - q)))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:count]] = True
    return mask.nonzero().squeeze(1)


@pytest.mark.parametrize("q", [0.0, 0.3, 0.75, 0.9, 0.99])
@pytest.mark.parametrize("t", [1, 2, 7])
def test_evs_matches_vllm(q, t):
    video = rand(t, t, 6, 5)
    kept = F.evs_select(video, q)
    assert kept.dtype == torch.int64
    assert torch.equal(kept, ref_evs(video, q))
    assert torch.equal(kept[:6], torch.arange(6))  # first frame always kept


def test_evs_ties_stable_and_k_option():
    video = torch.ones(3, 4, 5, dtype=torch.float64)  # every later token scores the same: lower index first
    assert torch.equal(F.evs_select(video, 0.5), ref_evs(video, 0.5))
    assert torch.equal(F.evs_select(video, k=6), torch.arange(6))
    assert torch.equal(F.evs_select(video, k=100), torch.arange(12))  # k >= T * N keeps everything
    assert torch.equal(F.evs_select(video.float(), 0.5), F.evs_select(video.bfloat16(), 0.5))


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(4, 5), 0.5), r"\[T, N, D\].*\(4, 5\)"),
        ((torch.zeros(2, 4, 5), 1.0), r"q must be in \[0, 1\), got 1.0"),
        ((torch.zeros(2, 4, 5), -0.1), r"q must be in \[0, 1\)"),
        ((torch.zeros(2, 4, 5),), "exactly one of q"),
    ],
)
def test_evs_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        F.evs_select(*args)
    with pytest.raises(ValueError, match="exactly one"):
        F.evs_select(torch.zeros(2, 4, 5), 0.5, k=3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        F.evs_select(torch.zeros(2, 4, 5), k=0)


# ---------------------------------------------------------------- VidCom2 (token_compressor/vidcom2/vidcom2.py)


def ref_vidcom2(flat, tpf, base_scale):
    """VidCom2 (qwen branch) _compute_keep_indices / vidcom2.py, read line by line."""
    variances = flat.var(dim=0, unbiased=False)
    _, ch = torch.topk(variances, k=int(flat.shape[-1] * 0.5), largest=False)
    sel = flat[:, ch]
    frames = TF.normalize(sel.view(-1, tpf, sel.shape[-1]), dim=-1)
    alphas = [2**k for k in range(-3, 2)]

    def gauss(x, centre):
        dist_sq = ((x - centre) ** 2).sum(dim=-1)
        return sum(torch.exp(-dist_sq / (2 * a)) for a in alphas)

    v = gauss(frames, frames.mean(dim=(0, 1), keepdim=True))
    f = gauss(frames, frames.mean(dim=1, keepdim=True))
    scores = -v.mean(dim=-1)
    probs = TF.softmax((scores - scores.max()) / 0.01, dim=0)
    scales = (base_scale * (1 + probs - probs.mean())).clamp(max=1.0)
    ks = (scales * tpf).round().long().clamp(min=1).tolist()
    out = []
    for i, k in enumerate(ks):
        _, idx = torch.topk((v + f)[i], k=k, largest=False, sorted=False)
        out.append(idx.sort().values + i * tpf)
    return torch.cat(out), ks


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.6, 1.0])
@pytest.mark.parametrize("t", [1, 5])
def test_vidcom2_matches_official(ratio, t):
    video = rand(10 + t, t, 20, 12) * torch.linspace(0.2, 2.0, 12, dtype=torch.float64)  # distinct variances
    video[t // 2] += 1.5 * rand(99, 20, 12)
    kept = F.vidcom2_select(video, ratio)
    want, ks = ref_vidcom2(video.reshape(-1, 12), 20, ratio)
    assert torch.equal(kept, want)
    if t > 1 and ratio < 1:
        assert max(ks) > min(ks)  # the budgets do differ between frames


def test_vidcom2_bad_input():
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\], got 0"):
        F.vidcom2_select(torch.zeros(2, 4, 6), 0)
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\], got 1.5"):
        F.vidcom2_select(torch.zeros(2, 4, 6), 1.5)
    with pytest.raises(ValueError, match=r"\[T, N, D\]"):
        F.vidcom2_select(torch.zeros(8, 6))
    with pytest.raises(ValueError, match="channel"):
        F.vidcom2_select(torch.zeros(2, 4, 1))


# ---------------------------------------------------------------- DySeg (FastVID modeling_qwen2_5_vl.py 1899-1910)


def ref_global(video):
    g = video.mean(1)
    return g / g.norm(dim=1, keepdim=True)


def ref_dyseg(video, c, tau):
    g = ref_global(video)
    sim = (g[:-1] * g[1:]).sum(dim=1)
    cut = torch.topk(sim, c - 1, largest=False).indices
    cos = torch.nonzero(sim < tau).squeeze(1)
    cut = torch.unique(torch.cat([cut, cos])).sort().values
    sizes = [cut[0].item() + 1]
    for i in range(1, cut.shape[0]):
        sizes.append(cut[i].item() - cut[i - 1].item())
    sizes.append(video.shape[0] - cut[-1].item() - 1)
    return sizes


@pytest.mark.parametrize("c, tau", [(2, 0.84), (3, 0.84), (4, 0.99), (8, 0.5)])
def test_dyseg_matches_official(c, tau):
    video = scenes(1, [3, 4, 2, 3])
    assert F.dyseg_segments(video, c, tau) == ref_dyseg(video, c, tau)
    assert sum(F.dyseg_segments(video, c, tau)) == 12


def test_dyseg_short_videos():
    assert F.dyseg_segments(rand(0, 1, 4, 3)) == [1]  # T = 1: one segment (official topk fails)
    video = scenes(2, [1, 1, 1])  # T - 1 < c - 1: every frame its own segment (official topk fails)
    assert F.dyseg_segments(video, c=8, tau=-1.0) == [1, 1, 1]
    with pytest.raises(ValueError, match="c must be in"):
        F.dyseg_segments(video, c=0)


def test_dpc_knn_scores_agree_with_sparsevlm_centres():
    # the shared DPC-KNN scores rank centres as SparseVLM's dpc_knn_merge does (neighbours = clusters there)
    x = rand(6, 30, 5)
    for c in (1, 4, 9):
        scores = F.dpc_knn_scores(x, c)
        assert torch.equal(torch.sort(scores, descending=True, stable=True).indices[:c], F.dpc_knn_merge(x, c)[1])
    assert torch.equal(F.dpc_knn_scores(x[:3], 4), F.dpc_knn_scores(x[:3], 3))  # neighbours clipped to M


# ---------------------------------------------------------------- frame budgets


def test_frame_budgets_rules():
    video = scenes(3, [2, 3, 1], n=10)
    for rule in ("uniform", "uniqueness", "segments"):
        for k in (1, 5, 17, 59, 60):
            counts = F.frame_budgets(video, k, rule)
            assert sum(counts) == k and len(counts) == 6 and all(0 <= x <= 10 for x in counts), (rule, k, counts)
        assert F.frame_budgets(video, 60, rule) == [10] * 6
        assert F.frame_budgets(video[:1], 3, rule) == [3]  # T = 1
    assert F.frame_budgets(video, 17, "uniform") == [3, 3, 3, 3, 3, 2]


def test_frame_budgets_uniqueness_follows_vidcom2():
    video = rand(5, 6, 20, 12) * torch.linspace(0.2, 2.0, 12, dtype=torch.float64)
    video[2] += 1.5 * rand(98, 20, 12)
    _, ks = ref_vidcom2(video.reshape(-1, 12), 20, 0.25)
    counts = F.frame_budgets(video, 30, "uniqueness")  # 0.25 * 6 * 20
    # VidCom2's own counts (round, at least 1) sum to about k; ours sum to k and differ by at most one per frame
    assert all(abs(a - b) <= 1 for a, b in zip(counts, ks)), (counts, ks)
    assert counts.index(max(counts)) == ks.index(max(ks))
    top = ks.index(max(ks))
    capped = F.frame_budgets(video, 100, "uniqueness")  # the unique frame's quota exceeds N: the rest is shared
    assert capped[top] == 20 and sum(capped) == 100


def test_frame_budgets_segments_go_to_anchor_frames():
    video = torch.cat([rand(7, 1, 8, 4).expand(3, 8, 4), rand(8, 1, 8, 4).expand(3, 8, 4)])  # two static scenes
    assert F.dyseg_segments(video, c=2) == [3, 3]
    assert F.frame_budgets(video, 12, "segments", c=2) == [0, 0, 6, 0, 0, 6]  # each scene's last frame
    assert F.frame_budgets(video, 20, "segments", c=2) == [1, 1, 8, 1, 1, 8]  # 10 per scene: 2 over the anchor's N


def test_frame_budgets_bad_input():
    video = torch.zeros(2, 4, 6)
    with pytest.raises(ValueError, match=r"k must be in \[1, 8\]"):
        F.frame_budgets(video, 9, "uniform")
    with pytest.raises(ValueError, match="rule must be one of"):
        F.frame_budgets(video, 4, "video")


# ---------------------------------------------------------------- FastVID (modeling_qwen2_5_vl.py 1889-2095)


def ref_fastvid(video, attn, ratio, c, tau, ignore, d, p, beta, sizes=None, seed=0):
    """FastVID's Qwen2.5-VL forward (the pruning part), read line by line; one video, no text around it."""
    torch.manual_seed(seed)
    frame_num, frm_len, _ = video.shape
    g = ref_global(video)
    sizes = sizes or ref_dyseg(video, c, tau)
    seg_h, seg_a, seg_g = torch.split(video, sizes), torch.split(attn, sizes), torch.split(g, sizes)
    frame_retain_num = int(frm_len * ratio)
    keep, tokens, seg_start = [], [], 0
    for cur_h, cur_a, cur_g in zip(seg_h, seg_a, seg_g):
        seg_len = cur_a.shape[0]
        seg_retain = frame_retain_num * seg_len
        ctx_num = max(int(seg_retain * d), 1)
        sal_num = seg_retain - ctx_num
        if seg_len == 1:
            frm_sal, frm_ctx = [sal_num], [ctx_num]
        else:
            sim = (cur_g[:-1] * cur_g[1:]).sum(dim=1)
            cuts = torch.nonzero(sim < ignore).squeeze(1).sort().values
            if cuts.shape[0] > 0:
                sub = [cuts[0].item() + 1]
                for i in range(1, cuts.shape[0]):
                    sub.append(cuts[i].item() - cuts[i - 1].item())
                sub.append(seg_len - cuts[-1].item() - 1)
            else:
                sub = [seg_len]
            v = len(sub)
            chunk, rem = sal_num // v, sal_num % v
            frm_sal = [chunk + (1 if i < rem else 0) for i in range(v)]
            temp_num = (v + p - 1) // p
            chunk, rem = ctx_num // temp_num, ctx_num % temp_num
            temp_ctx = [chunk + (1 if i < rem else 0) for i in range(temp_num)]
            j, frm_ctx = 0, []
            for i in range(v):
                if i % p == 0:
                    frm_ctx.append(min(temp_ctx[j], frm_len // 2))
                    j += 1
                else:
                    frm_ctx.append(0)
            frm_ctx.reverse()
            vs, vc = [], []
            for i in range(v):
                vs.extend([0] * (sub[i] - 1))
                vc.extend([0] * (sub[i] - 1))
                if frm_ctx[i] == 0:
                    vs.append(min(frm_sal[i], frm_len))
                    vc.append(0)
                else:
                    vc.append(min(frm_ctx[i], frm_len // 2))
                    vs.append(min(frm_sal[i], frm_len - vc[-1]))
            frm_sal, frm_ctx = vs, vc
        sal_idx, ctx_idx = [], []
        for f in range(seg_len):
            top = torch.topk(cur_a[f], frm_sal[f]).indices if frm_sal[f] > 0 else None
            if frm_ctx[f] > 0:
                allidx = torch.arange(frm_len)
                remaining = allidx[~torch.isin(allidx, top)] if top is not None else allidx
                x = cur_h[f][remaining].unsqueeze(0)
                _, n_, d_ = x.shape
                dist = torch.cdist(x.float(), x.float()) / (d_**0.5)
                near, _ = torch.topk(dist, k=4, dim=-1, largest=False)
                dens = (-(near**2).mean(dim=-1)).exp()
                dens = dens + torch.rand(dens.shape, dtype=dens.dtype) * 1e-6
                mask = (dens[:, None, :] > dens[:, :, None]).type(x.dtype)
                dmax = dist.flatten(1).max(dim=-1)[0][:, None, None]
                dd, _ = (dist * mask + dmax * (1 - mask)).min(dim=-1)
                _, picked = torch.topk(dd * dens, k=frm_ctx[f], dim=-1)
                ctx_idx.append(remaining[picked[0].sort().values] + f * frm_len)
            if top is not None:
                sal_idx.append(top + f * frm_len)
        flat = cur_h.reshape(seg_len * frm_len, -1)
        sal_idx = torch.cat(sal_idx)
        allidx = torch.arange(seg_len * frm_len)
        units = flat / flat.norm(dim=-1, keepdim=True)
        merged = []
        for ci in ctx_idx:
            others = allidx[~torch.isin(allidx, torch.cat([sal_idx, ci]))]
            s = torch.mm(units[others], units[ci].T)
            one_hot = torch.zeros(others.shape[0], ci.shape[0], dtype=flat.dtype)
            one_hot.scatter_(1, s.argmax(dim=1).unsqueeze(-1), 1)
            wts = (1 / (one_hot.sum(dim=0).unsqueeze(-1) + 1)).clamp(min=beta)
            counts = one_hot.sum(dim=0).clamp(min=1).unsqueeze(-1)
            agg = torch.mm(one_hot.T, flat[others]) / counts
            merged.append(wts * flat[ci] + (1 - wts) * agg)
        idx = torch.cat([sal_idx, torch.cat(ctx_idx)])
        hid = torch.cat([flat[sal_idx], torch.cat(merged)])
        order = torch.argsort(idx)
        keep.append(idx[order] + seg_start)
        tokens.append(hid[order])
        seg_start += seg_len * frm_len
    return torch.cat(keep), torch.cat(tokens)


@pytest.mark.parametrize(
    "sizes, ratio, c, tau, ignore, d, p",
    [
        ([3, 5, 4], 0.27, 8, 0.84, 0.95, 0.4, 4),  # official defaults
        ([3, 5, 4], 0.27, 3, 0.5, 0.99, 0.4, 2),  # long segments: several runs, two context groups
        ([6, 6], 0.5, 2, 0.0, 0.999, 0.3, 1),  # every run its own context anchor (p = 1)
        ([6, 6], 0.5, 2, 0.0, 0.999, 0.3, 2),  # 4 runs, 2 context groups: the official reversed order
        ([1, 2], 1.0, 8, 0.84, 0.95, 0.4, 4),  # T < c, all tokens budgeted
        ([1], 0.27, 8, 0.84, 0.95, 0.4, 4),  # T = 1
    ],
)
def test_fastvid_matches_official(sizes, ratio, c, tau, ignore, d, p):
    video = scenes(sum(sizes) + len(sizes), sizes)
    attn = torch.softmax(3 * rand(4, sum(sizes), 16), dim=-1)
    t = sum(sizes)
    # T <= c: every frame its own segment (documented deviation: the official topk needs T - 1 >= c - 1)
    segments = [1] * t if t <= c else None
    kept, tokens = F.fastvid_select(video, attn, ratio, c, tau, ignore, d, p, beta=0.6)
    want_kept, want_tokens = ref_fastvid(video, attn, ratio, c, tau, ignore, d, p, 0.6, segments)
    assert kept.dtype == torch.int64 and torch.equal(kept, want_kept)
    assert torch.allclose(tokens, want_tokens, atol=1e-6, rtol=1e-6)
    assert bool((kept[1:] > kept[:-1]).all())


def test_fastvid_bad_input():
    video, attn = rand(0, 2, 8, 4), torch.full((2, 8), 1 / 8)
    with pytest.raises(ValueError, match=r"frame_attn must be \[T, N\] = \(2, 8\)"):
        F.fastvid_select(video, attn[:, :4])
    with pytest.raises(ValueError, match=r"int\(N \* retention_ratio\) must be >= 1"):
        F.fastvid_select(video, attn, retention_ratio=0.1)
    with pytest.raises(ValueError, match=r"retention_ratio must be in \(0, 1\]"):
        F.fastvid_select(video, attn, retention_ratio=1.2)
    with pytest.raises(ValueError, match=r"d must be in \[0, 1\]"):
        F.fastvid_select(video, attn, d=2)
    with pytest.raises(ValueError, match="p must be in"):
        F.fastvid_select(video, attn, p=0)
