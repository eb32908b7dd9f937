"""FlashVID: DySeg segments, ADTS (attention-scaled max-min diversity) per frame, TSTM tree merging across frames,
then DPC-KNN clusters of what is left (pre-LLM stage)."""

from __future__ import annotations

import math

import torch

from ._common import check_int, compute_dtype, topk_lowtie, unit_rows
from .video import check_fraction, check_video, dpc_knn_scores, dyseg_segments

__all__ = ["flashvid_select", "flashvid_frame_tokens", "FLASHVID_SELECTIONS"]

#: ADTS variants (official ``TokenSelectionMethod``): ``attn_div`` distances scaled by the candidate's attention;
#: ``attn_div_v2`` (the official wrapper's default) also by its event relevance
FLASHVID_SELECTIONS = ("attn_div_v2", "attn_div")


def flashvid_frame_tokens(n: int, retention_ratio: float, expansion: float = 1.0) -> int:
    """Tokens per frame FlashVID keeps at ``retention_ratio``: ``ceil(N * retention_ratio * expansion)`` (official
    ``flashvid/utils.py`` line 46), at most ``N``. The official ``expansion=1.25`` pairs with its in-LLM stage."""
    return min(n, math.ceil(n * retention_ratio * expansion))


def _adts(x: torch.Tensor, attn: torch.Tensor, k: int, relevance: torch.Tensor | None) -> torch.Tensor:
    """``k`` indices (ascending) of one frame's tokens ``x [N, D]``: greedy max-min on cosine distances whose column
    ``j`` is scaled by ``attn[j]`` (and ``relevance[j]``); first pick: the largest second-smallest of its column."""
    units = unit_rows(x)
    dist = (1.0 - units @ units.T) * attn[None, :]
    if relevance is not None:
        dist = dist * relevance[None, :]
    n = dist.shape[0]
    second = torch.sort(dist, dim=0).values[1] if n > 1 else dist[0]
    chosen = [int(topk_lowtie(second, 1))]
    nearest = dist[chosen[0]].clone()
    taken = torch.zeros(n, dtype=torch.bool, device=x.device)
    taken[chosen[0]] = True
    for _ in range(1, k):
        pick = int(topk_lowtie(nearest.masked_fill(taken, -math.inf), 1))
        chosen.append(pick)
        taken[pick] = True
        nearest = torch.minimum(nearest, dist[pick])
    return torch.tensor(sorted(chosen), dtype=torch.long, device=x.device)


def _tstm(x: torch.Tensor, free: torch.Tensor, threshold: float, lower_bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tree merging of one segment ``x [L, N, D]`` (``free [L, N]``: tokens ADTS did not select). Returns the merged
    values ``[L, N, D]`` and ``kept [L, N]`` (free tokens that stayed roots)."""
    frames, n, _ = x.shape
    units = unit_rows(x)
    sims = units[1:] @ units[:-1].transpose(1, 2)  # [L-1, N, N]: token n of frame t+1 vs token m of frame t
    sims = sims.masked_fill(~free[1:, :, None], -1.0).masked_fill(~free[:-1, None, :], -1.0)
    parent = topk_lowtie(sims, 1).squeeze(-1)  # most similar previous-frame token (ties: lower index)
    best = sims.gather(2, parent[..., None]).squeeze(-1)
    best = torch.cat([best.new_full((1, n), -1.0), best])
    parent = torch.cat([parent.new_full((1, n), -1), parent])
    merged = best > threshold
    if int((~merged).sum()) < lower_bound and frames * n > lower_bound:
        soft = best.flatten().topk(frames * n - lower_bound).values[-1]
        merged = best > max(float(soft), -1.0 + 1e-6)
    values = x.clone()
    counts = torch.ones(frames, n, dtype=x.dtype, device=x.device)
    for t in range(frames - 1, -1, -1):  # last frame first: a token's subtree is complete when it is reached
        root = ~merged[t]
        values[t, root] /= counts[t, root, None]
        if bool(merged[t].any()):
            to = parent[t, merged[t]]
            values[t - 1].index_add_(0, to, values[t, merged[t]])
            counts[t - 1].index_add_(0, to, torch.ones_like(to, dtype=x.dtype))
    return values, ~merged & free


def _clusters(x: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN of one frame's remaining tokens ``x [M, D]`` into ``count`` clusters (``min(count, 7)`` neighbours):
    ``(centres [count] local indices, means [count, D])``, each token in the cluster of its nearest centre (ties: the
    higher-scored centre), a centre in its own."""
    scores = dpc_knn_scores(x, min(count, 7))
    centres = topk_lowtie(scores, count)
    dist = torch.cdist(x, x[centres], compute_mode="donot_use_mm_for_euclid_dist")
    owner = topk_lowtie(dist, 1, largest=False).squeeze(1)
    owner[centres] = torch.arange(count, device=x.device)
    total = torch.zeros(count, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, owner, x)
    size = torch.zeros(count, dtype=x.dtype, device=x.device).index_add_(
        0, owner, torch.ones_like(owner, dtype=x.dtype)
    )
    return centres, total / size[:, None]


def flashvid_select(
    features: torch.Tensor,
    frame_attn: torch.Tensor,
    frame_tokens: int,
    alpha: float = 0.7,
    temporal_threshold: float = 0.8,
    segment_threshold: float = 0.9,
    min_segments: int = 8,
    selection: str = "attn_div_v2",
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashVID's vision-side compression of one video (its optional in-LLM stage is not part of it).

    With ``B = frame_tokens`` (official ``ceil(N * retention_ratio * expansion)``, :func:`flashvid_frame_tokens`),
    ``A = ceil(B * alpha)`` ADTS tokens and ``S = B - A`` TSTM tokens per frame:

    1. DySeg: :func:`dyseg_segments` with ``c = min_segments``, ``tau = segment_threshold`` (the official cuts below
       the threshold, topped up with the smallest similarities to ``min_segments`` segments, are the same set).
    2. ADTS per frame: cosine distances ``d[i, j] = (1 - cos(x_i, x_j)) * a_j`` (``a = frame_attn[t]``; ``attn_div_v2``
       also ``* r_j``, ``r_j = <x_j, mean over the segment's frames of their mean token>``), first pick the column
       with the largest second-smallest entry, then greedily the token of largest ``min_{i chosen} d[i, j]``. Kept
       unchanged.
    3. TSTM per segment of ``L > 1`` frames, on the tokens ADTS left: each token of frame ``t >= 1`` links to its most
       cosine-similar free token of frame ``t - 1``; links above ``temporal_threshold`` merge (if fewer than ``B * L``
       tokens would stay, the threshold rises to the ``(L * N - B * L)``-th largest similarity). From the last frame
       back, a merged token's value (its own plus what merged into it, summed) is added to its parent, and a root
       becomes its sum divided by ``1 +`` its direct children (official; a mean for trees of depth <= 2).
       A one-frame segment passes its free tokens on unmerged.
    4. Per frame, the remaining ``m_t`` roots (of ``M`` in the segment) form ``ceil(m_t * S * L / M)`` DPC-KNN
       clusters (:func:`dpc_knn_scores`, ``min(clusters, 7)`` neighbours) when ``S * L < M``, each the mean of its
       tokens at its centre's index; else all roots are kept. ``S = 0`` or ``temporal_threshold >= 1``: no such
       tokens.

    Official: Fanziyang-v/FlashVID ``flashvid/utils.py`` lines 23-349 (``flashvid_compression``, ``segment``,
    ``dpc_knn``, ``spatiotemporal_compression``), ``flashvid/token_selection.py`` lines 28-130 (ADTS, v2),
    ``flashvid/__init__.py`` lines 70-86 (defaults), commit 1d37422c5afcaa15ee46b5355f5ba798fa93290a. Deviations: no
    ``1e-6 * rand`` density noise, ties to the lower index (ADTS, links, centres) or the higher-scored centre;
    float32 (float64 for float64 input), unit vectors with an epsilon; an ADTS token is never picked twice (v2 has
    no guard); a one-frame segment's free tokens exclude ADTS's (officially the whole frame, so a token can be kept
    twice); no threshold rise when ``B = N`` (official ``topk(0)`` fails) and none with no remaining roots.

    Args:
        features: ``[T, N, D]`` one video's post-merger tokens.
        frame_attn: ``[T, N]`` attention each token receives in the last vision block (official: per frame, the
            mean over heads and queries, then over each 2x2 merge unit), finite, >= 0.
        frame_tokens: ``B`` in ``[1, N]``.
        alpha: ADTS share in ``[0, 1]``; temporal_threshold: any float in ``[-1, 1]`` (``1``: no TSTM tokens; not
            with ``alpha = 0``, which would keep nothing);
        segment_threshold: DySeg cut below it; min_segments: ``>= 1``; selection: one of :data:`FLASHVID_SELECTIONS`.

    Returns:
        ``(kept [K] int64 ascending flat indices t * N + i, tokens [K, D])``, tokens in ``features``' dtype.
    """
    check_video("features", features)
    t, n, dim = features.shape
    if not isinstance(frame_attn, torch.Tensor) or tuple(frame_attn.shape) != (t, n):
        got = tuple(frame_attn.shape) if isinstance(frame_attn, torch.Tensor) else type(frame_attn).__name__
        raise ValueError(f"frame_attn must be a [T, N] = {(t, n)} tensor to match features, got {got}")
    if not bool(torch.isfinite(frame_attn).all()) or bool((frame_attn < 0).any()):
        raise ValueError("frame_attn must be finite and >= 0 (attention received)")
    frame_tokens = check_int("frame_tokens", frame_tokens, 1, n)
    alpha = check_fraction("alpha", alpha, low_open=False, high_open=False)
    temporal_threshold = check_fraction("temporal_threshold", temporal_threshold, False, False, low=-1.0)
    min_segments = check_int("min_segments", min_segments, 1)
    if selection not in FLASHVID_SELECTIONS:
        raise ValueError(f"selection must be one of {FLASHVID_SELECTIONS}, got {selection!r}")
    sizes = dyseg_segments(features, min_segments, segment_threshold)
    adts = math.ceil(frame_tokens * alpha)
    sttm = frame_tokens - adts
    if adts == 0 and temporal_threshold >= 1.0:
        raise ValueError(
            f"alpha={alpha!r} (no ADTS token) with temporal_threshold={temporal_threshold!r} (no TSTM token) keeps no "
            "token; allowed: alpha > 0 or temporal_threshold < 1"
        )

    dt = compute_dtype(features)
    x, attn = features.to(dt), frame_attn.to(dt)
    kept, tokens = [], []
    start = 0
    for size in sizes:
        seg = x[start : start + size]
        free = torch.ones(size, n, dtype=torch.bool, device=x.device)
        if adts > 0:
            event = seg.mean(dim=1).mean(dim=0) if selection == "attn_div_v2" else None
            for j in range(size):
                picked = _adts(seg[j], attn[start + j], adts, None if event is None else seg[j] @ event)
                free[j, picked] = False
                kept.append(picked + (start + j) * n)
                tokens.append(features[start + j, picked].to(dt))
        if sttm > 0 and temporal_threshold < 1.0:
            values, roots = _tstm(seg, free, temporal_threshold, frame_tokens * size) if size > 1 else (seg, free)
            total = int(roots.sum())
            ratio = sttm * size / total if total else math.inf  # official adaptive contextual ratio
            for j in range(size):
                local = roots[j].nonzero().squeeze(1)
                if local.numel() == 0:
                    continue
                count = math.ceil(local.numel() * ratio) if ratio < 1.0 else 0
                if count > 0:
                    centres, means = _clusters(values[j, local], count)
                    local = local[centres]
                else:
                    means = values[j, local]
                kept.append(local + (start + j) * n)
                tokens.append(means)
        start += size
    kept, tokens = torch.cat(kept), torch.cat(tokens)
    order = torch.argsort(kept)
    return kept[order], tokens[order].to(features.dtype)
