"""``divprune`` (vbdi/divprune): keep a maximally diverse subset of the projected visual tokens.

Vision stage, on the projected features z of one image, distance ``d = 1 - cos``. First pick: the token whose
nearest neighbour is farthest (``argmax_i min_{j != i} d(i, j)``); then greedy max-min (k-center): repeatedly
add ``argmax_i min_{s in S} d(i, s)``. Kept tokens are returned in original order. The paper's default budget is
``ratio=0.098`` (56 of 576). Math: ``vtprune.functional.kcenter_select``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import functional as F
from ..config import PruneConfig
from ..registry import register_method
from . import surrogates as S
from .base import ImageInputs, Method

_METRICS = ("cosine", "l2")


@dataclass
class DivPruneConfig(PruneConfig):
    """DivPrune options (budget: ``keep`` / ``ratio`` and the common options of :class:`vtprune.PruneConfig`).

    * ``metric`` (``"cosine"``): the distance of the max-min diversity selection on the projected features.
    """

    metric: str = "cosine"

    def __post_init__(self):
        super().__post_init__()
        if self.metric not in _METRICS:
            raise ValueError(f"metric must be one of {_METRICS}, got {self.metric!r}")


@register_method("divprune", DivPruneConfig)
class DivPrune(Method):
    stage = "vision"
    signals = frozenset({"features"})
    surrogate = S.Surrogate(
        "feature-isolation",
        "greedy k-center on the projected features -> each token's cosine "
        "distance to its nearest neighbour (the quantity k-center maximises)",
        S.feature_isolation,
    )

    def select(self, image: ImageInputs) -> torch.Tensor:
        order = F.kcenter_select(image.features, image.k, metric=self.config.metric)
        return order.sort().values
