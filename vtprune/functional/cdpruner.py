"""CDPruner (Theia-4869/CDPruner, NeurIPS 2025): a conditional DPP over the visual tokens, greedy MAP inference.
Official code read: ``llava/model/llava_arch.py`` (``encode_images``), commit 9541616c.
"""

from __future__ import annotations

import math

import torch

from ._common import check_k, check_rows, check_tensor, compute_dtype, topk_lowtie, unit_rows

__all__ = ["cdpruner_relevance", "cdpruner_select"]


def _theta_exponent(theta) -> float:
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0.0 <= float(theta) < 1.0:
        raise ValueError(
            f"theta must be None or a number in [0, 1) (relevance exponent alpha = theta / "
            f"(2 (1 - theta))), got {theta!r}"
        )
    return float(theta) / (2.0 * (1.0 - float(theta)))


def cdpruner_relevance(image_embeds: torch.Tensor, text_embeds: torch.Tensor, theta=None) -> torch.Tensor:
    """CDPruner's per-token relevance ``[N]`` (``encode_images``, commit 9541616c): ``c_i = mean_m cos(E_i, Q_m)``,
    ``r = -c`` (the official sign), min-max normalised as ``(r - min + 1e-6) / (max - min)``; with ``theta``,
    ``r <- exp(alpha r)``, ``alpha = theta / (2 (1 - theta))``. If every ``r_i`` is equal (``max == min``, where the
    official code divides by zero) every token gets relevance 1 (the kernel is then the plain similarity)."""
    check_tensor("image_embeds", image_embeds, ndim=2, shape_hint="[N, C]", finite=True)
    check_tensor("text_embeds", text_embeds, ndim=2, shape_hint="[M, C]", finite=True)
    if text_embeds.shape[1] != image_embeds.shape[1] or text_embeds.shape[0] < 1:
        raise ValueError(
            f"text_embeds must be [M >= 1, C] with the C of image_embeds [N, C], got "
            f"{tuple(text_embeds.shape)} and {tuple(image_embeds.shape)}"
        )
    dt = compute_dtype(image_embeds, text_embeds)
    rel = -(unit_rows(image_embeds, dt) @ unit_rows(text_embeds, dt).T).mean(dim=1)
    lo, hi = rel.min(), rel.max()
    rel = (rel - lo + 1e-6) / (hi - lo) if bool(hi > lo) else torch.ones_like(rel)
    if theta is not None:
        rel = torch.exp(_theta_exponent(theta) * rel)
    return rel


def cdpruner_select(
    features: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor, k: int, theta=None
) -> torch.Tensor:
    """CDPruner: conditional DPP over the visual tokens, greedy MAP inference (Theia-4869/CDPruner
    ``encode_images``, commit 9541616c; Chen et al., "Fast Greedy MAP Inference for DPP", NeurIPS 2018).

    Kernel ``L = diag(r) S diag(r)``: ``S`` the cosine similarity of ``features`` (unit rows), ``r`` the relevance of
    :func:`cdpruner_relevance` (negated mean cosine of ``image_embeds`` to ``text_embeds``, min-max normalised). Greedy
    MAP with the incremental Cholesky update: ``d2 = diag(L)``; ``k`` times ``j = argmax d2`` (first index on ties),
    ``e = (L[j] - c[:, j]^T c) / sqrt(d2[j])``, append ``e`` to ``c``, ``d2 -= e^2``, ``d2[j] = -inf``; exactly ``k``
    picks, no epsilon stop. Rule where the official code has none: when the best remaining gain ``d2[j]`` is not
    positive (the kernel's rank is used up, e.g. duplicated tokens; the official code would divide by
    ``sqrt(d2[j]) <= 0``), the remaining picks are the unpicked tokens of highest relevance (ties -> lower index).

    Args:
        features: ``[N, D]`` projected visual tokens (LLM input space).
        image_embeds: ``[N, C]`` the same tokens in the text encoder's joint space (CLIP: ``visual_projection(
            post_layernorm(h))`` of the projector-read layer's patch states).
        text_embeds: ``[M, C]`` the instruction's text embeddings (CLIP: one row per 77-token segment).
        k: tokens kept, ``1 <= k <= N``.
        theta: None (official default) or a number in ``[0, 1)``: relevance exponent (see :func:`cdpruner_relevance`).

    Returns: ``[k]`` int64 ascending indices. Computed in float32 (float64 for float64 inputs).
    """
    n = check_rows(("features", features, "[N, D]"), ("image_embeds", image_embeds, "[N, C]"))
    k = check_k(k, n)
    rel = cdpruner_relevance(image_embeds, text_embeds, theta)
    dt = compute_dtype(features, rel)
    rel = rel.to(dt)
    units = unit_rows(features, dt)
    kernel = rel[:, None] * (units @ units.T) * rel[None, :]
    return _greedy_dpp(kernel, k, rel)


def _greedy_dpp(kernel: torch.Tensor, k: int, fallback: torch.Tensor) -> torch.Tensor:
    n = kernel.shape[0]
    chol = kernel.new_zeros(k, n)
    gains = torch.diagonal(kernel).clone()
    picks = torch.empty(k, dtype=torch.long, device=kernel.device)
    for i in range(k):
        j = int(torch.argmax(gains))
        if not gains[j] > 0:  # rank used up: fill by relevance
            rest = fallback.clone()
            rest[picks[:i]] = -math.inf
            picks[i:] = topk_lowtie(rest, k - i)
            break
        picks[i] = j
        e = (kernel[j] - chol[:i, j] @ chol[:i]) / gains[j].sqrt()
        chol[i] = e
        gains -= e.square()
        gains[j] = -math.inf
    return picks.sort().values
