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
    query: torch.Tensor | None,
    keys: torch.Tensor | None,
    image_start: int,
    image_len: int,
    keep: int,
    scale: float | None = None,
    *,
    mask: torch.Tensor | None = None,
    attention: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyramidDrop's selection at one stage boundary: the image tokens the last instruction token attends to most.

    ``p = softmax(query . keys^T * scale)`` per head over the ``S`` keys the query sees (``mask``), averaged over
    heads; the ``keep`` image tokens (positions ``image_start .. image_start + image_len - 1``) with the largest ``p``
    are kept (ties -> lower index). Official ``pdrop_rank_drop``: layer K's input norm, ``q_proj`` / ``k_proj`` and
    RoPE applied to the output of layer K-1 (the stage boundary "after K layers"), the query at the last prompt token,
    the causal mask. The official code casts the softmax to the model dtype before the head mean; here everything is
    float32 (float64 for float64 input).

    Where the probabilities are already computed (the method: the engine's ``text_attention`` row, masked for
    padding, causal order and a sliding window, and differentiable for the robustness attack), pass them as
    ``attention`` ``[H, S]`` and ``None`` for ``query`` and ``keys``: the head mean and top-k are the same.

    Args:
        query: ``[H, Dh]`` post-RoPE query of the last instruction token, one row per head (None with ``attention``).
        keys: ``[H, S, Dh]`` post-RoPE keys of the ``S`` tokens the query sees (grouped-query models: expand the
            kv heads to ``H`` first); the image must lie inside them (None with ``attention``).
        image_start, image_len: the image's first position in ``keys`` and its number of tokens (``>= 1``).
        keep: tokens to keep, ``1 <= keep <= image_len``.
        scale: logit scale, default ``1 / sqrt(Dh)`` (the official ``math.sqrt(head_dim)``).
        mask: optional bool ``[S]``, False for a key the query does not see (padding, later tokens, outside a
            sliding window): its probability is 0, the others renormalised (query / keys only).
        attention: ``[H, S]`` attention probabilities of the last instruction token per head, instead of ``query``
            and ``keys``.

    Returns:
        int64 ``[keep]`` ascending, relative to the image (0 = the token at ``image_start``).
    """
    if attention is not None:
        if query is not None or keys is not None or mask is not None or scale is not None:
            raise ValueError(
                "give either attention= (probabilities [H, S]) or query and keys (with optional scale / mask), "
                f"not both (got query={_shape(query)}, keys={_shape(keys)}, scale={scale!r}, mask={_shape(mask)})"
            )
        check_tensor("attention", attention, ndim=2, shape_hint="[H, S]", finite=True)
        s = attention.shape[1]
    else:
        if query is None or keys is None:
            raise ValueError(
                f"give query [H, Dh] and keys [H, S, Dh], or attention= [H, S]; got query={_shape(query)}, "
                f"keys={_shape(keys)}"
            )
        check_tensor("query", query, ndim=2, shape_hint="[H, Dh]", finite=True)
        check_tensor("keys", keys, ndim=3, shape_hint="[H, S, Dh]", finite=True)
        h, s, dh = keys.shape
        if tuple(query.shape) != (h, dh):
            raise ValueError(
                f"query must be [H, Dh] = {[h, dh]} to match keys [H, S, Dh] = {list(keys.shape)}, "
                f"got {list(query.shape)}"
            )
        if mask is not None:
            check_tensor("mask", mask, ndim=1, shape_hint="[S]", allow_bool=True)
            if mask.dtype != torch.bool or mask.numel() != s or not bool(mask.any()):
                raise ValueError(
                    f"mask must be a bool [S] = [{s}] tensor with at least one True, got dtype {mask.dtype}, "
                    f"shape {list(mask.shape)}"
                )
    image_start = check_int("image_start", image_start, 0)
    image_len = check_int("image_len", image_len, 1)
    if image_start + image_len > s:
        raise ValueError(
            f"the image (positions {image_start}..{image_start + image_len - 1}) must lie inside the {s} keys"
        )
    keep = check_k(keep, image_len, "image tokens")
    if attention is None:
        if scale is None:
            scale = 1.0 / math.sqrt(dh)
        elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"scale must be a positive number, got {scale!r}")
        dt = compute_dtype(query, keys)
        logits = torch.einsum("hd,hsd->hs", query.to(dt), keys.to(dt)) * scale
        if mask is not None:
            logits = logits.masked_fill(~mask.to(logits.device), float("-inf"))
        attention = logits.softmax(dim=-1)
    p = attention.to(compute_dtype(attention)).mean(dim=0)[image_start : image_start + image_len]
    return topk_lowtie(p, keep).sort().values


def _shape(x) -> str:
    return "None" if x is None else (f"[{', '.join(map(str, x.shape))}]" if isinstance(x, torch.Tensor) else repr(x))
