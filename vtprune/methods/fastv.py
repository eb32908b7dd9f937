"""``fastv`` (pkunlp-icler/FastV): at decoder layer K (default 2), keep the visual tokens that the last prompt
token attends to most at layer K-1 (attention averaged over heads).

The official code switches the model to eager attention to read the weights; here the one row needed is
recomputed from layer K-1's post-RoPE q/k (``vtprune.signals``), so SDPA / FlashAttention stay on.
The budget is per image (official FastV: one image, keep R tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import functional as F
from ..config import PruneConfig
from ..registry import register_method
from .base import ImageInputs, Method, check_layer


@dataclass
class FastVConfig(PruneConfig):
    layer: int = 2

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer must be an int >= 1 (prune before decoder layer K), got {self.layer!r}")


@register_method("fastv", FastVConfig)
class FastV(Method):
    stage = "llm"
    signals = frozenset({"text_attention"})

    def layer(self, num_layers: int) -> int:
        return check_layer("fastv", self.config.layer, num_layers)

    def select(self, image: ImageInputs) -> torch.Tensor:
        row = image.text_attention.mean(dim=0)
        scores = row[image.image_start : image.image_start + image.n]
        return F.topk_indices(scores, image.k)
