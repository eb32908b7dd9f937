"""``flashvid_select`` against a from-scratch reading of the official code (Fanziyang-v/FlashVID @ 1d37422c,
``flashvid/utils.py`` / ``token_selection.py``), batched as there, in float64, without the density noise, on seeded
videos whose decisions are well separated (scenes of near-duplicate frames: TSTM links far above or below the
threshold)."""

import math

import pytest
import torch
import torch.nn.functional as F

from vtprune.functional import flashvid_frame_tokens, flashvid_select


def _segments(feats, threshold, min_num):
    g = feats.mean(1)
    g = g / g.norm(dim=-1, keepdim=True)
    sims = (g[:-1] * g[1:]).sum(-1)
    cuts = torch.where(sims < threshold)[0]
    if cuts.numel() + 1 < min_num:
        sims = sims.clone()
        sims[sims < threshold] = 1.0
        extra = torch.topk(sims, k=min(min_num - cuts.numel() - 1, sims.shape[0]), largest=False).indices
        cuts = torch.cat([cuts, extra]).sort().values
    padded = F.pad(cuts, (1, 1), value=0)
    padded[0], padded[-1] = -1, feats.shape[0] - 1
    return torch.diff(padded).tolist()


def _adts(features, attn, k, v2):
    normed = features / features.norm(dim=-1, keepdim=True)
    dist = 1.0 - torch.bmm(normed, normed.transpose(-1, -2))
    dist = dist * attn.unsqueeze(1)
    if v2:
        dist = dist * torch.einsum("bnd,cd->bcn", features, features.mean(1)).mean(1).unsqueeze(1)
    keep = torch.zeros(features.shape[0], k, dtype=torch.long)
    keep[:, 0] = torch.argmax(torch.topk(dist, k=2, dim=1, largest=False).values[:, 1, :], dim=-1)
    for i in range(1, k):
        low = torch.gather(dist, 1, keep[:, :i].unsqueeze(-1).expand(-1, -1, dist.shape[-1])).min(dim=1).values
        low.scatter_(1, keep[:, :i], -1)
        keep[:, i] = torch.argmax(low, dim=-1)
    return keep.sort().values


def _dpc(features, clusters, k):
    n, d = features.shape
    dists = torch.cdist(features, features) / math.sqrt(d)
    density = (-(torch.topk(dists, k=k, dim=-1, largest=False).values ** 2)).mean(-1).exp()
    higher = density[None, :] > density[:, None]
    score = torch.where(higher, dists, dists.max()).min(-1).values * density
    # official: topk on densities with 1e-6 * rand added, so equal scores (a one-cluster frame: one neighbour, every
    # density exp(0)) pick at random; here, as in flashvid_select, the lower index
    centres = torch.sort(score, descending=True, stable=True).indices[:clusters]
    owner = torch.argmin(dists[:, centres], dim=-1)
    owner[centres] = torch.arange(clusters)
    return owner, centres


def _tstm(video, threshold, mask, lower_bound):
    t, n, _ = video.shape
    normed = video / video.norm(dim=-1, keepdim=True)
    cos = torch.einsum("bnd,bmd->bnm", normed[1:], normed[:-1])
    cos[~mask[1:].unsqueeze(-1).expand(-1, -1, n)] = -1.0
    cos[~mask[:-1].unsqueeze(1).expand(-1, n, -1)] = -1.0
    sims, idx = torch.max(cos, dim=-1)
    sims, idx = F.pad(sims, (0, 0, 1, 0), value=-1), F.pad(idx, (0, 0, 1, 0), value=-1)
    counts = torch.ones(t, n, dtype=video.dtype)
    merged = sims > threshold
    if (~merged).int().sum() < lower_bound:
        merged = sims > max(sims.view(-1).topk(k=t * n - lower_bound).values[-1], -1.0 + 1e-6)
    for f in range(t - 1, -1, -1):
        video[f][~merged[f]] = video[f][~merged[f]] / counts[f][~merged[f]].unsqueeze(-1)
        counts[f][~merged[f]] = 1
        if merged[f].any():
            one_hot = F.one_hot(idx[f][merged[f]], num_classes=n).to(video.dtype)
            video[f - 1] += torch.einsum("mn,md->nd", one_hot, video[f][merged[f]])
            counts[f - 1] += one_hot.sum(0)
            counts[f][merged[f]] = 0
    keep = ~merged & mask
    return [video[i][keep[i]] for i in range(t)], [torch.where(keep[i])[0] for i in range(t)]


def official(video, attn, ratio, alpha, temporal, seg_threshold, min_num, v2, expansion=1.0):
    """``flashvid_compression`` read from the official code, line by line (float64, no rand noise)."""
    t, n, d = video.shape
    video = video.clone()
    budget = math.ceil(n * ratio * expansion)
    n_adts = math.ceil(budget * alpha)
    n_sttm = budget - n_adts
    ids = torch.arange(t * n).view(t, n)
    all_tokens, all_ids = [], []
    start = 0
    for size in _segments(video, seg_threshold, min_num):
        seg, seg_ids = video[start : start + size], ids[start : start + size]
        mask = torch.ones(size, n, dtype=torch.bool)
        if alpha > 0:
            picked = _adts(seg, attn[start : start + size], n_adts, v2)
            all_tokens.append(torch.gather(seg, 1, picked.unsqueeze(-1).expand(-1, -1, d)).reshape(-1, d).clone())
            all_ids.append(seg_ids.gather(1, picked).view(-1))
            mask.scatter_(1, picked, False)
        other = n_sttm * size
        assert size > 1, "the seeded videos have no one-frame segment (a documented deviation there)"
        frames, frame_ids = _tstm(seg, temporal, mask, (n_adts + n_sttm) * size)
        frame_ids = [seg_ids[i][j] for i, j in enumerate(frame_ids)]
        ratio_ctx = other / sum(len(x) for x in frames)
        for tokens, tids in zip(frames, frame_ids):
            clusters = math.ceil(len(tokens) * ratio_ctx)
            if clusters > 0 and ratio_ctx < 1.0:
                owner, centres = _dpc(tokens, clusters, min(clusters, 7))
                one_hot = F.one_hot(owner, num_classes=clusters).to(tokens.dtype)
                tokens = torch.einsum("nc,nd->cd", one_hot, tokens) / one_hot.sum(0).unsqueeze(-1)
                tids = tids[centres]
            all_tokens.append(tokens)
            all_ids.append(tids)
        start += size
    tokens, kept = torch.cat(all_tokens), torch.cat(all_ids)
    order = kept.argsort()
    return kept[order], tokens[order]


def _video(seed, scenes=(3, 2, 3), n=16, d=24, drift=0.05):
    """Scenes of near-duplicate frames: each frame is the previous one with a few tokens replaced and small noise."""
    gen = torch.Generator().manual_seed(seed)
    frames = []
    for length in scenes:
        frame = torch.randn(n, d, generator=gen, dtype=torch.float64) + 3 * torch.randn(1, d, generator=gen)
        for _ in range(length):
            frame = frame + drift * torch.randn(n, d, generator=gen, dtype=torch.float64)
            moved = torch.randperm(n, generator=gen)[:3]
            frame[moved] = torch.randn(3, d, generator=gen, dtype=torch.float64)
            frames.append(frame.clone())
    video = torch.stack(frames)
    attn = torch.rand(video.shape[:2], generator=gen, dtype=torch.float64).softmax(-1)
    return video, attn


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("selection", ["attn_div_v2", "attn_div"])
@pytest.mark.parametrize("ratio,alpha,temporal", [(0.25, 0.7, 0.8), (0.5, 0.5, 0.9), (0.2, 0.0, 0.8)])
def test_flashvid_select_matches_the_official_reading(seed, selection, ratio, alpha, temporal):
    video, attn = _video(seed)
    want_kept, want_tokens = official(video, attn, ratio, alpha, temporal, 0.9, 3, selection == "attn_div_v2")
    kept, tokens = flashvid_select(
        video, attn, flashvid_frame_tokens(16, ratio), alpha, temporal, 0.9, 3, selection=selection
    )
    assert kept.tolist() == want_kept.tolist()
    torch.testing.assert_close(tokens, want_tokens)


def test_flashvid_merges_and_keeps_distinct_ascending_tokens():
    video, attn = _video(0)
    kept, tokens = flashvid_select(video.float(), attn.float(), 4, alpha=0.5, min_segments=3)
    assert kept.dtype == torch.int64 and torch.equal(kept, kept.unique()) and tokens.dtype == torch.float32
    # TSTM merged something: some kept token is not its own original feature
    assert not torch.allclose(tokens, video.float().reshape(-1, 24)[kept])
    assert kept.numel() <= 4 * video.shape[0] + video.shape[0]  # B per frame (plus ceil rounding, one per frame)


def test_flashvid_select_refuses_bad_inputs():
    video, attn = _video(0)
    with pytest.raises(ValueError, match="frame_attn must be a \\[T, N\\]"):
        flashvid_select(video, attn[:, :3], 4)
    with pytest.raises(ValueError, match="frame_tokens must be in \\[1, 16\\]"):
        flashvid_select(video, attn, 17)
    with pytest.raises(ValueError, match="selection must be one of"):
        flashvid_select(video, attn, 4, selection="div")
    with pytest.raises(ValueError, match="alpha must be in"):
        flashvid_select(video, attn, 4, alpha=1.5)
    with pytest.raises(ValueError, match="keeps no token"):
        flashvid_select(video, attn, 4, alpha=0.0, temporal_threshold=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        flashvid_select(video, -attn, 4)


def test_fastvid_frame_attention_matches_the_official_lines():
    """FastVID ``modeling_qwen2_5_vl.py`` lines 195-203 @a40a109, on one grid of frames (q, k ``[seq, H, Dh]``)."""
    from vtprune.functional import fastvid_frame_attention

    gen = torch.Generator().manual_seed(0)
    heads, t, hw, dh = 3, 3, 8, 4
    q, k = torch.randn(2, t * hw, heads, dh, generator=gen, dtype=torch.float64)
    q_attn = q.transpose(0, 1).reshape(heads, t, hw, dh).mean(-2, keepdim=True)
    k_attn = k.transpose(0, 1).reshape(heads, t, hw // 4, 4, dh).mean(-2)
    official = (torch.matmul(q_attn, k_attn.transpose(-2, -1)) / math.sqrt(dh)).softmax(-1).mean(2).mean(0)
    got = fastvid_frame_attention(q, k, torch.arange(t + 1) * hw, dh**-0.5)
    torch.testing.assert_close(got.view(t, hw // 4, 4), official[..., None].expand(-1, -1, 4))
    with pytest.raises(ValueError, match="not a whole number of 4-token"):
        fastvid_frame_attention(q, k, torch.tensor([0, 6, t * hw]), 0.5)
