"""PyramidDrop (Cooperx521/PyramidDrop, CVPR 2025): at each stage boundary, the image tokens the last instruction
token attends to most are kept. Official code read: commit 6444f304, ``llava/model/modeling_llama_pdrop.py``
(``pdrop_rank_drop``).
"""

from __future__ import annotations

import math

import torch

from ._common import check_int, check_k, check_tensor, compute_dtype, topk_lowtie

__all__ = ["pdrop_select"]


def pdrop_select(
    query: torch.Tensor, keys: torch.Tensor, image_start: int, image_len: int, keep: int, scale: float | None = None
) -> torch.Tensor:
    """PyramidDrop's selection at one stage boundary: the image tokens the last instruction token attends to most.

    ``p = softmax(query . keys^T * scale)`` per head over all ``S`` keys, averaged over heads; the ``keep`` image
    tokens (positions ``image_start .. image_start + image_len - 1``) with the largest ``p`` are kept (ties -> lower
    index). Official ``pdrop_rank_drop``: layer K's input norm, ``q_proj`` / ``k_proj`` and RoPE applied to the
    output of layer K-1 (the stage boundary "after K layers"), the query at the last prompt token, the causal mask.
    The official code casts the softmax to the model dtype before the head mean; here everything is float32
    (float64 for float64 input).

    Args:
        query: ``[H, Dh]`` post-RoPE query of the last instruction token, one row per head.
        keys: ``[H, S, Dh]`` post-RoPE keys of the ``S`` tokens the query sees (grouped-query models: expand the
            kv heads to ``H`` first); the image must lie inside them.
        image_start, image_len: the image's first position in ``keys`` and its number of tokens (``>= 1``).
        keep: tokens to keep, ``1 <= keep <= image_len``.
        scale: logit scale, default ``1 / sqrt(Dh)`` (the official ``math.sqrt(head_dim)``).

    Returns:
        int64 ``[keep]`` ascending, relative to the image (0 = the token at ``image_start``).
    """
    check_tensor("query", query, ndim=2, shape_hint="[H, Dh]", finite=True)
    check_tensor("keys", keys, ndim=3, shape_hint="[H, S, Dh]", finite=True)
    h, s, dh = keys.shape
    if tuple(query.shape) != (h, dh):
        raise ValueError(
            f"query must be [H, Dh] = {[h, dh]} to match keys [H, S, Dh] = {list(keys.shape)}, got {list(query.shape)}"
        )
    image_start = check_int("image_start", image_start, 0)
    image_len = check_int("image_len", image_len, 1)
    if image_start + image_len > s:
        raise ValueError(
            f"the image (positions {image_start}..{image_start + image_len - 1}) must lie inside the {s} keys"
        )
    keep = check_k(keep, image_len, "image tokens")
    if scale is None:
        scale = 1.0 / math.sqrt(dh)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    dt = compute_dtype(query, keys)
    logits = torch.einsum("hd,hsd->hs", query.to(dt), keys.to(dt)) * scale
    p = logits.softmax(dim=-1).mean(dim=0)[image_start : image_start + image_len]
    return topk_lowtie(p, keep).sort().values
