"""``holov`` (obananas/HoloV, NeurIPS 2025): the budget split over contiguous crops of the token sequence in
proportion to each crop's attention (and feature-similarity variance), then the top-attention tokens of each crop
(``vtprune.functional.holov_select``).

Vision stage, on the projected visual tokens (official: the features after the projector) and the head-mean [CLS]
attention row of the vision layer the projector reads (``L - 2`` by default, LLaVA's ``mm_vision_select_layer``),
or the attention each patch receives where the tower has no CLS token (``importance``; Qwen-VL merge units get
their patches' mean, as the official Qwen port pools it). A "crop" is a contiguous run of the image's tokens in the
order the language model receives them (the official code's "patch"), not an AnyRes tile: LLaVA-NeXT's tokens
(base image, then the unpadded grid) are cut into ``crops`` runs as the official code cuts them; its row separators
(which the official code leaves out) carry no patch and are not candidates (kept only when the budget exceeds the
patches). ``crops=None`` is the official Qwen port's count ``max(1, int(16 N / (9 k)))`` (16 at 64 of 576, the
count the official LLaVA script fixes).

Where a crop is allotted more tokens than it has, the official code pads the image's tokens with zero vectors up to
the budget. ``fill`` (docs/methods.md): ``"attention"`` (default, not the official behaviour) keeps the budget's
count with real tokens: the highest-attention tokens not yet kept; ``"zeros"`` (official) keeps the same count, the
fill tokens carrying zero vectors; ``"none"`` keeps only the crops' tokens (fewer than the budget). Kept tokens keep
their original order and position ids (the official code emits them crop by crop, each crop in descending
attention, with contiguous positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import functional as F
from ..config import PruneConfig, check_int_option
from ..functional.holov import HOLOV_ALPHA
from ..registry import register_method
from ..signals import check_importance
from . import surrogates as S
from .base import ImageInputs, Method, Selection, crop_importance, vision_layer

_FILLS = ("attention", "zeros", "none")


@dataclass
class HoloVConfig(PruneConfig):
    """HoloV options.

    * ``crops`` (None): the number of contiguous crops the image's tokens are cut into, an int >= 1; None: the
      official Qwen port's ``max(1, int((1024 / 576) * N / k))`` (16 at LLaVA-1.5's 64 of 576).
    * ``alpha`` (0.09, official): weight of the similarity-variance term of a crop's score, a number >= 0.
    * ``fill`` (``"attention"``): what fills the budget where a crop is allotted more tokens than it has:
      ``"attention"`` the highest-attention tokens not yet kept (not the paper's); ``"zeros"`` the official zero
      vectors (the fill tokens' positions carry zero vectors); ``"none"`` nothing (fewer tokens than the budget).
    * ``layer`` (None): the vision layer whose attention is read; None: ``L - 2``, the layer LLaVA's projector reads.
    * ``importance`` (None): ``"cls"``, ``"received"`` or None (``"cls"`` where the tower has a CLS token, else
      ``"received"``).
    """

    crops: int | None = None
    alpha: float = HOLOV_ALPHA
    fill: str = "attention"
    layer: int | None = None
    importance: str | None = None

    def __post_init__(self):
        super().__post_init__()
        check_importance(self.importance)
        check_int_option("crops", self.crops, 1, optional=True, hint=" (None: the official count from the budget)")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= float(a) < float("inf"):
            raise ValueError(f"alpha must be a finite number >= 0 (official 0.09), got {a!r}")
        self.alpha = float(a)
        if self.fill not in _FILLS:
            raise ValueError(
                f"fill must be one of {_FILLS} ('attention': the highest-attention tokens left; 'zeros': the "
                f"official zero vectors; 'none': fewer tokens than the budget), got {self.fill!r}"
            )
        check_int_option("layer", self.layer, 0, optional=True)


@register_method("holov", HoloVConfig)
class HoloV(Method):
    stage = "vision"
    signals = frozenset({"features", "cls_attention"})
    surrogate = S.Surrogate(
        "cls-attention",
        "the attention that allocates the crops' shares and ranks tokens in each crop",
        S.cls_scores,
    )

    def __init__(self, config: HoloVConfig):
        super().__init__(config)
        if config.fill == "none":  # the crops' tokens only
            self.kept_count = "at_most"
        if config.fill == "zeros":  # fill tokens carry zero vectors
            self.merges = True

    def vision_layers(self, num_layers: int) -> list[int]:
        return [vision_layer("holov", self.config.layer, num_layers)]

    def select(self, image: ImageInputs) -> torch.Tensor | Selection:
        crop_scores = crop_importance(image)  # [C, P]
        attn = image.pack_crop_scores(crop_scores)  # [n] per visual token
        carrier = image.token_patches(*crop_scores.shape)[:, 0].to(attn.device) >= 0
        tokens = carrier.nonzero().squeeze(1)  # the tokens that carry a patch (not row separators), ascending
        k = min(image.k, tokens.numel())
        cfg = self.config
        emitted = tokens[F.holov_select(image.features[tokens], attn[tokens], k, crops=cfg.crops, alpha=cfg.alpha)]
        fill = emitted[:0]
        if cfg.fill != "none" and emitted.numel() < k:  # by attention among the tokens left (ties: lower index)
            left = torch.ones(image.n, dtype=torch.bool, device=attn.device)
            left[emitted] = False
            rest = tokens[left[tokens]]
            fill = rest[torch.sort(attn[rest], descending=True, stable=True).indices[: k - emitted.numel()]]
        extra = (~carrier).nonzero().squeeze(1)[: image.k - k]  # budget beyond the patches: row separators
        kept = torch.cat([emitted, fill, extra]).sort().values
        if cfg.fill != "zeros":
            return kept
        merged = image.features[kept].clone()
        weights = torch.nn.functional.one_hot(kept, image.n).float()
        pad = torch.isin(kept, fill)
        merged[pad] = 0
        weights[pad] = 0
        return Selection(kept, merged, weights)
