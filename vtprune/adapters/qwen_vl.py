"""Qwen2-VL (``qwen2_vl``) and Qwen2.5-VL (``qwen2_5_vl``): ViT without CLS token, M-RoPE positions."""

from __future__ import annotations

import torch
from torch import nn

from .base import ModelAdapter


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

    def projector_module(self):
        return self.inner.visual.merger

    def projector(self):
        return _MergerPerToken(self.inner.visual.merger, self.inner.visual.merger.ln_q.weight.shape[0])

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

    def default_position_ids(self, batch, seq, past, device):
        pos = super().default_position_ids(batch, seq, past, device)
        return pos.unsqueeze(0).expand(3, -1, -1)
