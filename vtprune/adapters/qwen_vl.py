"""Qwen-VL families: ViT without CLS token, 2x2 patch merger, M-RoPE (3-D t/h/w) positions.

* Qwen2-VL (``qwen2_vl``), Qwen2.5-VL (``qwen2_5_vl``, windowed vision attention);
* Qwen3-VL (``qwen3_vl``, ``qwen3_vl_moe``): interleaved M-RoPE (the position ids are still 3-D integers; only the
  rotary kernel interleaves frequencies) and DeepStack (extra merged features of early vision layers, added to the
  visual rows after the first decoder layers; see :mod:`vtprune.engine.deepstack`);
* Qwen3.5 (``qwen3_5``, ``qwen3_5_moe``): Qwen3-VL's vision without DeepStack, a decoder that interleaves Gated
  DeltaNet (``linear_attention``) layers with gated full-attention layers (``text_config.layer_types``).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from .. import compat, flops
from . import qwen_grid
from .base import ModelAdapter, VisionQK, bound_arguments


def downsample_grid(height: int, width: int, budget: int, least: int = 1) -> tuple[int, int]:
    """The token grid ``(rows, cols)`` the ``downsample`` row resizes an image of ``height x width`` pixels to: between
    ``least`` (the processor's floor) and ``budget`` tokens, at the image's aspect ratio to within one token per side.
    With ``s = sqrt(budget / (height * width))``, rows is ``floor`` or ``ceil`` of ``height * s`` and cols ``floor`` or
    ``ceil`` of ``width * s`` (each at least 1); of those grids within ``[least, budget]``, the one with the most tokens
    wins, then the one closest in aspect ratio (``|log(rows / cols * width / height)|``), then fewer rows. A 4:3 image
    at 64 tokens is 7 x 9 = 63 tokens (``smart_resize`` shrinking to 64 tokens' worth of pixels rounds both sides
    down: 6 x 9 = 54), 16:9 is 6 x 10 = 60, square 8 x 8. When none of them is within ``[least, budget]`` (a short
    side below one token; ``least`` close to ``budget``): the grid within it closest in aspect ratio, then the
    larger."""
    if not 1 <= least <= budget or height < 1 or width < 1:
        raise ValueError(
            f"downsample_grid needs positive sizes and 1 <= least <= budget, got {height} x {width}, "
            f"least {least}, budget {budget}"
        )
    scale = math.sqrt(budget / (height * width))

    def sides(x):
        return {min(budget, max(1, f(x * scale))) for f in (math.floor, math.ceil)}

    def distortion(grid):  # rounded: r x c and c x r of a square image tie exactly
        return round(abs(math.log(grid[0] * width / (grid[1] * height))), 12)

    grids = [(r, c) for r in sides(height) for c in sides(width) if least <= r * c <= budget]
    if grids:
        return max(grids, key=lambda g: (g[0] * g[1], -distortion(g), -g[0]))
    grids = [(r, c) for r in range(1, budget + 1) for c in range(max(1, -(-least // r)), budget // r + 1)]
    return min(grids, key=lambda g: (distortion(g), -g[0] * g[1], g[0]))


class QwenVLAdapter(ModelAdapter):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    has_cls_token = False
    frame_attention = True
    feature_methods = ("get_image_features", "get_video_features")
    mrope = True

    def vision_merge_unit(self):
        return int(self.inner.visual.spatial_merge_size) ** 2

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
        return qwen_grid.PerTokenMerger.of(self.inner.visual.merger, self.vit_dim())

    def split_projector_inputs(self, captured, call, counts):
        visual = self.inner.visual
        unit = visual.spatial_merge_size**2
        grid = torch.as_tensor(call.get("image_grid_thw", call.get("video_grid_thw")))
        tokens = qwen_grid.pack_merge_units(captured, unit)
        window = self._window_index(grid)
        if window is not None:  # Qwen2.5-VL runs the merger in window order; undo it as the model does
            tokens = qwen_grid.undo_window_order(tokens, qwen_grid.window_order_inverse(window))
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
            values = qwen_grid.undo_window_order(values, qwen_grid.window_order_inverse(window), unit)
        return [v.unsqueeze(0) for v in torch.split(values, grid.prod(-1).tolist())]

    def pack_crop_scores(self, scores, call, index):
        # the processor orders each image's patches merge unit by merge unit (2x2 spatially adjacent patches in a
        # row), and the merger concatenates each unit into one LLM token: pool a token's patches by their mean.
        # Scores per projector row (split_projector_inputs: one row per token) are already per token.
        unit = self.inner.visual.spatial_merge_size**2
        grid = torch.as_tensor(call.get("image_grid_thw", call.get("video_grid_thw"))).reshape(-1, 3)
        tokens = int(grid[index].prod()) // unit
        return qwen_grid.pool_merge_units(scores, tokens, unit, f"image {index} (grid {grid[index].tolist()})")

    def token_patches(self, call, index, crops, patches):
        return qwen_grid.token_patches(crops, patches, self.inner.visual.spatial_merge_size**2)

    def default_position_ids(self, batch, seq, past, device):
        pos = super().default_position_ids(batch, seq, past, device)
        return pos.unsqueeze(0).expand(3, -1, -1)

    # -- the downsampling baseline: images resized before the processor -----------------------------------------
    @staticmethod
    def _resize_facts(processor) -> tuple[int, int, int]:
        """``(factor, min_pixels, max_pixels)`` of the processor's image processor: one visual token is a
        ``factor x factor`` pixel square (patch size x merge size)."""
        ip = getattr(processor, "image_processor", processor)
        factor = int(ip.patch_size) * int(ip.merge_size)
        return (factor, *compat.qwen_pixel_bounds(ip))

    def check_downsample(self, budget: int, processor: Any = None) -> None:
        if processor is None:
            return
        factor, low, high = self._resize_facts(processor)
        floor = math.ceil(low / factor**2)
        if budget < floor:
            raise ValueError(
                f"downsample: budget {budget} is below what {self.config.model_type!r}'s processor can give: it "
                f"enlarges every image to at least min_pixels={low} pixels, i.e. {floor} visual tokens of "
                f"{factor} x {factor} pixels; give a budget >= {floor}"
            )

    def downsample_inputs(self, processor: Any, images: list, budget: int) -> tuple[list, Any]:
        """Each image whose processor grid gives more than ``budget`` merged tokens is resized (PIL bicubic, as
        VTC-Bench resizes before the processor: Chenfei-Liao/VTC-Bench@983e443,
        ``external/DART/lmms-eval/lmms_eval/models/qwen2_vl.py`` l. 259-264) to ``gw x gh`` tokens' worth of pixels,
        ``(gh, gw) = downsample_grid(height, width, budget)``: multiples of the token size within the processor's
        pixel bounds, which the processor then keeps as they are. The processor is returned unchanged."""
        from PIL import Image

        self.check_downsample(budget, processor)
        factor, low, high = self._resize_facts(processor)
        out = []
        for image in images:
            if not isinstance(image, Image.Image):
                raise TypeError(f"downsample resizes PIL images; got {type(image).__name__}")
            w, h = image.size
            nh, nw = compat.qwen_smart_resize(h, w, factor, low, high)
            if (nh // factor) * (nw // factor) <= budget:
                out.append(image)  # the processor already gives no more than the budget: never upsample
                continue
            gh, gw = downsample_grid(h, w, budget, least=math.ceil(low / factor**2))
            size = (gh * factor, gw * factor)
            if compat.qwen_smart_resize(*size, factor, low, high) != size:
                raise ValueError(
                    f"downsample: a {w} x {h} image at budget {budget} would be {gw} x {gh} tokens ({size[1]} x "
                    f"{size[0]} px), outside the processor's pixel bounds [{low}, {high}]"
                )
            out.append(image.convert("RGB").resize((size[1], size[0]), resample=Image.BICUBIC))
        return out, processor


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL and its MoE variant. DeepStack: ``get_image_features`` also returns ``deepstack_features`` (one
    merged feature map per tapped vision layer); the text model adds level ``i`` to the visual rows after decoder
    layer ``i`` through ``deepstack_method``, which the engine wraps so every level follows the kept tokens."""

    model_types = ("qwen3_vl", "qwen3_vl_moe")
    frame_attention = False  # not yet checked against a video's timestamped frame blocks
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
