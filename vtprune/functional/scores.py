"""Attention-derived token scores and tie-stable top-k selection."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._common import BLOCK_ELEMENTS, as_int, check_k, check_tensor, compute_dtype, topk_lowtie

__all__ = ["cls_scores", "received_attention", "topk_indices"]


def _layer_indices(layers, num_layers: int) -> list:
    """Normalise ``layers`` (slice, int or sequence of ints) to a list of non-negative indices."""
    if isinstance(layers, slice):
        idx = list(range(num_layers)[layers])
        if not idx:
            raise ValueError(f"layers={layers!r} selects no layer of the {num_layers} available")
        return idx
    if isinstance(layers, bool) or isinstance(layers, (str, bytes)):
        raise TypeError(f"layers must be a slice, an int or a sequence of ints, got {layers!r}")
    if isinstance(layers, torch.Tensor) and layers.ndim == 0:
        items = [layers]
    else:
        try:
            items = list(layers)
        except TypeError:  # not iterable: a single index (int, numpy integer, ...)
            if not hasattr(layers, "__index__"):
                raise TypeError(
                    f"layers must be a slice, an int or a sequence of ints, got {type(layers).__name__}"
                ) from None
            items = [layers]
    if not items:
        raise ValueError("layers is an empty sequence; give at least one layer index")
    out = []
    for item in items:
        i = as_int(item, "layers must contain ints")
        if not -num_layers <= i < num_layers:
            raise ValueError(
                f"layer index {i} is out of range for {num_layers} layers (allowed: {-num_layers} .. {num_layers - 1})"
            )
        out.append(i % num_layers)
    if len(set(out)) != len(out):
        raise ValueError(f"layers={list(items)!r} names the same layer more than once (normalised: {out})")
    return out


def cls_scores(cls_attn: torch.Tensor, layers: slice | int | Sequence[int]) -> torch.Tensor:
    """VTC-CLS token scores from CLS-query attention rows.

    ``score[..., i] = sum_{l in layers} mean_h cls_attn[..., l, h, 1 + i]``

    i.e. per selected layer the CLS query's attention row is averaged over heads, the CLS key
    (position 0) is dropped, and the rows are summed over the selected layers.
    Follows THU-MIG/VTC-CLS, whose default is ``layers=slice(start_layer, -1)`` (the last vision
    layer excluded; ``start_layer`` 16 of 24 for LLaVA-1.5).

    Args:
        cls_attn: ``[..., L, H, 1 + N]`` attention of the CLS query per layer and head (any leading
            batch dimensions).
        layers: a ``slice``, an ``int`` or a sequence of distinct ints indexing the ``L`` axis
            (negative indices count from the end).

    Returns:
        ``[..., N]`` scores, float32 (float64 if ``cls_attn`` is float64).
    """
    check_tensor("cls_attn", cls_attn, min_ndim=3, shape_hint="[..., L, H, 1+N]")
    if cls_attn.shape[-1] < 2:
        raise ValueError(
            f"cls_attn must have at least 2 keys on its last axis (CLS + >=1 patch), got shape {tuple(cls_attn.shape)}"
        )
    if cls_attn.shape[-2] < 1:
        raise ValueError(f"cls_attn has no heads (shape {tuple(cls_attn.shape)})")
    idx = _layer_indices(layers, cls_attn.shape[-3])
    index = torch.tensor(idx, dtype=torch.long, device=cls_attn.device)
    rows = cls_attn.index_select(-3, index)[..., 1:]
    return rows.to(compute_dtype(cls_attn)).mean(dim=-2).sum(dim=-2)


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, returned in ascending index order.

    Ties rank by lower index: among equal scores the lower index is kept first. Scores are
    compared in float32 (float64 for float64 input). This is the top-R / top-k step of FastV
    (pkunlp-icler/FastV) and VTC-CLS (THU-MIG/VTC-CLS), re-sorted to the original order as both do.

    Args:
        scores: ``[N]`` or ``[B, N]`` (one row per image); no NaN.
        k: number of tokens to keep, ``1 <= k <= N``.

    Returns:
        int64 ``[k]`` or ``[B, k]`` on ``scores.device``, ascending along the last axis.
    """
    check_tensor("scores", scores, ndim=(1, 2), shape_hint="[N] or [B, N]")
    k = check_k(k, scores.shape[-1])
    s = scores.to(compute_dtype(scores)) if scores.is_floating_point() else scores
    if s.is_floating_point() and bool(torch.isnan(s).any()):
        raise ValueError("scores contains NaN; scores must be comparable numbers")
    return topk_lowtie(s, k).sort(dim=-1).values


def received_attention(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scaling: float, block_elements: int = BLOCK_ELEMENTS
) -> torch.Tensor:
    """Attention each token *receives* in one self-attention layer: the mean over heads and over every query of
    its block of ``softmax(q . k^T * scaling)``, the importance signal of CLS-scored methods on towers without a
    CLS token.

    ``score[j] = mean_h mean_{i in block(j)} softmax_{j' in block(j)}(scaling * q[i, h] . k[j', h // (H / Hkv)])[j]``

    Unit: a probability mass per token; the scores of each block of ``T`` tokens sum to 1 (each query's row sums to
    1, averaged over the ``T`` queries), so a uniform attention gives ``1 / T``. Source: a port, not part of either
    paper's method. The official VTC-CLS (THU-MIG/VTC-CLS) and
    VisionZip (dvlab-research/VisionZip @ 3151f6d, LLaVA CLIP towers only) code score patches by the CLS query's
    row; towers without a CLS token (SigLIP, Qwen's ViT, InternViT after pixel shuffle) have no such row, and the
    column mean over all queries (what every token receives) is the substitute vtprune offers (issue 13).

    Computed from q/k directly (the model's attention kernel never returns weights), query rows in chunks so that
    at most ``block_elements`` logits are held at once (bounded memory at thousands of tokens), in float32
    (float64 for float64 input).

    Args:
        q: ``[N, H, Dh]`` queries of all tokens, as the layer uses them (after q norm and rotary embedding).
        k: ``[N, Hkv, Dh]`` keys, ``H`` a multiple of ``Hkv`` (grouped keys serve ``H / Hkv`` query heads each).
        cu_seqlens: ``[B + 1]`` integer, ascending, from 0 to ``N``: tokens ``cu_seqlens[b]:cu_seqlens[b+1]``
            attend among themselves only (a crop, a frame, an attention window); empty blocks are allowed.
        scaling: the factor applied to ``q . k`` before the softmax (``Dh ** -0.5`` in most towers), finite > 0.
        block_elements: most logits computed at once (>= 1).

    Returns:
        ``[N]`` float32 (float64) on ``q.device``.

    Raises:
        TypeError / ValueError: on shapes, dtypes, boundaries or a scaling outside those above.
    """
    check_tensor("q", q, ndim=3, shape_hint="[N, H, Dh]")
    check_tensor("k", k, ndim=3, shape_hint="[N, Hkv, Dh]")
    n, h, d = q.shape
    if k.shape[0] != n or k.shape[2] != d or k.shape[1] < 1 or h % k.shape[1]:
        raise ValueError(
            f"k must be [N, Hkv, Dh] = [{n}, Hkv, {d}] with H={h} a multiple of Hkv, got shape {tuple(k.shape)}"
        )
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, shape_hint="[B + 1]")
    if cu_seqlens.is_floating_point():
        raise TypeError(f"cu_seqlens must be an integer tensor, got dtype {cu_seqlens.dtype}")
    bounds = [int(b) for b in cu_seqlens.tolist()]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != n or any(b > a for a, b in zip(bounds[1:], bounds)):
        raise ValueError(f"cu_seqlens must ascend from 0 to N={n} (block boundaries), got {bounds}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not 0 < float(scaling) < float("inf"):
        raise ValueError(f"scaling must be a finite number > 0, got {scaling!r}")
    step_budget = as_int(block_elements, "block_elements must be an int")
    if step_budget < 1:
        raise ValueError(f"block_elements must be >= 1, got {step_budget}")
    dt = compute_dtype(q, k)
    group = h // k.shape[1]
    out = torch.zeros(n, dtype=dt, device=q.device)
    for start, end in zip(bounds[:-1], bounds[1:]):
        t = end - start
        if t == 0:
            continue
        kb = k[start:end].to(dt).transpose(0, 1).repeat_interleave(group, dim=0)  # [H, T, Dh]
        qb = q[start:end].to(dt).transpose(0, 1)  # [H, T, Dh]
        rows = max(1, step_budget // (h * t))
        total = torch.zeros(t, dtype=dt, device=q.device)
        for r in range(0, t, rows):
            logits = (qb[:, r : r + rows] @ kb.transpose(-1, -2)) * float(scaling)  # [H, r, T]
            total += logits.softmax(dim=-1).sum(dim=(0, 1))
        out[start:end] = total / (h * t)
    return out
