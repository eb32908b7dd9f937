"""Qwen-VL's patch grid: the one module that both vtprune's Hugging Face adapter (:mod:`vtprune.adapters.qwen_vl`)
and the vLLM plugin (:mod:`vtprune.vllm`) read it from.

Qwen's processor lays an item's ``t x H x W`` patches out merge unit by merge unit: ``unit = spatial_merge_size**2``
spatially adjacent patches in a row, which the patch merger concatenates into one LLM token (``t x H/m x W/m``
tokens). Qwen2.5-VL's windowed vision blocks, and so the merger's input, hold the merge units in *window order*; the
tower puts its output back in the processor's order with the inverse permutation
(transformers ``models/qwen2_5_vl/modeling_qwen2_5_vl.py``, ``Qwen2_5_VisionTransformerPretrainedModel.forward``:
``reverse_indices = torch.argsort(window_index)``; vLLM ``model_executor/models/qwen2_5_vl.py``,
``prepare_encoder_metadata``'s ``reverse_indices``). The window order itself is read from the tower that runs
(each host's own ``window_index``), never recomputed here; this module undoes it.

Pure torch / numpy (no transformers or vLLM import): the vLLM plugin runs with the transformers release vLLM pins.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


# -- merge units ----------------------------------------------------------------------------------------------------
def pack_merge_units(rows: torch.Tensor, unit: int) -> torch.Tensor:
    """``[P, D]`` patch rows (merge unit by merge unit) -> ``[P / unit, unit * D]``: each token's patches,
    concatenated in the order the merger reads them."""
    return rows.reshape(-1, unit * rows.shape[-1])


def pool_merge_units(scores: torch.Tensor, tokens: int, unit: int, what: str = "the item") -> torch.Tensor:
    """Scores of one item -> ``[tokens]`` per-token scores: per patch (``tokens * unit`` values, merge unit by merge
    unit) a token's score is the mean of its unit's patches; per token (``tokens`` values) as they are.

    Raises ``ValueError`` when ``scores`` fit neither (``what`` names the item in the message)."""
    if scores.numel() == tokens:
        return scores.reshape(-1)
    if scores.numel() != tokens * unit:
        raise ValueError(
            f"scores of shape {tuple(scores.shape)} fit neither the {tokens * unit} patches nor the "
            f"{tokens} tokens of {what}"
        )
    return scores.reshape(-1, unit).mean(dim=1)


def token_patches(crops: int, patches: int, unit: int) -> torch.Tensor:
    """``[crops * patches / unit, unit]``: the patch indices of each token (a token is ``unit`` consecutive
    patches)."""
    return torch.arange(crops * patches).view(-1, unit)


# -- window order -------------------------------------------------------------------------------------------------
def window_order_inverse(window_index: torch.Tensor) -> torch.Tensor:
    """A tower's ``window_index`` (merge units in window order -> their processor-order index) -> the inverse
    permutation (what the tower applies to its output: ``argsort(window_index)``)."""
    return torch.argsort(window_index)


def undo_window_order(rows: torch.Tensor, inverse: torch.Tensor, unit: int = 1) -> torch.Tensor:
    """Rows held merge unit by merge unit in window order -> the processor's order. ``rows`` ``[U * unit, ...]``
    (``unit`` rows per merge unit: ``unit=1`` for one row per token, ``spatial_merge_size**2`` for one per patch),
    ``inverse`` ``[U]`` (:func:`window_order_inverse`, or the tower's own ``reverse_indices``)."""
    units = rows.reshape(rows.shape[0] // unit, unit, *rows.shape[1:])
    return units[inverse.to(rows.device)].reshape(rows.shape)


# -- M-RoPE positions -----------------------------------------------------------------------------------------------
def grid_positions(t: int, h: int, w: int, t_factor: float = 1.0) -> np.ndarray:
    """M-RoPE (t, h, w) offsets ``[3, t*h*w]`` of an item's merged tokens (``t x h x w``) from its first position,
    as transformers' ``get_rope_index`` and vLLM's ``get_mrope_input_positions`` number them (video: ``t *
    t_factor``, truncated)."""
    grid = np.indices((t, h, w))
    if t_factor != 1.0:
        grid[0] = (grid[0] * t_factor).astype(np.int64)
    return grid.reshape(3, -1)


# -- the patch merger, per token ----------------------------------------------------------------------------------
class _RMSNorm(nn.Module):
    """Plain-torch RMSNorm (a float32 copy of vLLM's, whose kernel is a custom op)."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class _LayerNorm(nn.Module):
    """Plain-torch LayerNorm over the last dimension (a float32 copy)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, eps: float):
        super().__init__()
        self.weight, self.bias, self.eps = weight, bias, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class _Linear(nn.Module):
    """Plain-torch linear layer (a float32 copy; vLLM's parallel linear layers return tuples)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


def merger_parts(merger: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module | None, nn.Module, bool]:
    """``(norm, fc1, act, fc2, postshuffle)`` of a Qwen-VL patch merger: Qwen2-VL / Qwen2.5-VL ``ln_q`` and ``mlp =
    [Linear, GELU, Linear]``; Qwen3-VL / Qwen3.5 ``norm``, ``linear_fc1``, ``act_fn``, ``linear_fc2`` and
    ``use_postshuffle_norm`` (transformers ``modeling_qwen2_5_vl.py`` ``Qwen2_5_VLPatchMerger``,
    ``modeling_qwen3_vl.py`` ``Qwen3VLVisionPatchMerger``, 5.24.0; vLLM's mergers have the same attributes).
    ``act`` may be None (vLLM: not read, the copy uses exact GELU). Raises ``RuntimeError`` for another layout."""
    norm = getattr(merger, "ln_q", None) or getattr(merger, "norm", None)
    if hasattr(merger, "mlp"):
        fc1, act, fc2 = merger.mlp[0], merger.mlp[1], merger.mlp[2]
    else:
        fc1, act, fc2 = (getattr(merger, name, None) for name in ("linear_fc1", "act_fn", "linear_fc2"))
    if norm is None or fc1 is None or fc2 is None:
        raise RuntimeError(
            f"unknown patch merger layout ({type(merger).__name__}); expected a norm and two linear layers"
        )
    return norm, fc1, act, fc2, bool(getattr(merger, "use_postshuffle_norm", False))


class PerTokenMerger(nn.Module):
    """A Qwen-VL patch merger as a per-token map ``[N, unit * D_vit]`` (each merged token's patches, concatenated in
    the order the merger reads them; :func:`pack_merge_units`) -> ``[N, D_lm]``: norm (per patch, or after the
    shuffle), Linear, GELU, Linear, in the merger's own order of operations (what the methods get as ``projector``).

    * :meth:`of`: the merger's own modules (shared parameters, the model's dtype; the Hugging Face path);
    * :meth:`float32_copy`: plain-torch float32 copies of its parameters (the vLLM plugin: vLLM's CPU linear layers
      drop their weight tensors after loading, and ``torch.func.jvp`` needs plain torch operations)."""

    def __init__(
        self, norm: nn.Module, fc1: nn.Module, act: nn.Module, fc2: nn.Module, vit_dim: int, postshuffle: bool
    ):
        super().__init__()
        self.norm, self.fc1, self.act, self.fc2 = norm, fc1, act, fc2
        self.vit_dim, self.postshuffle = vit_dim, postshuffle

    @classmethod
    def of(cls, merger: nn.Module, vit_dim: int) -> PerTokenMerger:
        """``merger`` itself, per token (its modules, not copies)."""
        norm, fc1, act, fc2, postshuffle = merger_parts(merger)
        return cls(norm, fc1, act if act is not None else nn.GELU(), fc2, vit_dim, postshuffle)

    @classmethod
    def float32_copy(cls, merger: nn.Module, vit_dim: int) -> PerTokenMerger:
        """A float32 copy of ``merger`` in plain torch operations (exact GELU; the norm a LayerNorm, or an RMSNorm
        for a norm with ``variance_epsilon``, vLLM's RMSNorm). Raises ``RuntimeError`` for another norm."""
        norm, fc1, _, fc2, postshuffle = merger_parts(merger)

        def copy(t):
            return None if t is None else nn.Parameter(t.detach().float().clone(), requires_grad=False)

        if isinstance(norm, nn.LayerNorm):
            norm32 = _LayerNorm(copy(norm.weight), copy(norm.bias), float(norm.eps))
        elif hasattr(norm, "variance_epsilon"):
            norm32 = _RMSNorm(copy(norm.weight), float(norm.variance_epsilon))
        else:
            raise RuntimeError(f"unknown patch-merger norm {type(norm).__name__}")
        fc1_32, fc2_32 = _Linear(copy(fc1.weight), copy(fc1.bias)), _Linear(copy(fc2.weight), copy(fc2.bias))
        return cls(norm32, fc1_32, nn.GELU(), fc2_32, vit_dim, postshuffle)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = self.norm(x) if self.postshuffle else self.norm(x.reshape(-1, self.vit_dim)).reshape(n, -1)
        return self.fc2(self.act(self.fc1(x)))
