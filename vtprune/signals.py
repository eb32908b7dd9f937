"""Cheap attention signals, recomputed from one layer's q/k so the model keeps its fast attention kernel.

* ``cls_attention_rows``: the CLS query's attention row of a CLIP vision layer (one query, all keys).
* ``rope_keys`` / ``rope_query`` + ``query_attention``: the attention of one query position (the last prompt
  token) over all keys of a decoder layer, post-RoPE, GQA-aware, padding masked, from the layer's own
  ``q_proj`` / ``k_proj`` outputs.

* ``IMPORTANCE`` / ``check_importance`` / ``resolve_importance``: the ``importance`` option of CLS-scored methods
  (``"cls"``: the CLS query's row; ``"received"``: the attention each patch receives, see
  ``vtprune.functional.received_attention``).

All returned probabilities are float32 (float64 if the inputs are float64).
"""

from __future__ import annotations

import torch
from torch import nn

#: values of the ``importance`` option of CLS-scored methods (None: resolved per model by :func:`resolve_importance`)
IMPORTANCE = ("cls", "received")


def check_importance(value) -> None:
    """Raise ``ValueError`` unless ``value`` is None or one of :data:`IMPORTANCE`."""
    if value is not None and (not isinstance(value, str) or value not in IMPORTANCE):
        raise ValueError(
            f"importance must be one of {IMPORTANCE} or None (cls where the vision tower has a CLS "
            f"token, received elsewhere), got {value!r}"
        )


def resolve_importance(method_name: str, value, model_type: str, has_cls_token: bool) -> str:
    """The importance signal a method reads on a model: ``value``, or (None) ``"cls"`` where the vision tower has a
    CLS token and ``"received"`` elsewhere. Raises ``ValueError`` for ``"cls"`` on a tower without a CLS token."""
    check_importance(value)
    if value is None:
        return "cls" if has_cls_token else "received"
    if value == "cls" and not has_cls_token:
        raise ValueError(
            f"method {method_name!r} with importance='cls' needs the vision tower's CLS attention, but "
            f"{model_type!r} models have no CLS token; use importance='received' (the attention each patch "
            "receives, the default on this model) or a method that does not need it (e.g. 'fastv', 'random')"
        )
    return value


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


def rope_keys(attn: nn.Module, k_out: torch.Tensor, position_embeddings, rope_fn) -> torch.Tensor:
    """Post-RoPE keys ``[B, Hkv, S, Dh]`` from a decoder attention's ``k_proj`` output ``[B, S, Hkv*Dh]`` (the
    layer's own output, captured by a hook: nothing is recomputed)."""
    b, s, _ = k_out.shape
    cos, sin = (t.expand(b, -1, -1) for t in position_embeddings)
    k = k_out.view(b, s, -1, attn.head_dim)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    k = k.transpose(1, 2)
    return rope_fn(k, k, cos, sin)[1]


def rope_query(
    attn: nn.Module, q_rows: torch.Tensor, position_embeddings, index: torch.Tensor, rope_fn, gated: bool = False
):
    """Post-RoPE query ``[B, H, 1, Dh]`` of one position per row from ``q_proj`` output rows ``[B, H*Dh]`` taken
    at positions ``index [B]`` (``gated``: as in :func:`rope_queries`)."""
    b = q_rows.shape[0]
    rows = torch.arange(b, device=q_rows.device)
    at = tuple(t.expand(b, -1, -1)[rows, index].unsqueeze(1) for t in position_embeddings)
    return rope_queries(attn, q_rows.unsqueeze(1), at, rope_fn, gated=gated)


def rope_queries(attn: nn.Module, q_out: torch.Tensor, position_embeddings, rope_fn, gated: bool = False):
    """Post-RoPE queries ``[B, H, S, Dh]`` of every position from a decoder attention's ``q_proj`` output
    ``[B, S, H*Dh]`` (``gated``: ``[B, S, H*2*Dh]``, each head's query then its output gate, as in Qwen3.5's gated
    attention; the gate is dropped)."""
    b, s, _ = q_out.shape
    cos, sin = (t.expand(b, -1, -1) for t in position_embeddings)
    q = q_out.view(b, s, -1, 2 * attn.head_dim)[..., : attn.head_dim] if gated else q_out.view(b, s, -1, attn.head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    q = q.transpose(1, 2)
    return rope_fn(q, q, cos, sin)[0]


def rope_ones(k: torch.Tensor, position_embeddings, rope_fn) -> torch.Tensor:
    """``[B, S, Dh]``: an all-ones vector rotated to each position by the layer's rotary embedding (``rope_fn`` on
    ``position_embeddings``, the tables the layer's q/k used; ``k`` ``[B, Hkv, S, Dh]`` gives the shape and dtype).
    The rotation is the same for every head. SparseVLM+'s gravity term (:func:`vtprune.functional.rope_gravity`)."""
    b, _, s, dh = k.shape
    cos, sin = (t.expand(b, -1, -1) for t in position_embeddings)
    ones = torch.ones(b, 1, s, dh, dtype=_score_dtype(k), device=k.device)
    return rope_fn(ones, ones, cos.to(ones.dtype), sin.to(ones.dtype))[0][:, 0]


def rows_attention(q: torch.Tensor, k: torch.Tensor, scaling: float, key_mask: torch.Tensor) -> torch.Tensor:
    """Attention probabilities ``[H, R, S]`` of ``R`` query rows of one sequence: ``q [H, R, Dh]``, ``k [Hkv, S, Dh]``
    (GQA: each kv head serves ``H / Hkv`` query heads), ``key_mask [R, S]`` bool (False: not visible)."""
    dt = _score_dtype(q)
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    logits = (q.to(dt) @ k.to(dt).transpose(-1, -2)) * scaling
    return logits.masked_fill(~key_mask[None], float("-inf")).softmax(dim=-1)


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
