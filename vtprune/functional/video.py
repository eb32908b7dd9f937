"""Shared primitives of the video methods: input checks, frame similarity, DySeg segmentation, DPC-KNN scores.

One video per call: ``features`` is ``[T, N, D]`` (T frames of N post-merger tokens in raster order); token
``i`` of frame ``t`` has the flat index ``t * N + i``.
"""

from __future__ import annotations

import math

import torch

from ._common import check_int, check_tensor, compute_dtype, topk_lowtie

__all__ = ["check_video", "frame_similarity", "dyseg_segments", "dpc_knn_scores"]


def check_video(name: str, x, shape_hint: str = "[T, N, D]") -> torch.Tensor:
    """``x`` must be a finite floating ``[T, N, D]`` tensor with ``T, N, D >= 1``."""
    check_tensor(name, x, ndim=3, shape_hint=shape_hint, finite=True)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor {shape_hint}, got dtype {x.dtype}")
    if min(x.shape) < 1:
        raise ValueError(f"{name} must have T, N, D >= 1 {shape_hint}, got shape {tuple(x.shape)}")
    return x


def check_fraction(name: str, value, low_open: bool, high_open: bool, low: float = 0.0, high: float = 1.0) -> float:
    """``value`` as a float in the interval given (open or closed ends), else ``ValueError``/``TypeError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    v = float(value)
    ok_low = v > low if low_open else v >= low
    ok_high = v < high if high_open else v <= high
    if not (math.isfinite(v) and ok_low and ok_high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return v


def frame_similarity(features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of consecutive frames' mean tokens (FastVID's DySeg input).

    ``g_t = mean_i features[t, i]`` normalised to unit length, ``s_t = <g_t, g_{t+1}>`` for ``t < T - 1``
    (FastVID ``modeling_qwen2_5_vl.py`` lines 1836 and 1899-1900). Returns ``[T - 1]`` float32 (float64 for
    float64 input).
    """
    check_video("features", features)
    g = features.to(compute_dtype(features)).mean(dim=1)
    g = g / g.norm(dim=1, keepdim=True)
    return (g[:-1] * g[1:]).sum(dim=1)


def dyseg_segments(features: torch.Tensor, c: int = 8, tau: float = 0.84) -> list[int]:
    """DySeg (FastVID's dynamic temporal segmentation): segment lengths, in frame order, summing to T.

    With ``s = frame_similarity(features)`` (``[T - 1]``), a segment ends after frame ``t`` when ``s_t`` is one of
    the ``c - 1`` smallest (ties -> lower ``t``) or ``s_t < tau``; the last segment ends at frame ``T - 1``.
    Official: LunarShen/FastVID ``fastvid_qwen25vl/lmms-eval/lmms_eval/models/qwenvlutils/modeling_qwen2_5_vl.py``
    lines 1899-1910, commit a40a109cb8df20e8c2c17c6850f8269717369990. Deviations: the official ``topk`` fails when
    ``T - 1 < c - 1`` (and ``T = 1``); here it takes ``min(c - 1, T - 1)`` cuts, and ``T = 1`` is one segment.

    Args:
        features: ``[T, N, D]`` one video's post-merger tokens.
        c: ``>= 1``; at least ``min(c, T)`` segments.
        tau: cut wherever consecutive frames' cosine similarity is below it (any float).
    """
    c = check_int("c", c, 1)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau):
        raise ValueError(f"tau must be a finite float, got {tau!r}")
    s = frame_similarity(features)
    t = features.shape[0]
    cut = torch.zeros(max(t - 1, 0), dtype=torch.bool, device=features.device)
    cut[topk_lowtie(s, min(c - 1, t - 1), largest=False)] = True
    cut |= s < tau
    ends = cut.nonzero().squeeze(1).tolist() + [t - 1]
    return [e - b for b, e in zip([-1] + ends[:-1], ends)]


def dpc_knn_scores(x: torch.Tensor, neighbours: int) -> torch.Tensor:
    """DPC-KNN density-peak scores ``rho * delta`` of the rows of ``x`` ``[M, D]`` (higher = better centre).

    ``d_ij = ||x_i - x_j|| / sqrt(D)``; ``rho_i = exp(-mean of d^2 over the `neighbours` nearest rows, itself
    included)``; ``delta_i`` = distance to the nearest row of strictly higher density (the largest entry of ``d``
    for the densest). The official codes (FastVID, SparseVLM) add ``1e-6 * rand`` to ``rho``; here there is no noise
    (ties in the caller's ranking go to the lower index). ``neighbours`` is clipped to ``M``. Returns ``[M]`` in the
    compute dtype (float32, or float64 for float64 input).
    """
    check_tensor("x", x, ndim=2, shape_hint="[M, D]", finite=True)
    m, d = x.shape
    k = min(check_int("neighbours", neighbours, 1), m)
    xf = x.to(compute_dtype(x))
    dist = torch.cdist(xf, xf, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(d)
    nearest = torch.sort(dist, dim=1, stable=True).values[:, :k]
    density = (-(nearest**2).mean(dim=1)).exp()
    denser = density[None, :] > density[:, None]  # [i, j]: j denser than i
    delta = torch.where(denser, dist, dist.max()).min(dim=1).values
    return delta * density
