"""Density-peak clustering with a distance cutoff (DBDPC) and PACT's cluster-mean merging (orailix/PACT).

DBDPC (``PACT/utils.py``, ``DBDPC.fit_variant``), on the cosine distances ``d(i, j) = max(0, 1 - cos(k_i, k_j))``
(``d(i, i) = 0``) of the tokens' key vectors:

1. density ``rho_i = sum_j exp(-(d(i, j) / dc)^2)`` with ``dc = 2``; the official code then replaces rho by its
   rank (``avoid_numerical_instability_DBDPC``), so only the density *order* matters. Ties (which the official
   unstable argsort leaves unspecified) go to the lower index: it counts as denser;
2. rounds over the unassigned tokens U: ``delta_i = min d(i, j)`` over the denser ``j`` in U (inf for the densest);
   every ``i`` with ``delta_i > cutoff`` becomes a centre, and the tokens of U within ``cutoff`` (``<=``) of a new
   centre are assigned. When a round yields fewer than 10 centres, the rest of U is taken densest first: a token
   not within ``cutoff`` of an earlier new centre of this pass becomes a centre;
3. every token is labelled with its nearest centre (official ``argmin`` over its centre list; here the lower
   centre index wins ties), centres with themselves.

PACT (``configs/pact.json``) clusters the image tokens' post-RoPE keys at decoder layer 4 (cutoff 0.21), after
its importance pruning (EUTI) kept 55% of them; pruned tokens within ``coef_pruned * cutoff`` (1.5x) of their
nearest centre join that cluster ("retrieval"). Each centre's hidden state is replaced by the mean of its cluster's
hidden states (``take_mean``), the other tokens are dropped.

The centre finding and labelling run natively (``torch.ops.vtprune.dbdpc``) when ``vtprune.kernels`` has the op for
the device; distances and density ranks are always computed here with torch, so both paths compare the same
numbers and return the same labels.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import kernels
from ._common import check_k, check_tensor, compute_dtype, topk_lowtie, unit_rows

__all__ = ["dbdpc_cluster", "pact_merge", "PactMerge"]

#: PACT's official hyper-parameters (configs/pact.json and the DBDPC(dc=2) call in PACT/utils.py)
PACT_CUTOFF = 0.21
PACT_DC = 2.0
PACT_COEF_PRUNED = 1.5
PACT_PRUNE_KEEP = 0.55
#: a DBDPC round that finds fewer centres than this switches to the sequential pass (official constant)
SEQUENTIAL_BELOW = 10
#: bisection steps of the cutoff search that meets a token budget (cutoffs live in [0, 2])
_SEARCH_STEPS = 40


class PactMerge(NamedTuple):
    """Result of :func:`pact_merge`: ascending kept indices, their merged vectors and cluster sizes."""

    kept: torch.Tensor  # [C] int64 ascending
    merged: torch.Tensor  # [C, D], hidden's dtype
    sizes: torch.Tensor  # [C] int64, tokens merged into each kept token (itself included)
    cutoff: float  # the cutoff used
    assignment: torch.Tensor  # [N] int64: the kept token (0..C-1) each input token merged into, -1 if dropped


def _check_number(name: str, value, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value <= high):
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def _distances(keys: torch.Tensor, dc: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine distance matrix (clamped at 0, zero diagonal) and density rank (0 = densest, ties -> lower index)."""
    units = unit_rows(keys, compute_dtype(keys))
    dist = (1.0 - units @ units.T).clamp_(min=0.0)
    dist.fill_diagonal_(0.0)
    rho = torch.exp(dist.div(dc).square_().neg_()).sum(dim=1)
    order = torch.sort(rho, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return dist, rank


def _dbdpc_torch(dist: torch.Tensor, rank: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Pure-torch DBDPC centres + labels on a precomputed distance matrix and density rank."""
    n = dist.shape[0]
    device = dist.device
    is_centre = torch.zeros(n, dtype=torch.bool, device=device)
    unassigned = torch.arange(n, device=device)
    while unassigned.numel() > 0:
        sub = dist[unassigned][:, unassigned]
        r = rank[unassigned]
        denser = r[None, :] < r[:, None]  # [i, j]: j is denser than i
        delta = sub.masked_fill(~denser, float("inf")).min(dim=1).values
        fresh_mask = delta > cutoff
        fresh = unassigned[fresh_mask]
        is_centre[fresh] = True
        covered = fresh_mask | (dist[unassigned][:, fresh] <= cutoff).any(dim=1)
        rest = unassigned[~covered]
        if fresh.numel() < SEQUENTIAL_BELOW:
            rest = rest[torch.sort(rank[rest]).indices]  # densest first
            within = dist[rest][:, rest] <= cutoff
            done = torch.zeros(rest.numel(), dtype=torch.bool, device=device)
            for a in range(rest.numel()):
                if bool(done[a]):
                    continue
                is_centre[rest[a]] = True
                done[a + 1 :] |= within[a, a + 1 :]
            break
        unassigned = rest
    centres = is_centre.nonzero().squeeze(1)
    labels = centres[dist[:, centres].argmin(dim=1)]  # argmin: first (lower-index) centre on ties
    labels[centres] = centres
    return labels


def _labels(dist: torch.Tensor, rank: torch.Tensor, cutoff: float) -> torch.Tensor:
    if kernels.native(dist.device):
        return torch.ops.vtprune.dbdpc(dist.contiguous(), rank.contiguous(), cutoff)
    return _dbdpc_torch(dist, rank, cutoff)


def _budget_labels(dist, rank, k: int, cutoff: float) -> tuple[torch.Tensor, float]:
    """Labels at the smallest cutoff >= ``cutoff`` whose DBDPC has at most ``k`` centres (bisection; a cutoff of 2
    or more leaves one centre), then, if fewer than ``k``, the tokens farthest from their centre (ties -> lower
    index) promoted to centres and every token relabelled with its nearest centre."""
    labels = _labels(dist, rank, cutoff)
    count = int((labels == torch.arange(labels.numel(), device=labels.device)).sum())
    if count > k:
        lo, hi = cutoff, max(cutoff, 2.0)
        best = _labels(dist, rank, hi)
        for _ in range(_SEARCH_STEPS):
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):
                break
            trial = _labels(dist, rank, mid)
            c = int((trial == torch.arange(trial.numel(), device=trial.device)).sum())
            if c <= k:
                hi, best = mid, trial
                if c == k:
                    break
            else:
                lo = mid
        labels, cutoff = best, hi
    n = labels.numel()
    idx = torch.arange(n, device=labels.device)
    is_centre = labels == idx
    missing = k - int(is_centre.sum())
    if missing > 0:
        gap = dist[idx, labels].masked_fill(is_centre, -1.0)  # centres are never promoted twice
        is_centre[topk_lowtie(gap, missing)] = True
        centres = is_centre.nonzero().squeeze(1)
        labels = centres[dist[:, centres].argmin(dim=1)]
        labels[centres] = centres
    return labels, cutoff


def dbdpc_cluster(
    keys: torch.Tensor,
    cutoff: float = PACT_CUTOFF,
    dc: float = PACT_DC,
    k: int | None = None,
    return_cutoff: bool = False,
):
    """DBDPC density-peak clustering of ``keys`` [N, D] (PACT): the centre index of every token.

    See the module docstring for the exact rules. Distances are cosine distances computed in float32 (float64
    for float64 input) with rows scaled by ``1 / max(||k||, 1e-8)``.

    Args:
        keys: ``[N, D]`` vectors to cluster (PACT: the image tokens' post-RoPE keys, heads flattened).
        cutoff: distance cutoff, ``>= 0`` (PACT: 0.21); with ``k``, the smallest cutoff tried.
        dc: density bandwidth, ``> 0`` (PACT: 2).
        k: None (official: the cutoff decides the number of centres) or a budget ``1 <= k <= N``: the cutoff is the
            smallest one ``>= cutoff`` whose DBDPC has at most ``k`` centres (bisection; fewer centres -> larger
            cutoff); if that leaves fewer than ``k`` centres, the tokens farthest from their centre (ties -> lower
            index) become centres too and every token is relabelled with its nearest centre: exactly ``k`` centres.
        return_cutoff: also return the cutoff used (``cutoff`` itself when ``k`` is None).

    Returns:
        int64 ``[N]`` labels on ``keys.device``: ``labels[i]`` is the index of token i's centre; the centres are
        the tokens with ``labels[i] == i``. With ``return_cutoff``: ``(labels, cutoff used)``.
    """
    check_tensor("keys", keys, ndim=2, shape_hint="[N, D]", finite=True)
    if keys.shape[0] < 1 or keys.shape[1] < 1:
        raise ValueError(f"keys must be a non-empty [N, D] tensor, got shape {tuple(keys.shape)}")
    cutoff = _check_number("cutoff", cutoff, 0.0)
    dc = _check_number("dc", dc, 1e-12)
    if not isinstance(return_cutoff, bool):
        raise TypeError(f"return_cutoff must be True or False, got {return_cutoff!r}")
    dist, rank = _distances(keys, dc)
    if k is None:
        labels = _labels(dist, rank, cutoff)
    else:
        labels, cutoff = _budget_labels(dist, rank, check_k(k, keys.shape[0]), cutoff)
    return (labels, cutoff) if return_cutoff else labels


def pact_merge(
    hidden: torch.Tensor,
    keys: torch.Tensor,
    k: int | None = None,
    cutoff: float | None = None,
    importance: torch.Tensor | None = None,
    prune_keep: float = PACT_PRUNE_KEEP,
    coef_pruned: float = PACT_COEF_PRUNED,
    dc: float = PACT_DC,
) -> PactMerge:
    """PACT's clustering and merging of one image's tokens: DBDPC on ``keys``, cluster means of ``hidden``.

    1. Importance pruning (EUTI), only if ``importance`` [N] is given: the ``max(1, int(prune_keep * N))``
       tokens with the largest importance are clustered (ties -> lower index), the others are "pruned".
    2. DBDPC of the clustered tokens' keys (:func:`dbdpc_cluster`, with the budget ``min(k, clustered tokens)``).
       Budget: with ``k`` (``1 <= k <= N``), the cutoff is the smallest one ``>= cutoff`` (default 0) that gives at
       most ``k`` centres (bisection; fewer centres -> larger cutoff); if that leaves fewer than ``k`` centres,
       the clustered tokens farthest from their centre become centres too, and every clustered token is
       relabelled with its nearest centre, so exactly ``min(k, clustered tokens)`` tokens are kept. Without
       ``k`` (official PACT), the fixed ``cutoff`` decides the count.
    3. Retrieval: a pruned token joins its nearest centre's cluster (cosine distance of keys, lower centre index
       on ties) if that distance is ``<= coef_pruned * cutoff``; otherwise it is dropped.
    4. Each centre's vector is the mean of its cluster's ``hidden`` rows (computed in float32, float64 for float64
       input; returned in ``hidden.dtype``).

    Args:
        hidden: ``[N, D]`` hidden states of the image tokens (PACT: the input of decoder layer K).
        keys: ``[N, Dk]`` vectors to cluster (PACT: post-RoPE keys, heads flattened).
        k: token budget (None: cutoff-driven, as the official code).
        cutoff: DBDPC cutoff (official 0.21); required when ``k`` is None.
        importance: ``[N]`` EUTI scores, or None to cluster every token (official ``dbdpc.json``).
        prune_keep: fraction of tokens EUTI keeps for clustering (official 0.55).
        coef_pruned: retrieval radius in cutoffs (official 1.5).
        dc: density bandwidth (official 2).

    Returns:
        :class:`PactMerge` ``(kept, merged, sizes, cutoff, assignment)``: ascending kept (centre) indices into the
        N tokens, ``[C, D]`` merged vectors, ``[C]`` cluster sizes, the cutoff used, and ``[N]`` the kept token each
        input token merged into (-1: dropped).
    """
    check_tensor("hidden", hidden, ndim=2, shape_hint="[N, D]", finite=True)
    check_tensor("keys", keys, ndim=2, shape_hint="[N, Dk]", finite=True)
    n = hidden.shape[0]
    if n < 1 or keys.shape[0] != n:
        raise ValueError(
            f"hidden and keys must hold the same N >= 1 tokens, got hidden {tuple(hidden.shape)} "
            f"and keys {tuple(keys.shape)}"
        )
    if k is None and cutoff is None:
        raise ValueError("give a token budget k, a cutoff (official PACT: 0.21), or both")
    k = None if k is None else check_k(k, n)
    cutoff = 0.0 if cutoff is None else _check_number("cutoff", cutoff, 0.0)
    coef_pruned = _check_number("coef_pruned", coef_pruned, 0.0)
    prune_keep = _check_number("prune_keep", prune_keep, 0.0, 1.0)
    dc = _check_number("dc", dc, 1e-12)
    device = hidden.device

    if importance is None:
        clustered = torch.arange(n, device=device)
        pruned = clustered[:0]
    else:
        check_tensor("importance", importance, ndim=1, shape_hint="[N]", finite=True)
        if importance.shape[0] != n:
            raise ValueError(f"importance must be [N] with N = {n}, got shape {tuple(importance.shape)}")
        top = topk_lowtie(importance.to(compute_dtype(importance)), max(1, int(prune_keep * n)))
        mask = torch.zeros(n, dtype=torch.bool, device=device)
        mask[top] = True
        clustered, pruned = mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)

    budget = None if k is None else min(k, clustered.numel())
    labels, cutoff = dbdpc_cluster(keys[clustered], cutoff, dc, k=budget, return_cutoff=True)
    centres = (labels == torch.arange(labels.numel(), device=device)).nonzero().squeeze(1)
    slot = torch.full((labels.numel(),), -1, dtype=torch.long, device=device)
    slot[centres] = torch.arange(centres.numel(), device=device)
    members, groups = clustered, slot[labels]

    if pruned.numel() > 0:
        dtype = compute_dtype(keys)
        far = 1.0 - unit_rows(keys[pruned], dtype) @ unit_rows(keys[clustered[centres]], dtype).T
        best, nearest = far.min(dim=1)  # first (lower-index) centre on ties
        joins = best <= coef_pruned * cutoff
        members = torch.cat([members, pruned[joins]])
        groups = torch.cat([groups, nearest[joins]])

    dtype = compute_dtype(hidden)
    sums = torch.zeros(centres.numel(), hidden.shape[1], dtype=dtype, device=device)
    sums.index_add_(0, groups, hidden[members].to(dtype))
    sizes = torch.bincount(groups, minlength=centres.numel())
    merged = (sums / sizes.unsqueeze(1).to(dtype)).to(hidden.dtype)
    assignment = torch.full((n,), -1, dtype=torch.long, device=device)
    assignment[members] = groups
    return PactMerge(clustered[centres], merged, sizes, float(cutoff), assignment)
