"""``scope`` (kinredon/SCOPE, NeurIPS 2025): greedy saliency x coverage-gain selection
(``vtprune.functional.scope_select``; official ``scope/clip_encoder.py`` lines 101-199, commit 6bf73069).

Vision stage, on the vision layer the projector reads (``L - 2``: LLaVA's feature layer -2; the official code reads
``attentions[-2]`` and ``hidden_states[-2]``): saliency = the head-mean [CLS] attention row of that layer (softmax
over all keys, CLS column dropped; the official sum over heads selects the same tokens), coverage = cosine similarity
of that layer's patch features, the projector's input (AngelSlim's port uses the projector's outputs: not the
paper's). Kept tokens in original order, keeping their position ids. The official code prunes before the projector;
here the projector has already run on every patch (the kept tokens are identical; only the projector's cost on
dropped patches differs).

AnyRes (LLaVA-NeXT): per crop, as the official LLaVA-NeXT path does (``int(T / crops)`` tokens from each crop, each
crop's own selection): the image's budget split evenly over its crops (``visionzip``'s ``even_shares``: exact
total), each crop's selection over its visual tokens; row separators are kept only when the budget exceeds the
patches (the official code keeps none). ``importance``: ``"cls"`` (default where the tower has a CLS token) or
``"received"`` (the attention each patch receives; default elsewhere, e.g. Qwen-VL, whose tokens are merge units:
a unit's saliency is the mean of its patches', its feature the concatenated patch states the merger reads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import functional as F
from ..config import PruneConfig, check_int_option
from ..registry import register_method
from ..signals import check_importance
from ._packing import crop_tokens
from .base import ImageInputs, Method, crop_importance, vision_layer
from .visionzip import even_shares


@dataclass
class ScopeConfig(PruneConfig):
    """SCOPE options. ``alpha``: the saliency exponent, a finite number >= 0 (score = coverage gain x saliency **
    alpha; official default 1.0, the ``ALPHA`` environment variable; 0: coverage alone); ``layer``: the vision layer
    read (None: ``L - 2``, the layer LLaVA's projector reads); ``importance``: ``"cls"``, ``"received"`` or None
    (``"cls"`` where the tower has a CLS token, else ``"received"``)."""

    alpha: float = 1.0
    layer: int | None = None
    importance: str | None = None

    def __post_init__(self):
        super().__post_init__()
        check_importance(self.importance)
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= float(a) < float("inf"):
            raise ValueError(f"alpha must be a finite number >= 0 (the saliency exponent; official 1.0), got {a!r}")
        self.alpha = float(a)
        check_int_option("layer", self.layer, 0, optional=True)


@register_method("scope", ScopeConfig)
class Scope(Method):
    stage = "vision"
    signals = frozenset({"features", "cls_attention", "projector_inputs"})

    def vision_layers(self, num_layers: int) -> list[int]:
        return [vision_layer("scope", self.config.layer, num_layers)]

    def select(self, image: ImageInputs) -> torch.Tensor:
        attn = image.pack_crop_scores(crop_importance(image))  # [n] per visual token
        feats = image.projector_inputs.reshape(-1, image.projector_inputs.shape[-1])
        ids, _, parts = crop_tokens(image)  # each token's projector row (-1: a row separator); tokens per crop
        carrier = ids >= 0
        k = min(image.k, int(carrier.sum()))
        kept = []
        for tokens, share in zip(parts, even_shares(k, [t.numel() for t in parts])):
            if share:
                kept.append(tokens[F.scope_select(attn[tokens], feats[ids[tokens]], share, self.config.alpha)])
        if image.k > k:  # budget beyond the patches: add row separators, first ones first
            kept.append((~carrier).nonzero().squeeze(1)[: image.k - k])
        return torch.cat(kept).sort().values
