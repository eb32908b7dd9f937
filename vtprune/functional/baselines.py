"""VisPruner, CDPruner and grid pooling: the visual-token baselines of recent pruning papers.

* :func:`vispruner_select` — Theia-4869/VisPruner (ICCV 2025), ``llava/model/llava_arch.py``
  (``encode_images``), commit aefa01ad;
* :func:`cdpruner_select` — Theia-4869/CDPruner (NeurIPS 2025), ``llava/model/llava_arch.py``
  (``encode_images``), commit 9541616c;
* :func:`pool_windows` — the "downsample" baseline of UniPruneBench / VTC-Bench: 2-D average pooling of a token grid.
"""

from __future__ import annotations

import math

import torch

from ._common import check_int, check_k, check_tensor, compute_dtype, topk_lowtie, unit_rows

__all__ = ["cdpruner_relevance", "cdpruner_select", "pool_windows", "vispruner_select"]

#: tokens the official VisPruner removes per duplicate-removal round
VISPRUNER_ROUND = 8
#: largest residual similarity matrix VisPruner computes once (2**26 float32 = 256 MiB); above it, per round
GRAM_ELEMENTS = 1 << 26


def vispruner_select(
    cls_attn: torch.Tensor, features: torch.Tensor, k: int, important_ratio: float = 0.5
) -> torch.Tensor:
    """VisPruner token selection: important tokens by [CLS] attention, then diverse tokens by repeated bipartite
    duplicate removal (Theia-4869/VisPruner ``encode_images``, commit aefa01ad).

    1. ``T_imp = int(k * important_ratio)`` important tokens: the highest ``cls_attn`` (ties -> lower index).
    2. The other tokens form the residual list, in descending-attention order (ties -> lower index). While the
       residual list holds ``R > T_div = k - T_imp`` tokens: ``r = min(8, R - T_div)``; split the list by alternating
       positions into A (positions 0, 2, 4, ...) and B (1, 3, 5, ...); score each A token by its maximum cosine
       similarity to B; remove the ``min(r, |A|)`` highest-scoring A tokens; the new list is the surviving A tokens in
       descending score (ties -> earlier in A) followed by B in order.
    3. Kept = important + residual, ascending.

    Rules where the official code has none (docs/methods.md):

    * odd ``R``: A has one token more than B. The official code then fails on an index-shape mismatch (it sizes
      the survivors as ``R // 2 - r``); here the unpaired last A token is scored against B like every other A token.
    * ``T_div = 0`` (``important_ratio = 1``): plain top-k by attention (the official loop would remove residual
      tokens until B is empty and then fail on an empty maximum).

    The residual tokens' cosine similarities are computed once (one ``R x R`` product, up to ``GRAM_ELEMENTS``
    entries) and each round reads its ``A x B`` block from them, where the official code recomputes that block every
    round (about ``N / 8`` rounds); the values are the same dot products (a different summation blocking can change
    their last bits, so near-ties may break differently, as they do under the official code's own rounding).

    Args:
        cls_attn: ``[N]`` head-mean attention of the [CLS] query to each patch (softmax over all keys including
            CLS, CLS column dropped), of the vision layer whose features the projector reads.
        features: ``[N, C]`` that layer's patch features (the projector's input).
        k: tokens kept, ``1 <= k <= N``.
        important_ratio: fraction of ``k`` chosen by attention, ``0 <= important_ratio <= 1`` (official 0.5).

    Returns: ``[k]`` int64 ascending indices. Raises ``TypeError`` / ``ValueError`` on bad shapes or values.
    """
    check_tensor("cls_attn", cls_attn, ndim=1, shape_hint="[N]", finite=True)
    check_tensor("features", features, ndim=2, shape_hint="[N, C]", finite=True)
    n = cls_attn.shape[0]
    if features.shape[0] != n:
        raise ValueError(
            f"cls_attn [N] and features [N, C] must agree on N, got {tuple(cls_attn.shape)} and {tuple(features.shape)}"
        )
    k = check_k(k, n)
    if (
        isinstance(important_ratio, bool)
        or not isinstance(important_ratio, (int, float))
        or not 0.0 <= float(important_ratio) <= 1.0
    ):
        raise ValueError(f"important_ratio must be a number in [0, 1], got {important_ratio!r}")
    dt = compute_dtype(cls_attn, features)
    n_imp = int(k * float(important_ratio))
    n_div = k - n_imp
    order = topk_lowtie(cls_attn.to(dt), n)  # descending attention, ties -> lower index
    important, residual = order[:n_imp], order[n_imp:]
    if n_div == 0:
        residual = residual[:0]
    units = unit_rows(features, dt)
    # the residual tokens' cosine similarities, once (the official code recomputes A x B every round: ~N / 8 rounds
    # of an (R/2)^2 C product); above GRAM_ELEMENTS entries, per round as the official code does
    gram = None
    if residual.numel() ** 2 <= GRAM_ELEMENTS:
        gram = units[residual] @ units[residual].T
        pos = torch.arange(residual.numel(), device=residual.device)  # positions into gram
    else:
        pos = residual
    while True:
        r = min(VISPRUNER_ROUND, pos.numel() - n_div)
        if r <= 0:
            break
        a, b = pos[0::2], pos[1::2]
        sim = gram.index_select(0, a).index_select(1, b) if gram is not None else units[a] @ units[b].T
        ranked = topk_lowtie(sim.max(dim=1).values, a.numel())  # descending score, ties -> earlier in A
        pos = torch.cat([a[ranked[min(r, a.numel()) :]], b])
    kept = residual[pos] if gram is not None else pos
    return torch.cat([important, kept]).sort().values


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
    check_tensor("features", features, ndim=2, shape_hint="[N, D]", finite=True)
    n = features.shape[0]
    check_tensor("image_embeds", image_embeds, ndim=2, shape_hint="[N, C]", finite=True)
    if image_embeds.shape[0] != n:
        raise ValueError(
            f"features [N, D] and image_embeds [N, C] must agree on N, got {tuple(features.shape)} and "
            f"{tuple(image_embeds.shape)}"
        )
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


def pool_windows(height: int, width: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of 2-D average pooling of a row-major ``height x width`` token grid to exactly ``k`` tokens.

    The grid is cut into ``h`` bands of rows, ``h = clamp(round(height * sqrt(k / (height * width))), ceil(k / width),
    min(height, k))`` (the pooled grid keeps the grid's aspect ratio); band ``i`` holds ``c_i`` windows, ``k`` split as
    evenly as possible over the bands (``k // h`` each, the ``k % h`` extra windows spread evenly, later bands first
    within each stride). Band and window edges are those of ``adaptive_avg_pool2d``: ``n`` parts of a length ``L`` are
    ``floor(i L / n) .. ceil((i + 1) L / n) - 1``. When ``k = h * w`` this is exactly ``adaptive_avg_pool2d`` to
    ``h x w`` (e.g. 24 x 24 -> 8 x 8 for 64); otherwise the bands differ by one window (13 of 4 x 4: bands of 3, 3, 3,
    4).

    Returns ``(first, weights)``: ``first`` ``[k]`` int64, the row-major grid index of each window's first (top-left)
    token, ascending; ``weights`` ``[k, height * width]`` float32 with ``weights @ x`` the window means of per-token
    vectors ``x`` ``[height * width, D]``.
    """
    height, width = check_int("height", height, 1), check_int("width", width, 1)
    k = check_int("k", k, 1, height * width)
    h = round(height * math.sqrt(k / (height * width)))
    h = min(height, k, max(h, -(-k // width), 1))
    counts = [k // h + ((i + 1) * (k % h) // h - i * (k % h) // h) for i in range(h)]

    def bounds(size, parts):
        return [(i * size // parts, -((-(i + 1) * size) // parts)) for i in range(parts)]

    weights = torch.zeros(k, height * width)
    first = torch.empty(k, dtype=torch.long)
    grid = torch.arange(height * width).view(height, width)
    out = 0
    for (r0, r1), count in zip(bounds(height, h), counts):
        for c0, c1 in bounds(width, count):
            cell = grid[r0:r1, c0:c1].reshape(-1)
            weights[out, cell] = 1.0 / cell.numel()
            first[out] = int(cell[0])
            out += 1
    return first, weights
