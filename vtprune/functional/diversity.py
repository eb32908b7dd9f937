"""Greedy diversity selection: k-center (max-min, DivPrune / ToDRE v1) and max-sum (ToDRE v2).

Both run k sequential greedy steps. Each step computes one similarity row (the new pick against
every token, O(N D)) and updates a running minimum / sum, so a selection costs O(N k D) after the
first pick. With ``first=None`` the first pick needs every token's nearest-neighbour distance
(O(N^2 D)); it is computed in row blocks so no N x N matrix is ever held in memory.

When the native ops are loaded for the input's device (``vtprune.kernels``), the greedy steps run in one
C++/OpenMP or CUDA call (``torch.ops.vtprune.kcenter`` / ``maxsum``); unit rows and the first pick are made
with the same ATen calls as here, and the steps follow the same rules (running min / sum, selected tokens
masked, lower index on ties), so both paths return the same indices. ``VTPRUNE_NO_EXT=1`` forces this file's
pure-torch code.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..kernels import reference
from ._common import (
    BLOCK_ELEMENTS,
    check_int,
    check_k,
    check_tensor,
    compute_dtype,
    cosine_to,
    near_zero_tol,
    sq_l2_to,
    unit_rows,
)

__all__ = ["kcenter_select", "maxsum_select"]

_METRICS = ("cosine", "l2")


def _check_features(features) -> torch.Tensor:
    check_tensor("features", features, ndim=2, shape_hint="[N, D]", finite=True)
    if features.shape[0] < 1 or features.shape[1] < 1:
        raise ValueError(f"features must be a non-empty [N, D] tensor, got shape {tuple(features.shape)}")
    return features


def _check_first(first, n: int) -> int | None:
    if first is None:
        return None
    return check_int("first", first, 0, n - 1)


def _block_rows(n: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(n, 1))


def _farthest_nearest_neighbour(x: torch.Tensor, metric: str) -> torch.Tensor:
    """DivPrune's first pick (:func:`vtprune.kernels.reference.farthest_nearest_neighbour`, which the NVRTC back end
    runs too)."""
    return reference.farthest_nearest_neighbour(x, metric, BLOCK_ELEMENTS)


def kcenter_select(features: torch.Tensor, k: int, first: int | None = None, metric: str = "cosine") -> torch.Tensor:
    """Greedy k-center (max-min diversity) selection, as in DivPrune (vbdi/divprune).

    Distance ``d(i, j) = 1 - cos(f_i, f_j)`` (``metric="cosine"``, DivPrune) or
    ``||f_i - f_j||_2`` (``metric="l2"``).

    * first pick: ``first`` if given (ToDRE v1 uses the token with the highest vision CLS
      attention), else ``argmax_i min_{j != i} d(i, j)`` -- the token whose nearest neighbour is
      farthest (DivPrune);
    * then repeatedly ``S <- S + {argmax_{i not in S} min_{s in S} d(i, s)}``.

    A running ``min_{s in S} d(i, s)`` is updated with one distance row per step (O(N k D));
    selected tokens are masked out, so they are never picked again, even when duplicates leave
    every remaining distance at 0. Ties go to the lower index: per-step distance rows give
    duplicated tokens bitwise equal values, and in the first-pick pass (matrix multiplies in row
    blocks) distances within rounding of 0 (``4 sqrt(D) eps``, relative) count as exactly 0.
    Distances are computed in float32 (float64 for float64 input); cosine uses rows scaled by
    ``1 / max(||f||, 1e-8)``.

    Args:
        features: ``[N, D]`` token features (DivPrune: projected visual features).
        k: number of tokens to select, ``1 <= k <= N``.
        first: optional index of the first pick, ``0 <= first < N``.
        metric: ``"cosine"`` or ``"l2"``.

    Returns:
        int64 ``[k]`` indices in selection order, on ``features.device`` (sort them to keep the
        tokens in their original order, as DivPrune does).
    """
    _check_features(features)
    if not isinstance(metric, str) or metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    n = features.shape[0]
    k = check_k(k, n)
    first = _check_first(first, n)
    x = features.to(compute_dtype(features))
    if kernels.native(x.device):
        return torch.ops.vtprune.kcenter(x.contiguous(), [0, n], k, [-1 if first is None else first], metric)[0]
    return _kcenter_torch(x, k, first, metric)


@torch.no_grad()  # indices only: inputs that require grad are read as values (the native op's way)
def _kcenter_torch(x: torch.Tensor, k: int, first: int | None, metric: str) -> torch.Tensor:
    """Pure-torch greedy k-center on ``x`` (compute dtype, raw rows); arguments already checked."""
    n, device, dtype = x.shape[0], x.device, x.dtype
    if metric == "cosine":
        x = unit_rows(x, dtype)

    if first is None:
        cur = _farthest_nearest_neighbour(x, metric)
    else:
        cur = torch.tensor([first], dtype=torch.long, device=device)
    selected = torch.empty(k, dtype=torch.long, device=device)
    # For metric="l2" the running minimum holds squared distances: same order, same ties.
    min_dist = torch.full((n,), float("inf"), dtype=dtype, device=device)
    tol = near_zero_tol(dtype, x.shape[1])
    for t in range(k):
        selected[t : t + 1] = cur
        if t == k - 1:
            break
        if metric == "cosine":
            row = 1.0 - cosine_to(x, cur)
            row.masked_fill_(row <= tol, 0.0)  # a duplicate of a pick is at distance exactly 0 (exact ties)
        else:
            row = sq_l2_to(x, cur)
        torch.minimum(min_dist, row, out=min_dist)
        min_dist.index_fill_(0, cur, float("-inf"))  # never re-pick a selected token
        cur = torch.argmax(min_dist).view(1)
    return selected


def maxsum_select(features: torch.Tensor, k: int, first: int | None = None) -> torch.Tensor:
    """Greedy max-sum diversity selection (ToDRE stage 1, paper v2; no public code).

    * first pick: ``first`` if given (ToDRE: highest vision CLS attention), else the DivPrune
      rule ``argmax_i min_{j != i} (1 - cos(f_i, f_j))``;
    * then repeatedly ``S <- S + {argmin_{i not in S} sum_{s in S} cos(f_i, f_s)}``.

    A running sum of cosine similarities is updated with one row per step (O(N k D)); selected
    tokens are masked out and never re-picked. Ties go to the lower index. Computed in float32
    (float64 for float64 input).

    Args:
        features: ``[N, D]`` token features.
        k: number of tokens to select, ``1 <= k <= N``.
        first: optional index of the first pick, ``0 <= first < N``.

    Returns:
        int64 ``[k]`` indices in selection order, on ``features.device``.
    """
    _check_features(features)
    n = features.shape[0]
    k = check_k(k, n)
    first = _check_first(first, n)
    x = features.to(compute_dtype(features))
    if kernels.native(x.device):
        return torch.ops.vtprune.maxsum(x.contiguous(), [0, n], k, [-1 if first is None else first])[0]
    return _maxsum_torch(x, k, first)


def _maxsum_torch(x: torch.Tensor, k: int, first: int | None) -> torch.Tensor:
    """Pure-torch greedy max-sum on ``x`` (compute dtype, raw rows); arguments already checked."""
    n, device, dtype = x.shape[0], x.device, x.dtype
    x = unit_rows(x, dtype)

    if first is None:
        cur = _farthest_nearest_neighbour(x, "cosine")
    else:
        cur = torch.tensor([first], dtype=torch.long, device=device)
    selected = torch.empty(k, dtype=torch.long, device=device)
    sim_sum = torch.zeros(n, dtype=dtype, device=device)
    tol = near_zero_tol(dtype, x.shape[1])
    for t in range(k):
        selected[t : t + 1] = cur
        if t == k - 1:
            break
        sims = cosine_to(x, cur)
        sim_sum += sims.masked_fill_(sims >= 1.0 - tol, 1.0)  # a duplicate of a pick has cosine exactly 1
        sim_sum.index_fill_(0, cur, float("inf"))  # never re-pick a selected token
        cur = torch.argmin(sim_sum).view(1)
    return selected
