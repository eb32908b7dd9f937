"""HiPrune (Danielement321/HiPrune): anchor, buffer and register tokens from the vision tower's hierarchical attention.

Source: ``LLaVA/llava/model/llava_arch.py`` (``encode_images``, lines 140-184) and, for Qwen2.5-VL,
``Qwen2_5_VL/qwen2_5_vl_HiPrune.py`` (lines 1854-1881 and the attention reduction at lines 559-577), commit
6e83a1240874e99a25df34f54221a29bb24b7bc2.
"""

from __future__ import annotations

import math

import torch

from ._common import check_int, check_k, check_rows, compute_dtype, topk_lowtie

__all__ = ["hiprune_anchor_count", "hiprune_select"]


def hiprune_anchor_count(k: int, alpha: float) -> int:
    """Anchors for a budget of ``k`` tokens: ``round(k * alpha / 5)`` with Python's ``round`` (halves to even), as
    the official code computes it (``llava_arch.py`` line 153; ``qwen2_5_vl_HiPrune.py`` line 1861): each anchor
    brings up to 4 neighbours, so anchors and buffer take about ``alpha`` of the budget."""
    return round((k * float(alpha)) / 5)


def hiprune_select(
    object_attn: torch.Tensor, deep_attn: torch.Tensor, k: int, alpha: float = 0.1, width: int | None = None
) -> torch.Tensor:
    """HiPrune token selection over one ``N``-token grid stored row-major (raster order), ``width`` tokens a row.

    1. Anchors: the ``A = round(k * alpha / 5)`` tokens of highest ``object_attn`` (:func:`hiprune_anchor_count`).
    2. Buffer: each anchor's raster-index neighbours ``i - 1, i + 1, i - width, i + width``, with the anchors, clamped
       to ``[0, N - 1]`` and deduplicated. The official code does plain index arithmetic: a neighbour at a row end
       is *not* checked, so ``i - 1`` of a first-column token is the last token of the row above and ``i + 1`` of a
       last-column token the first token of the next row; an index beyond the grid is clamped, so ``i - width`` of
       a first-row token is token 0 and ``i + width`` of a last-row token is token ``N - 1``. The buffer (anchors
       included) has ``B <= 5 A`` tokens, every one counted against the budget.
    3. Registers: the ``k - B`` tokens of highest ``deep_attn`` outside the buffer.
    Kept: buffer + registers, ascending; exactly ``k`` tokens.

    Official code (commit 6e83a124): ``LLaVA/llava/model/llava_arch.py`` lines 146-174 — the attention inputs are
    ``attentions[l]`` of the CLIP tower (``output_attentions=True``), **averaged over heads and over all queries**
    (the CLS query included; softmax over all keys, CLS included; CLS column dropped: ``.mean(dim=1).mean(dim=1)[:,
    1:]``, lines 148 / 152; the CLS-row variant is commented out at lines 147 / 151), for ``deep_attn`` of the
    layer the projector reads (``attentions[mm_vision_select_layer]``, i.e. ``[-2]``) and for ``object_attn`` of
    ``attentions[HIPRUNE_OBJECT_LAYER - 1]`` (README default 9: the 9th of CLIP-L's 24 layers, index 8); anchors by
    ``topk`` (line 157); neighbours ``+-1`` and ``+-24`` (lines 158-162, the 24-token grid hard-coded), clamped to
    ``[0, 575]`` (line 163), ``torch.unique`` (line 164); registers by ``topk`` of ``deep_attn`` minus 1 on the
    buffer (lines 170-172). The Qwen2.5-VL port (``qwen2_5_vl_HiPrune.py`` lines 1856-1879) does the same with
    ``width`` = the image's merged-grid width and ``N - 1`` = its last token; its attention is the head mean summed
    over queries of each vision block, averaged over the 4 patches of each merge unit, at layer
    ``HIPRUNE_OBJECT_LAYER - 1`` (default 16: index 15) and at the last layer (lines 559-577, 1856-1857).

    Rules where the official code has none: ties rank by lower index (``topk`` does not promise an order); the
    buffer is excluded from the registers by masking (the official ``-= 1`` excludes it because attention
    probabilities are <= 1); if the buffer alone holds more than ``k`` tokens (only with ``alpha`` near 1 and a
    budget of a few tokens: ``round(3 * 1 / 5) = 1`` anchor and 5 buffer tokens for ``k = 3``), where the official
    ``topk`` fails on a negative count, the ``k`` buffer tokens of highest ``object_attn`` are kept (the anchors
    first: they have the highest ``object_attn`` of all).

    Args:
        object_attn: ``[N]`` attention of the middle ("object") vision layer per token, finite.
        deep_attn: ``[N]`` attention of the deep layer (the one the projector reads) per token, finite.
        k: tokens kept, ``1 <= k <= N``.
        alpha: share of the budget for anchors and buffer, ``0 <= alpha <= 1`` (official 0.1).
        width: tokens per grid row, ``1 <= width <= N``; None: ``sqrt(N)`` (a square grid; 24 for LLaVA-1.5).

    Returns: ``[k]`` int64 ascending indices.

    Raises: ``TypeError`` / ``ValueError`` on bad shapes or values (a non-square ``N`` without ``width``).
    """
    n = check_rows(("object_attn", object_attn, "[N]"), ("deep_attn", deep_attn, "[N]"))
    k = check_k(k, n)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1] (share of anchors and buffer; official 0.1), got {alpha!r}")
    if width is None:
        width = math.isqrt(n)
        if width * width != n:
            raise ValueError(
                f"hiprune_select: N={n} tokens are not a square grid; pass width= (tokens per row of the grid)"
            )
    width = check_int("width", width, 1, n)
    dt = compute_dtype(object_attn, deep_attn)
    obj = object_attn.to(dt)
    anchors = topk_lowtie(obj, min(hiprune_anchor_count(k, alpha), n))
    buffer = torch.cat([anchors, anchors - 1, anchors + 1, anchors - width, anchors + width]).clamp(0, n - 1).unique()
    if buffer.numel() > k:  # the official topk would fail on a negative register count (see above)
        buffer = buffer[topk_lowtie(obj[buffer], k)]
    deep = deep_attn.to(dt).clone()
    deep[buffer] = -math.inf
    registers = topk_lowtie(deep, k - buffer.numel())
    return torch.cat([buffer, registers]).sort().values
