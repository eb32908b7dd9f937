"""The RoPE-only attention logit ("gravity") of two positions: what rotary position embedding alone contributes to
attention. A signal the engine offers any method (``rope_gravity``); SparseVLM+ divides its attention by it.
"""

from __future__ import annotations

import math

import torch

from ._common import check_tensor, compute_dtype

__all__ = ["rope_gravity"]


def rope_gravity(rope_rows: torch.Tensor, rope_cols: torch.Tensor) -> torch.Tensor:
    """SparseVLM+'s RoPE-only "gravity" term: the attention logit two tokens would have if their query and key were
    all ones, i.e. only the rotary embedding of their positions speaks. Official (v2.0 9e1f649e,
    ``modelling_sparse_llama.py``, "Text-Visual Attention Gravity Correction"): ``apply_rotary_pos_emb`` on all-ones
    q and k at the current position ids, then ``q k^T / sqrt(Dh)``. For 1-D RoPE this is
    ``(2 / sqrt(Dh)) * sum_f cos(theta_f (p_i - p_j))``: it depends on the distance only, and decays (with
    oscillations) as tokens move apart.

    Args:
        rope_rows: ``[R, Dh]`` the rotary embedding of an all-ones vector at each query row's position (the model's
            own ``apply_rotary_pos_emb`` on ones: the same for every head).
        rope_cols: ``[S, Dh]`` the same at each key's position.

    Returns:
        ``[R, S]`` float32 (float64 for float64 input).
    """
    check_tensor("rope_rows", rope_rows, ndim=2, shape_hint="[R, Dh]", finite=True)
    check_tensor("rope_cols", rope_cols, ndim=2, shape_hint="[S, Dh]", finite=True)
    if rope_rows.shape[1] != rope_cols.shape[1]:
        raise ValueError(
            f"rope_rows [R, Dh] and rope_cols [S, Dh] must agree on Dh, got {list(rope_rows.shape)} and "
            f"{list(rope_cols.shape)}"
        )
    dt = compute_dtype(rope_rows, rope_cols)
    return (rope_rows.to(dt) @ rope_cols.to(dt).T) / math.sqrt(rope_rows.shape[1])
