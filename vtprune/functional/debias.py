"""Attention debiasing (intcomp/attention-bias): padding mask and score re-weighting."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from fractions import Fraction

import torch

from ._common import check_int, check_tensor, compute_dtype

__all__ = ["pad_mask", "debias_scores", "trend_weights", "fit_trend"]

#: official FastV recency trend of intcomp/attention-bias: p(i) = 1 + 3.0152e-3 i - 1.45979e-5 i^2 + 2.56911e-8 i^3
FASTV_CUBIC = (1.0, 3.0152e-3, -1.45979e-5, 2.56911e-8)
_TRENDS = ("cubic", "exp")


def _real_fractions(lo: Fraction, hi: Fraction, grid: int, patch: Fraction) -> list:
    """Fraction of each of ``grid`` patches (along one axis) that lies inside ``[lo, hi]``."""
    out = []
    for i in range(grid):
        a, b = i * patch, (i + 1) * patch
        overlap = max(Fraction(0), min(b, hi) - max(a, lo))
        out.append(overlap / patch)
    return out


def pad_mask(image_size: Sequence[int], grid: int = 24, resolution: int = 336, threshold: float = 0.5) -> torch.Tensor:
    """Which patches of a padded-to-square image hold real content.

    LLaVA-1.5 pads an image of size ``(w, h)`` to a centred square of side ``s = max(w, h)`` and
    resizes it to ``resolution``; the grid has patches of side ``resolution / grid``. Along the
    short axis the content occupies ``[pad, resolution - pad]`` with
    ``pad = (s - min(w, h)) / (2 s) * resolution``. A patch is padding when its padded area
    fraction ``1 - overlap_area / patch_area`` is strictly greater than ``threshold``.
    Follows ``generate_pad_mask`` of intcomp/attention-bias (threshold 0.5 used with FastV),
    computed in exact rational arithmetic so boundary cases do not depend on rounding.

    Args:
        image_size: ``(w, h)`` of the original image (PIL's ``image.size`` order), positive ints.
        grid: patches per side (24 for LLaVA-1.5 at 336 px).
        resolution: side of the resized square image in pixels.
        threshold: padded-area fraction above which a patch counts as padding, in ``[0, 1]``.

    Returns:
        bool ``[grid * grid]`` (CPU), row-major over the grid (row = y), True for real content.
    """
    if isinstance(image_size, (str, bytes)):
        raise TypeError(f"image_size must be a (width, height) pair of ints, got {image_size!r}")
    try:
        size = list(image_size)
    except TypeError:
        raise TypeError(f"image_size must be a (width, height) pair of ints, got {type(image_size).__name__}") from None
    if len(size) != 2:
        raise ValueError(f"image_size must be a (width, height) pair, got {len(size)} values: {size!r}")
    w = check_int("image_size[0] (width)", size[0], 1)
    h = check_int("image_size[1] (height)", size[1], 1)
    grid = check_int("grid", grid, 1)
    resolution = check_int("resolution", resolution, 1)
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, numbers.Real)
        or not math.isfinite(threshold)
        or not 0.0 <= threshold <= 1.0
    ):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")

    side = max(w, h)
    res = Fraction(resolution)
    patch = res / grid
    full = [Fraction(1)] * grid
    pad_x = Fraction(side - w, 2 * side) * res
    pad_y = Fraction(side - h, 2 * side) * res
    fx = _real_fractions(pad_x, res - pad_x, grid, patch) if w < side else full
    fy = _real_fractions(pad_y, res - pad_y, grid, patch) if h < side else full
    thr = Fraction(float(threshold))
    mask = [not (1 - ry * rx > thr) for ry in fy for rx in fx]
    return torch.tensor(mask, dtype=torch.bool)


def debias_scores(
    scores: torch.Tensor, weight: torch.Tensor | None = None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Debiased attention scores: ``out = scores * weight``, then ``out = 0`` where ``mask`` is False.

    ``weight`` is the recency de-trending weight ``w_i = 1 / trend(i)`` normalised to ``w_0 = 1``
    (intcomp/attention-bias ships fitted vectors: a cubic trend for FastV, ``exp(-beta i)`` for
    other pruners); ``mask`` is the real-content mask of :func:`pad_mask` (padding patches get
    score 0, as in the official code). Either may be None (weight 1 / everything real).

    Args:
        scores: ``[..., N]`` attention scores.
        weight: tensor broadcastable to ``scores`` (typically ``[N]``, broadcast over the last axis).
        mask: bool tensor broadcastable to ``scores`` (typically ``[N]``), True = keep the score.

    Returns:
        Tensor of ``scores``' shape, float32 (float64 if ``scores`` is float64), on
        ``scores.device`` (``weight`` and ``mask`` are moved there).
    """
    check_tensor("scores", scores, min_ndim=1, shape_hint="[..., N]")
    dtype = compute_dtype(scores)
    out = scores.to(dtype)
    if weight is not None:
        check_tensor("weight", weight, shape_hint="broadcastable to scores")
        _check_broadcast("weight", weight, scores)
        out = out * weight.to(device=scores.device, dtype=dtype)
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a bool torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(
                f"mask must have dtype torch.bool (True = real content), got {mask.dtype}; "
                "convert a 0/1 mask with mask.bool()"
            )
        _check_broadcast("mask", mask, scores)
        out = torch.where(mask.to(scores.device), out, torch.zeros((), dtype=dtype, device=scores.device))
    elif weight is None:
        out = out.clone() if out is scores else out
    return out


def _check_broadcast(name: str, t: torch.Tensor, scores: torch.Tensor) -> None:
    try:
        shape = torch.broadcast_shapes(t.shape, scores.shape)
    except RuntimeError:
        shape = None
    if shape != scores.shape:
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} does not broadcast to scores of shape "
            f"{tuple(scores.shape)} (give [N] = [{scores.shape[-1]}] or a shape "
            "broadcastable to scores)"
        )


def trend_weights(n: int, kind: str, coefficients: Sequence[float]) -> torch.Tensor:
    """Recency de-trending weights ``w_i = trend(0) / trend(i)`` for image-token index ``i = 0 .. n-1`` (float32).

    * ``kind="cubic"``: ``trend(i) = c0 + c1 i + c2 i^2 + c3 i^3`` (``coefficients = (c0, c1, c2, c3)``; the
      official FastV vector is :data:`FASTV_CUBIC`);
    * ``kind="exp"``: ``trend(i) = exp(beta i)`` (``coefficients = (beta,)``), so ``w_i = exp(-beta i)``, the
      form intcomp/attention-bias ships for the other pruners (beta about 0.0017-0.0046).

    A trend that is not positive on ``0 .. n-1`` raises ``ValueError`` (its weights would flip or blow up).
    """
    n = check_int("n", n, 1)
    if kind not in _TRENDS:
        raise ValueError(f"kind must be one of {_TRENDS}, got {kind!r}")
    coeffs = [float(c) for c in coefficients]
    want = 4 if kind == "cubic" else 1
    if len(coeffs) != want or not all(math.isfinite(c) for c in coeffs):
        raise ValueError(f"a {kind!r} trend needs {want} finite coefficient(s), got {list(coefficients)!r}")
    i = torch.arange(n, dtype=torch.float64)
    if kind == "exp":
        return torch.exp(-coeffs[0] * i).float()
    trend = _cubic(i, coeffs)
    if (problem := _not_positive(trend)) is not None:
        raise ValueError(f"the cubic trend {coeffs} {problem}, so it cannot de-trend {n} image tokens (0..{n - 1})")
    return (trend[0] / trend).float()


def _cubic(i: torch.Tensor, c) -> torch.Tensor:
    return c[0] + c[1] * i + c[2] * i**2 + c[3] * i**3


def _not_positive(trend: torch.Tensor) -> str | None:
    """Where a trend stops being positive (its valid range), or None when it is positive everywhere."""
    bad = (trend <= 0).nonzero()
    if not bad.numel():
        return None
    first = int(bad[0])
    valid = f"is positive on positions 0..{first - 1} only" if first else "is not positive at position 0"
    return f"{valid} (it reaches {float(trend[first]):.3g} at position {first})"


def fit_trend(mean_attention: torch.Tensor, kind: str) -> tuple[float, ...]:
    """Fit the positional trend of ``mean_attention[i]`` (attention to image token ``i`` averaged over images):
    least squares of a cubic polynomial normalised to ``trend(0) = 1`` (``kind="cubic"``), or of
    ``log a(i) = log A + beta i`` (``kind="exp"``, returns ``(beta,)``). Input of :func:`trend_weights`. A cubic
    fit that is not positive on every fitted position ``0 .. N-1`` raises ``ValueError`` naming its coefficients and
    where it crosses zero (its weights would flip sign there): fit ``"exp"`` instead."""
    check_tensor("mean_attention", mean_attention, ndim=1, shape_hint="[N]", finite=True)
    if kind not in _TRENDS:
        raise ValueError(f"kind must be one of {_TRENDS}, got {kind!r}")
    a = mean_attention.double()
    n = a.shape[0]
    if n < 4:
        raise ValueError(f"need at least 4 positions to fit a trend, got {n}")
    i = torch.arange(n, dtype=torch.float64)
    if kind == "exp":
        if not bool((a > 0).all()):
            raise ValueError("an exponential trend needs positive mean attention at every position")
        design = torch.stack([torch.ones_like(i), i], dim=1)
        sol = torch.linalg.lstsq(design, a.log()[:, None]).solution[:, 0]
        return (float(sol[1]),)
    design = torch.stack([i**p for p in range(4)], dim=1)
    sol = torch.linalg.lstsq(design, a[:, None]).solution[:, 0]
    if not float(sol[0]) > 0:
        raise ValueError(
            f"the fitted cubic trend has a non-positive value at position 0 ({float(sol[0]):.3g}); "
            "fit kind='exp' instead (always positive)"
        )
    coeffs = tuple(float(c / sol[0]) for c in sol)
    # a trend that crosses zero inside the fitted positions has no weights there
    if (problem := _not_positive(_cubic(i, coeffs))) is not None:
        raise ValueError(
            f"the cubic trend fitted on {n} positions, {list(coeffs)}, {problem}, so its weights would "
            "flip sign there: fit kind='exp' instead (always positive; `vtprune calibrate ... --kind exp`)"
        )
    return coeffs
