"""``cls`` — VTC-CLS (THU-MIG/VTC-CLS): score each patch by the CLS token's attention to it, summed over the
vision layers ``start_layer .. L-2`` (official slice ``attentions[start_layer:-1]``: the last layer excluded)
of the head-mean CLS row; keep the top-k, in original order.

Acts at the vision stage. The official code prunes before the projector; here the projector has already run
(the kept tokens are identical; only the projector's cost on dropped tokens differs). The CLS rows are
recomputed from each layer's q/k outputs, so the tower keeps its fast attention.
Default ``start_layer``: ``2 * L // 3`` of an L-layer tower (16 of 24 for CLIP ViT-L, the official default),
clamped to ``L - 2`` so that shallow towers keep one layer to score with (3 layers: ``[1]``, 2 layers: ``[0]``);
an explicit ``start_layer`` is never clamped and raises ``ValueError`` if it leaves no layer. A 1-layer tower has
no layer before its last one, so ``cls`` cannot run on it.
LLaVA-NeXT: every crop's patches are scored by that crop's CLS token and mapped through the model's own AnyRes
packing; the row-separator (newline) tokens get their image's lowest score.
``importance="received"`` (the default on towers without a CLS token, e.g. Qwen-VL) scores each patch by the
attention it receives at the same layers instead (mean over heads and queries; a port, not the paper's method:
docs/methods.md); ``importance="cls"`` on such a tower raises ``ValueError``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import PruneConfig, check_int_option
from ..registry import register_method
from ..signals import check_importance
from . import surrogates as S
from .base import ImageInputs, Method, crop_importance


@dataclass
class CLSConfig(PruneConfig):
    """VTC-CLS options. ``start_layer``: first vision layer whose CLS row is summed (0-based; the layers used are
    ``start_layer .. L-2``); None: ``min(2 * L // 3, L - 2)``. Raises ``ValueError`` if it is neither None nor an int
    >= 0; a start that leaves no layer in the model's tower raises at ``patch`` time. ``importance``: ``"cls"``,
    ``"received"`` or None (``"cls"`` where the vision tower has a CLS token, ``"received"`` elsewhere; resolved at
    ``patch`` time); another value raises ``ValueError``."""

    start_layer: int | None = None
    importance: str | None = None

    def __post_init__(self):
        super().__post_init__()
        check_int_option("start_layer", self.start_layer, 0, optional=True)
        check_importance(self.importance)


@register_method("cls", CLSConfig)
class VTCCLS(Method):
    stage = "vision"
    signals = frozenset({"cls_attention"})
    surrogate = S.Surrogate(
        "cls-attention", "the method's own score: CLS attention summed over its vision layers", S.cls_scores, exact=True
    )

    def vision_layers(self, num_layers: int) -> list[int]:
        """Vision layers ``start_layer .. L-2`` of an ``L``-layer tower (official ``attentions[start_layer:-1]``).
        The default start ``2L // 3`` is clamped to ``L - 2``; an explicit one that leaves no layer raises."""
        if num_layers < 2:
            raise ValueError(
                f"cls: a {num_layers}-layer vision tower has no layer before its last one to score with "
                "(VTC-CLS sums layers start_layer .. L-2); it needs a tower of at least 2 layers"
            )
        start = self.config.start_layer
        if start is None:
            start = min(2 * num_layers // 3, num_layers - 2)
        layers = list(range(start, num_layers - 1))
        if not layers:
            raise ValueError(
                f"cls: start_layer={start} leaves no vision layer to score with in a {num_layers}-layer tower "
                f"(layers start_layer .. {num_layers - 2} are used); allowed: 0 <= start_layer <= {num_layers - 2}"
            )
        return layers

    def score(self, image: ImageInputs) -> torch.Tensor:
        """CLS attention (or received attention, ``importance="received"``) summed over the vision layers, per visual
        token; the base class keeps the top ``image.k`` (official ``topk`` then sorted indices)."""
        return image.pack_crop_scores(crop_importance(image))  # [C, P] -> [n]
