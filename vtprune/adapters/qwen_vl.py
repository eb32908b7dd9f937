"""Qwen-VL families: ViT without CLS token, 2x2 patch merger, M-RoPE (3-D t/h/w) positions.

* Qwen2-VL (``qwen2_vl``), Qwen2.5-VL (``qwen2_5_vl``, windowed vision attention);
* Qwen3-VL (``qwen3_vl``, ``qwen3_vl_moe``): interleaved M-RoPE (the position ids are still 3-D integers; only the
  rotary kernel interleaves frequencies) and DeepStack (extra merged features of early vision layers, added to the
  visual rows after the first decoder layers; see :mod:`vtprune.engine.deepstack`);
* Qwen3.5 (``qwen3_5``, ``qwen3_5_moe``): Qwen3-VL's vision without DeepStack, a decoder that interleaves Gated
  DeltaNet (``linear_attention``) layers with gated full-attention layers (``text_config.layer_types``).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .. import flops
from .base import ModelAdapter, VisionQK, bound_arguments


class _MergerPerToken(nn.Module):
    """Qwen's patch merger as a per-token map: ``[N, merge_unit * D_vit]`` (a token's patches, concatenated)
    -> ``[N, D_lm]``."""

    def __init__(self, merger: nn.Module, vit_dim: int):
        super().__init__()
        self.merger, self.vit_dim = merger, vit_dim

    def forward(self, x):
        return self.merger(x.reshape(-1, self.vit_dim))


class QwenVLAdapter(ModelAdapter):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    has_cls_token = False
    feature_methods = ("get_image_features", "get_video_features")
    mrope = True

    def check_model_inputs(self, kwargs):
        visual_keys = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw")
        has_visual = any(kwargs.get(k) is not None for k in visual_keys) or bool(kwargs.get("mm_encoder_outputs"))
        if has_visual and kwargs.get("mm_token_type_ids") is None:
            raise ValueError(
                f"{self.config.model_type!r} needs mm_token_type_ids with pixel_values / pixel_values_videos "
                "to number the visual tokens' 3-D M-RoPE positions (without it the model falls back to 1-D positions "
                "and the kept tokens would lose theirs): pass the processor's mm_token_type_ids (1 for image "
                "tokens, 2 for video tokens, 0 elsewhere)"
            )

    def patch_grids(self, call):
        grid = call.get("image_grid_thw", call.get("video_grid_thw"))
        return torch.as_tensor(grid).reshape(-1, 3) if grid is not None else None

    def vision_flops(self, crops, frames, grids):
        return flops.vision_flops(self.config, image_grid_thw=torch.cat(grids))

    def projector_module(self):
        return self.inner.visual.merger

    def projector(self):
        return _MergerPerToken(self.inner.visual.merger, self.vit_dim())

    def split_projector_inputs(self, captured, call, counts):
        visual = self.inner.visual
        unit = visual.spatial_merge_size**2
        grid = torch.as_tensor(call.get("image_grid_thw", call.get("video_grid_thw")))
        tokens = captured.reshape(-1, unit * captured.shape[-1])
        window = self._window_index(grid)
        if window is not None:  # Qwen2.5-VL runs the merger in window order; undo it as the model does
            tokens = tokens[torch.argsort(window.to(tokens.device))]
        sizes = (grid.prod(-1) // unit).tolist()
        return [t.unsqueeze(0) for t in torch.split(tokens, sizes)]

    def _window_index(self, grid):
        visual = self.inner.visual
        if not hasattr(visual, "fullatt_block_indexes"):
            return None  # Qwen2-VL: no windowed attention, the merger sees tokens in order
        try:
            from transformers.vision_utils import get_vision_window_index
        except ImportError:  # older transformers 5.x keep it on the vision model
            return visual.get_window_index(grid)[0]
        return get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)[0]

    def vit_dim(self) -> int:
        return self.inner.visual.merger.ln_q.weight.shape[0]

    # -- received attention: fused qkv, 2-D vision RoPE, blocks from cu_seqlens (frames; Qwen2.5-VL: windows) ----
    def vision_attention_modules(self):
        return [block.attn for block in self.inner.visual.blocks]

    def vision_qk(self, module, args, kwargs):
        bound = bound_arguments(module, args, kwargs)
        hidden, cu = bound["hidden_states"], bound["cu_seqlens"]
        cos, sin = bound["position_embeddings"]
        n = hidden.shape[0]
        q, k, _ = module.qkv(hidden).reshape(n, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        rope = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision
        q, k = rope(q, k, cos, sin)
        return VisionQK(q, k, torch.as_tensor(cu, device=hidden.device).long(), float(module.scaling))

    def split_vision_tokens(self, values, call, counts):
        grid = torch.as_tensor(call.get("image_grid_thw", call.get("video_grid_thw"))).reshape(-1, 3)
        unit = self.inner.visual.spatial_merge_size**2
        window = self._window_index(grid)
        if window is not None:  # Qwen2.5-VL's blocks hold the merge units in window order: undo it
            units = values.reshape(values.shape[0] // unit, unit, *values.shape[1:])
            values = units[torch.argsort(window.to(values.device))].reshape(values.shape)
        return [v.unsqueeze(0) for v in torch.split(values, grid.prod(-1).tolist())]

    def pack_crop_scores(self, scores, call, index):
        # the processor orders each image's patches merge unit by merge unit (2x2 spatially adjacent patches in a
        # row), and the merger concatenates each unit into one LLM token: pool a token's patches by their mean.
        # Scores per projector row (split_projector_inputs: one row per token) are already per token.
        unit = self.inner.visual.spatial_merge_size**2
        grid = torch.as_tensor(call.get("image_grid_thw", call.get("video_grid_thw"))).reshape(-1, 3)
        patches = int(grid[index].prod())
        if scores.numel() == patches // unit:
            return scores.reshape(-1)
        if scores.numel() != patches:
            raise ValueError(
                f"scores of shape {tuple(scores.shape)} fit neither the {patches} patches nor the "
                f"{patches // unit} tokens of image {index} (grid {grid[index].tolist()})"
            )
        return scores.reshape(-1, unit).mean(dim=1)

    def token_patches(self, call, index, crops, patches):
        unit = self.inner.visual.spatial_merge_size**2
        return torch.arange(crops * patches).view(-1, unit)

    def default_position_ids(self, batch, seq, past, device):
        pos = super().default_position_ids(batch, seq, past, device)
        return pos.unsqueeze(0).expand(3, -1, -1)


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL and its MoE variant. DeepStack: ``get_image_features`` also returns ``deepstack_features`` (one
    merged feature map per tapped vision layer); the text model adds level ``i`` to the visual rows after decoder
    layer ``i`` through ``deepstack_method``, which the engine wraps so every level follows the kept tokens."""

    model_types = ("qwen3_vl", "qwen3_vl_moe")
    #: the text model's method that adds one DeepStack level to the visual rows: ``fn(hidden, visual_pos_masks,
    #: level_rows)`` (transformers' Qwen3VLTextModel)
    deepstack_method = "_deepstack_process"

    def vit_dim(self) -> int:
        return int(self.config.vision_config.hidden_size)

    def _window_index(self, grid):
        return None  # no windowed vision attention: the merger sees patches in order


class Qwen35Adapter(Qwen3VLAdapter):
    """Qwen3.5 and its MoE variant: Qwen3-VL's vision (no DeepStack) and a hybrid decoder. Only full-attention
    layers have ``self_attn`` (q_proj gives query and output gate per head); Gated DeltaNet layers keep a fixed-size
    recurrent state, so a decoder point at K shortens their sequence like any layer's."""

    model_types = ("qwen3_5", "qwen3_5_moe")
    deepstack_method = None
    gated_query = True


# -- analytic FLOPs of the vision tower and projector (vtprune.flops) ----------------------------------------
def qwen3_vision_flops(config, num_images, image_grid_thw, num_frames) -> int:
    """Vision FLOPs of Qwen3-VL / Qwen3.5 (per-frame attention, DeepStack mergers), see :mod:`vtprune.flops`."""
    flops.no_frames(config, num_frames)
    vcfg = flops.require(config, "vision_config", f"{config.model_type} config")
    what = f"{config.model_type} vision config"
    p, tp = int(flops.require(vcfg, "patch_size", what)), int(flops.require(vcfg, "temporal_patch_size", what))
    c = int(getattr(vcfg, "in_channels", 3) or 3)
    m, depth = int(flops.require(vcfg, "spatial_merge_size", what)), int(flops.require(vcfg, "depth", what))
    de, iv = int(flops.require(vcfg, "hidden_size", what)), int(flops.require(vcfg, "intermediate_size", what))
    dout = int(flops.require(vcfg, "out_hidden_size", what))
    mergers = 1 + len(getattr(vcfg, "deepstack_visual_indexes", None) or ())
    dm = de * m * m
    total = 0
    for i, grid in enumerate(flops.grid_rows(image_grid_thw)):
        flops.check_merge(grid, m, i)
        t, h, w = grid
        n = t * h * w
        total += 2 * n * c * tp * p * p * de  # patch embedding conv3d
        total += depth * flops.vit_layer_flops(n, de, iv, 2, t * (h * w) ** 2)
        nm = n // (m * m)
        total += mergers * (2 * nm * dm * dm + 2 * nm * dm * dout)  # main + DeepStack mergers
    return total


def qwen2_vision_flops(config, num_images, image_grid_thw, num_frames) -> int:
    """Vision FLOPs of Qwen2-VL / Qwen2.5-VL (Qwen2.5-VL: window attention, gated MLP), see :mod:`vtprune.flops`."""
    flops.no_frames(config, num_frames)
    qwen25 = config.model_type == "qwen2_5_vl"
    vcfg = flops.require(config, "vision_config", f"{config.model_type} config")
    what = f"{config.model_type} vision config"
    p = int(flops.require(vcfg, "patch_size", what))
    tp = int(flops.require(vcfg, "temporal_patch_size", what))
    c = int(getattr(vcfg, "in_channels", 3) or 3)
    m = int(flops.require(vcfg, "spatial_merge_size", what))
    depth = int(flops.require(vcfg, "depth", what))
    if qwen25:
        de = int(flops.require(vcfg, "hidden_size", what))
        iv = int(flops.require(vcfg, "intermediate_size", what))
        dout = int(flops.require(vcfg, "out_hidden_size", what))
        mlp_matmuls = 3  # gated MLP
        # HF tests `layer_num in fullatt_block_indexes`: plain membership, no negative indexing
        full_blocks = {int(i) for i in (getattr(vcfg, "fullatt_block_indexes", None) or ())}
        ws = int(flops.require(vcfg, "window_size", what)) // m // p
        if ws <= 0:
            raise ValueError(
                f"window_size={vcfg.window_size} is smaller than spatial_merge_size*patch_size="
                f"{m * p}: no window can be formed"
            )
    else:
        de = int(flops.require(vcfg, "embed_dim", what))
        iv = int(de * flops.require(vcfg, "mlp_ratio", what))
        dout = int(flops.require(vcfg, "hidden_size", what))
        mlp_matmuls = 2
        full_blocks = set(range(depth))
        ws = 0

    dm = de * m * m  # merger hidden size
    total = 0
    for i, grid in enumerate(flops.grid_rows(image_grid_thw)):
        flops.check_merge(grid, m, i)
        t, h, w = grid
        n = t * h * w
        full_sq = t * (h * w) ** 2  # attention within each frame
        if ws:
            rows = flops.window_sizes(h // m, ws)
            cols = flops.window_sizes(w // m, ws)
            win_sq = t * m**4 * sum(r * r for r in rows) * sum(cc * cc for cc in cols)
        else:
            win_sq = full_sq
        total += 2 * n * c * tp * p * p * de  # patch embedding conv3d
        for blk in range(depth):
            total += flops.vit_layer_flops(n, de, iv, mlp_matmuls, full_sq if blk in full_blocks else win_sq)
        nm = n // (m * m)
        total += 2 * nm * dm * dm + 2 * nm * dm * dout  # patch merger MLP
    return total


flops.register_vision_flops(("qwen2_vl", "qwen2_5_vl"), qwen2_vision_flops)
flops.register_vision_flops(("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"), qwen3_vision_flops)
flops.register_gated_query(("qwen3_5_text", "qwen3_5_moe_text"))  # Qwen3.5's full attention gates its output
