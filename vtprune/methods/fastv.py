"""``fastv`` (pkunlp-icler/FastV): at decoder layer K (default 2), keep the visual tokens that the last prompt
token attends to most at layer K-1 (attention averaged over heads).

The official code switches the model to eager attention to read the weights; here the one row needed is
recomputed from layer K-1's post-RoPE q/k (``vtprune.signals``), so SDPA / FlashAttention stay on.
The budget is per image (official FastV: one image, keep R tokens).

``debias=True`` applies attention debiasing (intcomp/attention-bias, ``vtprune.debias``): scores are multiplied
by recency weights ``w_i = trend(0) / trend(i)`` over the image-token index ``i`` — ``debias_weights="cubic"``
(the official FastV vector, default), ``"exp"`` (``exp(-debias_beta * i)``), ``"none"`` (no re-weighting) or the
path of a profile fitted by ``vtprune calibrate`` — and, when the image sizes of a padded-to-square LLaVA-1.5
prompt were given (``vtprune.set_image_sizes``), padding patches (more than ``pad_threshold`` padding) score 0
and the budget is capped at the number of real patches. Without sizes there is no padding mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import functional as F
from ..config import PruneConfig, check_int_option
from ..debias import builtin_profile, load_profile
from ..registry import register_method
from . import surrogates as S
from .base import ImageInputs, Method, check_layer

_BUILTIN_WEIGHTS = ("cubic", "exp", "none")
_DEFAULT_BETA = 0.003


@dataclass
class FastVConfig(PruneConfig):
    """FastV options (budget: ``keep`` / ``ratio`` and the common options of :class:`vtprune.PruneConfig`).

    * ``layer`` (2): prune before decoder layer K, ranking by the last prompt token's attention at layer K-1.
    * ``debias`` (False): attention debiasing (``vtprune.debias``); the three options below apply only with it.
    * ``debias_weights`` (``"cubic"``): the recency weights ``w_i = trend(0) / trend(i)`` over the image-token
      index: ``"cubic"`` (the official FastV vector), ``"exp"`` (``exp(-debias_beta * i)``), ``"none"``, or
      the path of a profile written by ``vtprune calibrate``.
    * ``debias_beta``: the decay rate ``beta >= 0`` of ``debias_weights="exp"``.
    * ``pad_threshold`` (0.5): with image sizes given (``vtprune.set_image_sizes``), a patch with more than this
      fraction of padding scores 0 and the budget is capped at the real patches.
    """

    layer: int = 2
    debias: bool = False
    debias_weights: str = "cubic"
    debias_beta: float = _DEFAULT_BETA
    pad_threshold: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        check_int_option("layer", self.layer, 1, hint=" (prune before decoder layer K)")
        if not isinstance(self.debias, bool):
            raise TypeError(f"debias must be True or False, got {self.debias!r}")
        if not isinstance(self.debias_weights, str) or not self.debias_weights:
            raise TypeError(
                f"debias_weights must be one of {_BUILTIN_WEIGHTS} or a profile path, got {self.debias_weights!r}"
            )
        beta = self.debias_beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
            raise ValueError(
                f"debias_beta must be a finite number >= 0 (weights exp(-beta * i) must not grow with "
                f"position), got {beta!r}"
            )
        t = self.pad_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise ValueError(f"pad_threshold must be a number in [0, 1], got {t!r}")
        changed = [
            n
            for n, default in (("debias_weights", "cubic"), ("debias_beta", _DEFAULT_BETA), ("pad_threshold", 0.5))
            if getattr(self, n) != default
        ]
        if changed and not self.debias:
            raise ValueError(f"{changed} only apply with debias=True; pass debias=True or drop them")
        if self.debias_beta != _DEFAULT_BETA and self.debias_weights != "exp":
            raise ValueError(
                f"debias_beta applies to debias_weights='exp' only (got debias_weights={self.debias_weights!r})"
            )


@register_method("fastv", FastVConfig)
class FastV(Method):
    stage = "llm"
    signals = frozenset({"text_attention"})
    surrogate = S.Surrogate(
        "text-attention",
        "the method's own score: head-mean attention of the last prompt token at "
        "layer K-1 (debias weights, when on, are not applied)",
        S.text_attention,
        exact=True,
    )

    def __init__(self, config: FastVConfig):
        super().__init__(config)
        self.profile = None
        if config.debias:  # no more than the image's real tokens (set_image_sizes)
            self.kept_count = "at_most"
        if config.debias and config.debias_weights != "none":
            if config.debias_weights in _BUILTIN_WEIGHTS:
                self.profile = builtin_profile(config.debias_weights, config.debias_beta)
            else:
                self.profile = load_profile(config.debias_weights)

    def pad_threshold(self) -> float:
        return self.config.pad_threshold

    def layer(self, num_layers: int) -> int:
        return check_layer("fastv", self.config.layer, num_layers)

    def check_budget(self, num_layers: int, tokens: int | None) -> None:
        """A debias profile must weight every visual token of the model's images (a cubic trend that crosses zero
        before the last one cannot)."""
        if self.profile is None or tokens is None:
            return
        try:
            self.profile.weights(tokens)
        except ValueError as err:
            raise ValueError(
                f"fastv: debias_weights={self.config.debias_weights!r} cannot weight this model's {tokens} visual "
                f"tokens per image: {err}. Fit a profile for this model with `vtprune calibrate MODEL IMAGES... "
                "--kind exp`, or use debias_weights='exp'"
            ) from None

    def scores(self, image: ImageInputs) -> torch.Tensor:
        """Head-mean attention of the last prompt token to each of the image's tokens."""
        return image.text_attention.mean(dim=0)[image.image_start : image.image_start + image.n]

    def select(self, image: ImageInputs) -> torch.Tensor:
        scores, k = self.scores(image), image.k
        if self.config.debias:
            weight = self.profile.weights(image.n) if self.profile is not None else None
            mask = image.real_mask
            scores = F.debias_scores(scores, weight, mask)
            if mask is not None:
                k = min(k, max(1, int(mask.sum())))
        return F.topk_indices(scores, k)
