"""``vtprune.functional.vit`` against from-scratch readings of the official codes on seeded inputs.

The readings below follow the official code paths step by step (facebookresearch/ToMe ``tome/merge.py``
``bipartite_soft_matching`` + ``merge_wavg``; hchautran/PiToMe ``algo/pitome/merge.py`` ``pitome`` /
``pitome_bsm`` + ``merge_wavg``; Zero-TPrune's WPR as Algorithm 1 of the paper states it, with an explicit loop over
tokens) and share no code with the library.
"""

import math

import pytest
import torch

from vtprune.functional import vit as V


def _official_tome(metric, x, size, r, class_token, distill_token):
    """A reading of ToMe's bipartite_soft_matching followed by merge_wavg (gather / scatter_reduce route)."""
    t = metric.shape[1]
    protected = int(class_token) + int(distill_token)
    r = min(r, (t - protected) // 2)
    m = metric / metric.norm(dim=-1, keepdim=True)
    a, b = m[..., ::2, :], m[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    if distill_token:
        scores[..., :, 0] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]

    def merge(y, mode):
        src, dst = y[..., ::2, :], y[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    if size is None:
        size = torch.ones_like(x[..., 0, None])
    out = merge(x * size, "sum")
    size = merge(size, "sum")
    return out / size, size


@pytest.mark.parametrize("class_token,distill_token", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("r", [1, 7, 40])
def test_tome_matches_official(class_token, distill_token, r):
    g = torch.Generator().manual_seed(r)
    b, t, c = 3, 27, 16
    metric = torch.randn(b, t, 8, generator=g)
    x = torch.randn(b, t, c, generator=g)
    size = torch.randint(1, 4, (b, t, 1), generator=g).float()
    ref, ref_size = _official_tome(metric.clone(), x, size, r, class_token, distill_token)
    dest, t_out = V.tome_match(metric, r, protected=int(class_token) + int(distill_token))
    out, out_size = V.merge_tokens(x, dest, t_out, size)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_size, ref_size)


def _official_pitome(metric, x, size, ratio, margin, class_token, bsm):
    """A reading of PiToMe's pitome_vision (pitome / pitome_bsm branch) followed by merge_wavg."""
    if class_token:
        metric = metric[:, 1:, :]
    b, t, _ = metric.shape
    r = math.floor(t - t * ratio)
    m = torch.nn.functional.normalize(metric, p=2, dim=-1)
    sim = m @ m.transpose(-1, -2)
    energy = torch.nn.functional.elu(sim - margin, alpha=1.0).mean(dim=-1)
    indices = torch.argsort(energy, descending=True)
    batch_idx = torch.arange(b)[:, None]
    if bsm:
        a_idx, b_idx = indices[..., ::2], indices[..., 1::2]
        s = sim.gather(-1, b_idx[:, None, :].expand(b, t, b_idx.shape[-1]))
        s = s.gather(-2, a_idx[:, :, None].expand(b, a_idx.shape[-1], b_idx.shape[-1]))
        node_max, node_idx = s.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

        def merge(y, mode):
            cls = y[:, :1]
            y = y[:, 1:] if class_token else y
            src, dst = y[batch_idx, a_idx, :], y[batch_idx, b_idx, :]
            n, t1, c = src.shape
            unm = src.gather(-2, unm_idx.expand(n, t1 - r, c))
            src = src.gather(-2, src_idx.expand(n, r, c))
            dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
            return torch.cat(([cls] if class_token else []) + [unm, dst], dim=1)
    else:
        merge_idx, protected_idx = indices[..., : 2 * r], indices[..., 2 * r :]
        a_idx, b_idx = merge_idx[..., ::2], merge_idx[..., 1::2]
        s = sim.gather(-1, b_idx[:, None, :].expand(b, t, r)).gather(-2, a_idx[:, :, None].expand(b, r, r))
        dst_idx = s.max(dim=-1).indices

        def merge(y, mode):
            cls = y[:, :1]
            y = y[:, 1:] if class_token else y
            n, _, c = y.shape
            prot = y[batch_idx, protected_idx, :]
            src, dst = y[batch_idx, a_idx, :], y[batch_idx, b_idx, :]
            dst = dst.scatter_reduce(-2, dst_idx[..., None].expand(n, r, c), src, reduce=mode)
            return torch.cat(([cls] if class_token else []) + [prot, dst], dim=1)

    out = merge(x * size, "sum")
    size = merge(size, "sum")
    return out / size, size


@pytest.mark.parametrize("bsm", [False, True])
@pytest.mark.parametrize("class_token", [True, False])
@pytest.mark.parametrize("ratio,margin", [(0.9, 0.75), (0.6, 0.3), (0.5, 0.0)])
def test_pitome_matches_official(bsm, class_token, ratio, margin):
    g = torch.Generator().manual_seed(int(ratio * 100) + bsm)
    b, t, c = 2, 33, 12
    metric = torch.randn(b, t, 8, generator=g)
    x = torch.randn(b, t, c, generator=g)
    size = torch.randint(1, 5, (b, t, 1), generator=g).float()
    ref, ref_size = _official_pitome(metric.clone(), x, size, ratio, margin, class_token, bsm)
    n = t - int(class_token)
    r = math.floor(n - n * ratio)
    dest, t_out = V.pitome_match(metric, r, margin, protected=int(class_token), bipartite=bsm)
    out, out_size = V.merge_tokens(x, dest, t_out, size)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_size, ref_size)


def test_wpr_against_loop_reading():
    g = torch.Generator().manual_seed(0)
    attn = torch.randn(2, 3, 9, 9, generator=g, dtype=torch.float64).softmax(-1)
    got = V.wpr_scores(attn, iterations=5)
    for bi in range(2):
        heads = []
        for h in range(3):
            s = [1.0 / 9] * 9
            for _ in range(5):  # s(x_i) <- sum_j A(x_j, x_i) s(x_j)
                s = [sum(float(attn[bi, h, j, i]) * s[j] for j in range(9)) for i in range(9)]
            heads.append(s)
        want = torch.tensor(heads, dtype=torch.float64).mean(0)
        torch.testing.assert_close(got[bi], want)
    # the stationary distribution is a fixed point, and scores stay a distribution
    assert torch.allclose(got.sum(-1), torch.ones(2, dtype=torch.float64))


def test_zerotprune_against_reading():
    g = torch.Generator().manual_seed(1)
    b, t, p = 2, 21, 1
    importance = torch.rand(b, t, generator=g)
    metric = torch.randn(b, t, 6, generator=g)
    dest, t_out = V.zerotprune_match(importance, metric, 3, 4, protected=p)
    assert t_out == t - 7
    for bi in range(b):
        imp = importance[bi, p:].tolist()
        ranked = sorted(range(t - p), key=lambda i: (-imp[i], i))
        surv = ranked[: t - p - 3]
        dst, src = surv[: len(surv) - len(surv) // 2], surv[len(surv) - len(surv) // 2 :]
        u = torch.nn.functional.normalize(metric[bi, p:], dim=-1)
        best = {s: max(float(u[s] @ u[d]) for d in dst) for s in src}
        dropped = set(ranked[t - p - 3 :]) | set(sorted(src, key=lambda s: -best[s])[:4])
        kept = [i for i in range(t) if i < p or (i - p) not in dropped]
        assert (dest[bi] >= 0).nonzero().squeeze(1).tolist() == kept
        assert dest[bi][dest[bi] >= 0].tolist() == list(range(t_out))


def _author_tokenrank(logits, tau=1.0, iters=5):
    """A from-scratch reading of the Zero-TPrune author's pre-paper TokenRank (Hongjiew/Transformer_pruning,
    commit 52a4607, ``tokenrank_deit_prune.py`` ``Attention.get_importance`` with ``d=0``): the head-mean of the
    scaled logits over ``tau``, exponentiated and row-normalised into ``M``, and a uniform row vector multiplied
    by ``M`` ``iters`` times; CLS (token 0) left out of the result. (No official Zero-TPrune release exists; see
    docs/methods.md.)"""
    b, _, n, _ = logits.shape
    attn = (logits / tau).mean(1).exp()
    m = attn / attn.sum(-1, keepdim=True)
    dist = torch.full((b, 1, n), 1.0 / n, dtype=logits.dtype)
    for _ in range(iters):
        dist = dist @ m
    return dist.view(b, n)[:, 1:]


def test_wpr_and_importance_pruning_against_the_authors_tokenrank():
    g = torch.Generator().manual_seed(3)
    b, n = 2, 17
    logits = torch.randn(b, 1, n, n, generator=g, dtype=torch.float64) * 2
    # one head: WPR on the attention probabilities is the author's propagation (same direction, start, steps)
    got = V.wpr_scores(logits.softmax(-1), iterations=5)
    torch.testing.assert_close(got[:, 1:], _author_tokenrank(logits, iters=5))
    # several heads: per head the same; WPR averages the heads' scores (Alg. 1), the pre-paper code averaged logits
    heads = torch.randn(b, 3, n, n, generator=g, dtype=torch.float64)
    per_head = torch.stack([_author_tokenrank(heads[:, h : h + 1]) for h in range(3)], 1)
    torch.testing.assert_close(V.wpr_scores(heads.softmax(-1), iterations=5)[:, 1:], per_head.mean(1))
    # its pruning (eval branch, retain_rate): keep the top int(N * rate) non-CLS tokens by importance = the
    # I-stage alone (no S-stage)
    importance = _author_tokenrank(logits)
    keep_n = int((n - 1) * 0.7)
    want = importance.argsort(-1, descending=True)[:, :keep_n].sort(-1).values + 1
    dest, t_out = V.zerotprune_match(
        V.wpr_scores(logits.softmax(-1), 5), torch.randn(b, n, 4, generator=g), n - 1 - keep_n, 0, protected=1
    )
    assert t_out == 1 + keep_n
    for bi in range(b):
        kept = (dest[bi] >= 0).nonzero().squeeze(1)
        assert kept[0] == 0 and kept[1:].tolist() == want[bi].tolist()


def test_merge_keep_all_is_identity_and_sizes_add_up():
    x = torch.randn(2, 10, 4)
    dest, t_out = V.tome_match(x, 0)
    out, size = V.merge_tokens(x, dest, t_out)
    assert torch.equal(out, x) and torch.equal(size, torch.ones(2, 10, 1))
    dest, t_out = V.tome_match(x, 3, protected=1)
    out, size = V.merge_tokens(x, dest, t_out)
    assert t_out == 7 and torch.equal(size.sum(1), torch.full((2, 1), 10.0))
    assert torch.equal(out[:, 0], x[:, 0])  # the CLS token is untouched and first


def test_tome_schedule_is_parse_r():
    assert V.tome_schedule(8, 4) == [8, 8, 8, 8]
    assert V.tome_schedule((8, -1.0), 5) == [16, 12, 8, 4, 0]
    assert V.tome_schedule([3, 2], 4) == [3, 2, 0, 0]


def test_reduction_schedule_reaches_keep_exactly():
    for n, keep, layers in [(196, 98, 12), (196, 13, 12), (16, 4, 3), (256, 1, 12), (64, 64, 6)]:
        rs = V.reduction_schedule(n, keep, layers, cap=lambda m: m // 2)
        assert rs[-1] == 0 and sum(rs) == n - keep
        m = n
        for r in rs:
            assert r <= m // 2
            m -= r
    with pytest.raises(ValueError, match="keep must be >= 4"):
        V.reduction_schedule(16, 3, 3, cap=lambda m: m // 2)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\[B, T, C\]"):
        V.tome_match(torch.randn(4, 3), 1)
    with pytest.raises(TypeError, match="r must be an int"):
        V.tome_match(torch.randn(1, 4, 3), 1.5)
    with pytest.raises(ValueError, match="square"):
        V.wpr_scores(torch.rand(1, 1, 3, 4))
    with pytest.raises(TypeError, match="margin"):
        V.pitome_match(torch.randn(1, 4, 3), 1, margin="x")
