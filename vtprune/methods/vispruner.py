"""``vispruner`` (Theia-4869/VisPruner, ICCV 2025): important tokens by [CLS] attention, diverse tokens by repeated
bipartite duplicate removal among the rest (``vtprune.functional.vispruner_select``).

Vision stage, on the vision layer the projector reads (``L - 2``: LLaVA's feature layer -2; the official code reads
that layer's attention and features): the head-mean [CLS] attention row (softmax over all keys, CLS column dropped)
and the layer's patch features (the projector's input). ``important_ratio`` (official default 0.5) of the budget
goes to the highest-attention patches, the rest to the diverse set. Kept tokens in original order, keeping their
position ids. The official code prunes before the projector; here the projector has already run on every patch
(the kept tokens are identical; only the projector's cost on dropped patches differs).

Rules and deviations (docs/methods.md): an odd residual count (where the official code fails) scores the unpaired
token like the others; ``important_ratio=1`` is plain top-k. AnyRes (LLaVA-NeXT): one selection over all the
image's patches (every crop's patches scored by its own crop's [CLS] row, features of the same layer), within the
image's budget; row-separator tokens carry no patch and are kept only if the budget exceeds the patches (the
official code selects T tokens in every crop and keeps every separator). ``importance``: the [CLS] row (default
where the tower has a CLS token) or the attention each patch receives (default elsewhere, e.g. Qwen-VL, whose
"patches" are then merge units: one projector row per token; docs/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import functional as F
from ..config import PruneConfig, check_int_option
from ..registry import register_method
from ..signals import check_importance
from ._packing import packed_patches
from .base import ImageInputs, Method, crop_importance, vision_layer


@dataclass
class VisPrunerConfig(PruneConfig):
    """VisPruner options. ``important_ratio``: fraction of the budget chosen by [CLS] attention (official 0.5), a
    number in [0, 1]; ``layer``: the vision layer read (None: ``L - 2``, the layer LLaVA's projector reads);
    ``importance``: ``"cls"``, ``"received"`` or None (``"cls"`` where the tower has a CLS token, else
    ``"received"``)."""

    important_ratio: float = 0.5
    layer: int | None = None
    importance: str | None = None

    def __post_init__(self):
        super().__post_init__()
        check_importance(self.importance)
        r = self.important_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) <= 1.0:
            raise ValueError(
                f"important_ratio must be a number in [0, 1] (fraction of the budget chosen by [CLS] "
                f"attention; official 0.5), got {r!r}"
            )
        self.important_ratio = float(r)
        check_int_option("layer", self.layer, 0, optional=True)


@register_method("vispruner", VisPrunerConfig)
class VisPruner(Method):
    stage = "vision"
    signals = frozenset({"features", "cls_attention", "projector_inputs"})

    def vision_layers(self, num_layers: int) -> list[int]:
        return [vision_layer("vispruner", self.config.layer, num_layers)]

    def select(self, image: ImageInputs) -> torch.Tensor:
        attn = image.pack_crop_scores(crop_importance(image))  # [n] per visual token (separators: lowest)
        feats = image.projector_inputs.reshape(-1, image.projector_inputs.shape[-1])
        ids, _, _ = packed_patches(image)
        tokens = (ids >= 0).nonzero().squeeze(1)  # the visual tokens that carry a patch, ascending
        k = min(image.k, tokens.numel())
        chosen = F.vispruner_select(attn[tokens], feats[ids[tokens]], k, self.config.important_ratio)
        kept = tokens[chosen]
        if image.k > k:  # budget beyond the patches: add row separators, first ones first
            extra = (ids < 0).nonzero().squeeze(1)[: image.k - k]
            kept = torch.cat([kept, extra]).sort().values
        return kept
