"""Frame-budget allocation: how many of a video's ``k`` kept tokens each frame gets (the "allocator" axis)."""

from __future__ import annotations

import torch

from ._common import check_k
from .vidcom2 import vidcom2_scores
from .video import check_fraction, check_video, dyseg_segments, frame_similarity

__all__ = ["frame_budgets", "FRAME_BUDGET_RULES"]

FRAME_BUDGET_RULES = ("uniform", "uniqueness", "segments")


def _largest_remainder(quota: torch.Tensor, total: int, cap: int) -> list[int]:
    """Integers ``<= cap`` summing to ``total`` close to the real ``quota`` (which sums to ``total``): floors, then
    one more to the largest remainders among frames below ``cap`` (ties -> lower frame)."""
    counts = quota.floor().long().clamp(max=cap)
    left = total - int(counts.sum())
    if left > 0:
        rem = torch.where(counts < cap, quota - counts, torch.full_like(quota, -1.0))
        counts[torch.sort(rem, descending=True, stable=True).indices[:left]] += 1
    return counts.tolist()


def _capped_quota(weights: torch.Tensor, total: int, cap: int) -> torch.Tensor:
    """Real quotas proportional to ``weights`` (``>= 0``, not all 0), each ``<= cap``, summing to ``total``
    (water-filling: frames over the cap get it, the rest is shared again among the others)."""
    quota = torch.zeros_like(weights)
    free = torch.ones_like(weights, dtype=torch.bool)
    left = float(total)
    while left > 1e-9 and bool(free.any()):
        w = torch.where(free, weights, torch.zeros_like(weights))
        share = w / w.sum() * left if float(w.sum()) > 0 else free.to(w.dtype) / int(free.sum()) * left
        over = free & (quota + share > cap)
        if not bool(over.any()):
            return quota + share
        left -= float((cap - quota[over]).sum())
        quota[over] = cap
        free &= ~over
    return quota


def _even(total: int, frames: list[int], cap: int, counts: list[int]) -> int:
    """Add ``total`` to ``counts`` over ``frames`` evenly (the first frames get the remainder), each ``<= cap``;
    returns what did not fit."""
    while total > 0:
        room = [f for f in frames if counts[f] < cap]
        if not room:
            break
        share, extra = divmod(total, len(room))
        for j, f in enumerate(room):
            add = min(share + (1 if j < extra else 0), cap - counts[f])
            counts[f] += add
            total -= add
    return total


def frame_budgets(
    features: torch.Tensor,
    k: int,
    rule: str = "uniform",
    *,
    temperature: float = 0.01,
    c: int = 8,
    tau: float = 0.84,
    tau_ignore: float = 0.95,
) -> list[int]:
    """Per-frame token counts (each in ``[0, N]``, summing to ``k``) for one video.

    Rules:

    * ``"uniform"``: ``k // T`` per frame, one more for the first ``k % T`` frames.
    * ``"uniqueness"`` (VidCom2's allocation, ``token_compressor/vidcom2/vidcom2.py`` lines 64-72 at commit
      a85d485cc2205e92705b32e618b3bc7a492836f9, branch ``qwen``): real quotas
      ``(k / T) * (1 + p_t - mean p)``, ``p = softmax((u - max u) / temperature)`` over VidCom2's frame uniqueness
      ``u`` (:func:`vidcom2_scores`). Deviations, so that the counts sum to exactly ``k``: quotas over ``N`` are
      capped and the excess shared in proportion among the other frames (official: clamp, excess dropped), and
      counts are rounded by largest remainder (official: ``round``, at least 1 per frame; here a frame may get 0).
    * ``"segments"`` (DySeg, FastVID ``modeling_qwen2_5_vl.py`` lines 1899-1989 at commit
      a40a109cb8df20e8c2c17c6850f8269717369990): each :func:`dyseg_segments` segment gets ``k`` in proportion to
      its length (largest remainder, ties -> earlier segment); inside a segment the budget goes evenly to its
      anchor frames, the last frame of each run of near-duplicates (consecutive frame similarity
      ``>= tau_ignore``), as FastVID gives its salient and context tokens only to anchors; what exceeds the
      anchors' ``N`` goes evenly to the segment's other frames. FastVID's own split (salient / context shares,
      one context anchor in ``p``) is :func:`fastvid_select`'s.

    Args:
        features: ``[T, N, D]`` one video's post-merger tokens.
        k: tokens to keep, ``1 <= k <= T * N``.
        rule: one of ``"uniform"``, ``"uniqueness"``, ``"segments"``.
        temperature: ``"uniqueness"`` softmax temperature ``> 0``.
        c, tau, tau_ignore: ``"segments"`` DySeg parameters (FastVID's ``DySeg_c``, ``DySeg_tau``,
            ``DySeg_ignore``).

    Returns:
        ``list[int]`` of length ``T``.
    """
    check_video("features", features)
    t, n, _ = features.shape
    k = check_k(k, t * n, "tokens of the video, T * N")
    if rule not in FRAME_BUDGET_RULES:
        raise ValueError(f"rule must be one of {FRAME_BUDGET_RULES}, got {rule!r}")
    if rule == "uniform":
        return [k // t + (1 if i < k % t else 0) for i in range(t)]
    if rule == "uniqueness":
        temperature = check_fraction("temperature", temperature, low_open=True, high_open=True, high=float("inf"))
        _, u = vidcom2_scores(features)
        p = torch.softmax((u - u.max()) / temperature, dim=0)
        quota = _capped_quota((k / t) * (1 + p - p.mean()), k, n)
        return _largest_remainder(quota, k, n)
    tau_ignore = check_fraction("tau_ignore", tau_ignore, low_open=False, high_open=False, low=-1.0)
    sizes = dyseg_segments(features, c, tau)
    seg_quota = torch.tensor(sizes, dtype=torch.float64) * (k / t)
    seg_budget = _largest_remainder(seg_quota, k, 10**18)
    near = (frame_similarity(features) >= tau_ignore).tolist() + [False]  # near[f]: frame f+1 repeats frame f
    counts = [0] * t
    start = 0
    for size, budget in zip(sizes, seg_budget):
        frames = list(range(start, start + size))
        anchors = [f for f in frames if f == frames[-1] or not near[f]]
        left = _even(budget, anchors, n, counts)
        _even(left, [f for f in frames if f not in anchors], n, counts)
        start += size
    return counts
