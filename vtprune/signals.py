"""Cheap attention signals, recomputed from one layer's q/k so the model keeps its fast attention kernel.

* ``cls_attention_rows``: the CLS query's attention row of a CLIP vision layer (one query, all keys).
* ``decoder_qk`` + ``query_attention``: the attention of one query position (the last prompt token) over all
  keys of a decoder layer, post-RoPE, GQA-aware, padding masked.

All returned probabilities are float32 (float64 if the inputs are float64).
"""

from __future__ import annotations

import torch
from torch import nn


def _score_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def cls_attention_rows(q: torch.Tensor, k: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """CLS-query attention of a vision layer.

    ``q`` and ``k`` are the outputs of the layer's ``q_proj`` / ``k_proj``, ``[C, 1+P, E]`` (token 0 is CLS).
    Returns ``[C, H, 1+P]``: ``softmax(q_cls . k^T * scale)`` per head.
    """
    c, t, e = k.shape
    dt = _score_dtype(q)
    qh = q[:, :1].reshape(c, 1, num_heads, e // num_heads).transpose(1, 2).to(dt)  # [C, H, 1, Dh]
    kh = k.reshape(c, t, num_heads, e // num_heads).transpose(1, 2).to(dt)  # [C, H, T, Dh]
    logits = (qh @ kh.transpose(-1, -2)).squeeze(-2) * scale
    return logits.softmax(dim=-1)


def decoder_qk(
    attn: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    rope_fn,
    query_index: torch.Tensor | None = None,
    need_query: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Post-RoPE keys of a decoder attention layer, and the post-RoPE query of one position per row.

    ``hidden`` is the attention input ``[B, S, D]`` (already input-normed). ``query_index`` ``[B]`` picks the query
    position of each row. Returns ``(q [B, H, 1, Dh] or None, k [B, Hkv, S, Dh])`` in the model dtype.
    """
    b, s, _ = hidden.shape
    head_dim = attn.head_dim
    cos, sin = position_embeddings
    cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)

    k = attn.k_proj(hidden).view(b, s, -1, head_dim)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    k = k.transpose(1, 2)
    k = rope_fn(k, k, cos, sin)[1]

    q = None
    if need_query:
        rows = torch.arange(b, device=hidden.device)
        hq = hidden[rows, query_index].unsqueeze(1)  # [B, 1, D]
        q = attn.q_proj(hq).view(b, 1, -1, head_dim)
        if getattr(attn, "q_norm", None) is not None:
            q = attn.q_norm(q)
        q = q.transpose(1, 2)
        cq, sq = cos[rows, query_index].unsqueeze(1), sin[rows, query_index].unsqueeze(1)
        q = rope_fn(q, q, cq, sq)[0]
    return q, k


def query_attention(q: torch.Tensor, k: torch.Tensor, scaling: float, key_mask: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of one query per row over all keys: ``[B, H, S]``.

    ``q [B, H, 1, Dh]``, ``k [B, Hkv, S, Dh]`` (GQA: each kv head serves ``H / Hkv`` query heads), ``key_mask
    [B, S]`` bool (False: padding or not visible to the query).
    """
    dt = _score_dtype(q)
    h, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(h // hkv, dim=1)
    logits = (q.to(dt) @ k.to(dt).transpose(-1, -2)).squeeze(-2) * scaling  # [B, H, S]
    logits = logits.masked_fill(~key_mask[:, None, :], float("-inf"))
    return logits.softmax(dim=-1)
