"""Qwen2-VL (``qwen2_vl``) and Qwen2.5-VL (``qwen2_5_vl``): ViT without CLS token, M-RoPE positions."""

from __future__ import annotations

from .base import ModelAdapter


class QwenVLAdapter(ModelAdapter):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    has_cls_token = False
    feature_methods = ("get_image_features", "get_video_features")
    mrope = True

    def default_position_ids(self, batch, seq, past, device):
        pos = super().default_position_ids(batch, seq, past, device)
        return pos.unsqueeze(0).expand(3, -1, -1)
