"""``todre`` — ToDRE, diversity-driven two-stage token reduction (paper; no public code: docs/methods.md).

Stage 1 (vision stage, on the projected features z, distance ``1 - cos``): greedy diversity selection whose first
pick is the patch with the highest CLS attention of the vision layer ``cls_layer`` (default ``L-2``, the layer
whose output LLaVA feeds the projector; head-mean row, CLS key dropped; AnyRes: the base image's patches only).
``diversity="kcenter"`` (paper v1, default): repeatedly add ``argmax_i min_{s in S} d(i, s)``;
``diversity="maxsum"`` (paper v2): repeatedly add ``argmin_i sum_{s in S} cos(i, s)``. Kept in original order.

Stage 2 (``late_drop=True``, default): at decoder layer ``drop_layer`` (default ``7L/8``, rounded down), if the
last prompt token puts less than ``drop_threshold`` (0.10) of its head-mean attention at layer ``drop_layer - 1``
on the sample's visual tokens, every visual token of that sample leaves the sequence for the remaining layers and
all decode steps (our reading of the paper's "task-relevance" stage: docs/methods.md). A budget that keeps every
token (``ratio=1``) prunes nothing at either stage.

The pivot reads the vision tower's CLS row (``importance="cls"``, default where the tower has a CLS token) or the
attention each patch receives (``importance="received"``, default elsewhere, e.g. Qwen-VL; docs/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import functional as F
from ..config import PruneConfig, check_int_option
from ..registry import register_method
from ..signals import check_importance
from . import surrogates as S
from .base import ImageInputs, Method, check_layer, crop_importance, vision_layer

_DIVERSITY = ("kcenter", "maxsum")


@dataclass
class ToDREConfig(PruneConfig):
    """ToDRE options (module docstring; budget: ``keep`` / ``ratio`` and the common options of
    :class:`vtprune.PruneConfig`).

    * ``diversity`` (``"kcenter"``): stage 1's greedy selection, ``"kcenter"`` (paper v1) or ``"maxsum"`` (v2).
    * ``cls_layer`` (None): the vision layer whose CLS attention picks the first token; None: ``L-2``.
    * ``late_drop`` (True): stage 2, drop every visual token of a sample at ``drop_layer`` when the last prompt
      token's attention on them is below ``drop_threshold``.
    * ``drop_layer`` (None): the decoder layer of the late drop; None: ``7L/8``, rounded down.
    * ``drop_threshold`` (0.10): the attention share below which the late drop happens.
    * ``importance``: the pivot's score, ``"cls"``, ``"received"`` or None (``"cls"`` where the vision tower has
      a CLS token, ``"received"`` elsewhere).
    """

    diversity: str = "kcenter"
    cls_layer: int | None = None
    late_drop: bool = True
    drop_layer: int | None = None
    drop_threshold: float = 0.10
    importance: str | None = None

    def __post_init__(self):
        super().__post_init__()
        check_importance(self.importance)
        if self.diversity not in _DIVERSITY:
            raise ValueError(f"diversity must be one of {_DIVERSITY}, got {self.diversity!r}")
        check_int_option("cls_layer", self.cls_layer, 0, optional=True)
        check_int_option("drop_layer", self.drop_layer, 0, optional=True)
        if not isinstance(self.late_drop, bool):
            raise TypeError(f"late_drop must be True or False, got {self.late_drop!r}")
        t = self.drop_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise ValueError(f"drop_threshold must be a number in [0, 1] (attention share), got {t!r}")
        if not self.late_drop and (self.drop_layer is not None or self.drop_threshold != 0.10):
            raise ValueError("drop_layer / drop_threshold only apply with late_drop=True")


@register_method("todre", ToDREConfig)
class ToDRE(Method):
    stage = "vision"
    signals = frozenset({"features", "cls_attention"})
    surrogate = S.Surrogate(
        "feature-isolation",
        "greedy k-center from the top-CLS pivot -> cosine distance to the "
        "nearest neighbour among the features (the pivot choice is not attacked)",
        S.feature_isolation,
    )
    vllm_options = {"late_drop": False}  # its late drop acts inside the language model

    def vision_layers(self, num_layers: int) -> list[int]:
        return [vision_layer("todre", self.config.cls_layer, num_layers, "cls_layer")]

    def drop_layer(self, num_layers: int) -> int | None:
        if not self.config.late_drop:
            return None
        layer = 7 * num_layers // 8 if self.config.drop_layer is None else self.config.drop_layer
        return check_layer("todre drop_layer", layer, num_layers)

    def drop_all(self, share: float) -> bool:
        return share < self.config.drop_threshold

    def pivot(self, image: ImageInputs) -> int:
        """Index of the visual token with the highest CLS attention (base image only for AnyRes)."""
        crop_scores = crop_importance(image)  # [C, P]
        crop_scores[1:] = float("-inf")  # AnyRes: crop 0 is the base image
        return int(F.topk_indices(image.pack_crop_scores(crop_scores), 1)[0])

    def select(self, image: ImageInputs) -> torch.Tensor:
        first = self.pivot(image)
        if self.config.diversity == "kcenter":
            order = F.kcenter_select(image.features, image.k, first=first)
        else:
            order = F.maxsum_select(image.features, image.k, first=first)
        return order.sort().values
