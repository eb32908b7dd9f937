"""LLaVA-1.5 (``llava``) and LLaVA-NeXT (``llava_next``): CLIP tower with CLS token, Llama-style LM."""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from .base import ModelAdapter, qk_from_projections


class LlavaAdapter(ModelAdapter):
    model_types = ("llava",)
    has_cls_token = True

    def vision_attention_modules(self):
        tower = self.inner.vision_tower
        encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
        if encoder is None or not hasattr(encoder, "layers"):
            raise ValueError(
                f"vision tower {type(tower).__name__} has no CLIP-style encoder.layers; the CLS signal needs a "
                "CLIP vision tower"
            )
        return [layer.self_attn for layer in encoder.layers]

    def vision_qk(self, module, args, kwargs):
        return qk_from_projections(module, args, kwargs)  # CLIP: q_proj / k_proj on [crops, 1 + P, D]

    def projector_module(self):
        return self.inner.multi_modal_projector

    def projector(self):
        proj = self.inner.multi_modal_projector
        if all(hasattr(proj, n) for n in ("linear_1", "act", "linear_2")):  # Linear -> act -> Linear
            return nn.Sequential(proj.linear_1, proj.act, proj.linear_2)
        return proj

    def split_projector_inputs(self, captured, call, counts):
        if call.get("image_sizes") is not None and self.config.model_type == "llava":
            raise ValueError("projector inputs of LLaVA models called with image_sizes (Pixtral-style) are not mapped")
        return list(torch.split(captured, counts))

    def real_patch_mask(self, image_size, n, threshold):
        from .. import functional as F

        vcfg = self.config.vision_config
        grid = vcfg.image_size // vcfg.patch_size
        if self.config.model_type != "llava" or n != grid * grid:
            return super().real_patch_mask(image_size, n, threshold)
        return F.pad_mask(image_size, grid=grid, resolution=vcfg.image_size, threshold=threshold)

    def check_cls_strategy(self, importance: str = "cls") -> None:
        strategy = getattr(self.config, "vision_feature_select_strategy", "default")
        if self.has_cls_token and strategy != "default":  # CLS would be a visual token: scores cannot map
            raise ValueError(
                f"importance={importance!r} scoring needs vision_feature_select_strategy='default' (CLS dropped "
                f"from the visual tokens), got {strategy!r}"
            )
        if importance != "cls":
            return
        if getattr(self.config.vision_config, "model_type", "clip_vision_model") not in (
            "clip_vision_model", "clip"
        ):
            raise ValueError(
                f"the 'cls' signal needs a CLIP vision tower with a CLS token; this model's vision tower is "
                f"{self.config.vision_config.model_type!r}"
            )


class LlavaNextAdapter(LlavaAdapter):
    model_types = ("llava_next",)
    multi_crop = True

    def crop_counts(self, call: dict[str, Any], num_images: int) -> list[int]:
        module = sys.modules[type(self.inner).__module__]
        vcfg = self.config.vision_config
        return [
            module.image_size_to_num_patches(
                image_size=size, grid_pinpoints=self.config.image_grid_pinpoints, patch_size=vcfg.image_size
            )
            for size in call["image_sizes"]
        ]

    def pack_crop_scores(self, scores, call, index):
        # Reuse the model's own packing (AnyRes reshape + unpad + newline column) on a 1-channel "feature";
        # newline tokens carry no patch of their own: they get the image's lowest score.
        strategy = call.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy
        size = torch.as_tensor(call["image_sizes"])[index : index + 1]
        newline = torch.full((1,), float("-inf"), dtype=scores.dtype, device=scores.device)
        packed, _ = self.inner.pack_image_features([scores.unsqueeze(-1)], size, strategy, newline)
        packed = (packed[0] if isinstance(packed, (list, tuple)) else packed).reshape(-1)
        finite = torch.isfinite(packed)
        floor = packed[finite].min() if bool(finite.any()) else packed.new_zeros(())
        return torch.where(finite, packed, floor)
