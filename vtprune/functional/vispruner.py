"""VisPruner (Theia-4869/VisPruner, ICCV 2025): important tokens by [CLS] attention, then diverse tokens by repeated
bipartite duplicate removal. Official code read: ``llava/model/llava_arch.py`` (``encode_images``), commit aefa01ad.
"""

from __future__ import annotations

import torch

from ._common import check_k, check_rows, compute_dtype, topk_lowtie, unit_rows

__all__ = ["vispruner_select"]

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
    n = check_rows(("cls_attn", cls_attn, "[N]"), ("features", features, "[N, C]"))
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
