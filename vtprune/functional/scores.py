"""Attention-derived token scores and tie-stable top-k selection."""

from __future__ import annotations

from typing import Sequence, Union

import torch

from ._common import as_int, check_k, check_tensor, compute_dtype, topk_lowtie

__all__ = ["cls_scores", "topk_indices"]


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
                raise TypeError("layers must be a slice, an int or a sequence of ints, "
                                f"got {type(layers).__name__}") from None
            items = [layers]
    if not items:
        raise ValueError("layers is an empty sequence; give at least one layer index")
    out = []
    for item in items:
        i = as_int(item, "layers must contain ints")
        if not -num_layers <= i < num_layers:
            raise ValueError(f"layer index {i} is out of range for {num_layers} layers "
                             f"(allowed: {-num_layers} .. {num_layers - 1})")
        out.append(i % num_layers)
    if len(set(out)) != len(out):
        raise ValueError(f"layers={list(items)!r} names the same layer more than once "
                         f"(normalised: {out})")
    return out


def cls_scores(cls_attn: torch.Tensor, layers: Union[slice, int, Sequence[int]]) -> torch.Tensor:
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
        raise ValueError("cls_attn must have at least 2 keys on its last axis (CLS + >=1 patch), "
                         f"got shape {tuple(cls_attn.shape)}")
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
