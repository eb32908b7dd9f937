"""Pure-torch pieces that both ``vtprune.functional`` and the NVRTC back end of the native ops run (kernels sit below
functional, so the shared code lives here): DivPrune's first pick and the matmul rounding tolerance it uses."""

from __future__ import annotations

import math

import torch

#: upper bound on the elements of a temporary matrix (rows x N): 2**24 float32 = 64 MiB
BLOCK_ELEMENTS = 1 << 24


def near_zero_tol(dtype: torch.dtype, dim: int) -> float:
    """Relative rounding tolerance of a length-``dim`` dot product computed by a matrix multiply:
    ``4 sqrt(dim) eps``. Distances below it are treated as exactly 0 (duplicates)."""
    return 4.0 * math.sqrt(max(dim, 1)) * torch.finfo(dtype).eps


def farthest_nearest_neighbour(x: torch.Tensor, metric: str, block_elements: int = BLOCK_ELEMENTS) -> torch.Tensor:
    """``argmax_i min_{j != i} d(i, j)`` as a [1] long tensor (ties -> lower index); DivPrune's first pick.

    ``x`` ``[N, D]`` holds unit rows for ``metric="cosine"`` (d = 1 - cos) or raw rows for ``"l2"`` (compared
    through squared distances, which rank identically). Computed with matrix multiplies in blocks of at most
    ``block_elements`` distances;
    distances within matmul rounding of 0 (:func:`near_zero_tol`) are set to exactly 0, so duplicated tokens tie
    and the lower index wins.
    """
    n = x.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=x.device)
    nn = torch.empty(n, dtype=x.dtype, device=x.device)
    tol = near_zero_tol(x.dtype, x.shape[1])
    sq = x.square().sum(dim=1) if metric == "l2" else None
    step = max(1, block_elements // n)
    for start in range(0, n, step):
        blk = x[start : start + step]
        b = blk.shape[0]
        d = blk @ x.T  # [b, N], updated in place to bound memory
        if metric == "cosine":
            d.neg_().add_(1.0).clamp_(0.0, 2.0)
            d.masked_fill_(d <= tol, 0.0)
        else:
            scale = sq[start : start + b, None] + sq[None, :]
            d.mul_(-2.0).add_(scale).clamp_(min=0.0)
            d.masked_fill_(d <= scale.mul_(tol), 0.0)
        diag = torch.arange(b, device=x.device)
        d[diag, diag + start] = float("inf")
        nn[start : start + b] = d.min(dim=1).values
    return torch.argmax(nn).view(1)
