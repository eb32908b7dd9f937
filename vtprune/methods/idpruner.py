"""``idpruner`` (IDPruner, Tencent/AngelSlim): greedy maximal marginal relevance between each token's importance and
its largest cosine similarity to the tokens already picked (``vtprune.functional.idpruner_select``).

Vision stage, on the projected visual tokens (the official code reads them from the language model's
``inputs_embeds``). The paper's importance is a trained scorer ("Vision Selector", a small transformer over those
tokens; public checkpoints exist for Qwen2.5-VL-3B / 7B, ``AngelSlim/Qwen2.5-VL-*-Instruct-Selector``, loaded by
AngelSlim's own code): pass it as ``scorer=`` (a module or callable giving one raw score per token; called as
``scorer(features[None])`` like the official ``get_universal_selector_scores(..., mode="raw")``). Without one, the
importance is training-free and **not the paper's**: the head-mean [CLS] attention of the vision layer the projector
reads (``L - 2``), or the attention each patch receives where the tower has no CLS token (``importance``; Qwen-VL
merge units get their patches' mean), as ``vispruner`` / ``visionzip`` read it. LLaVA-NeXT's row separators are
candidates like every other visual token (the official code runs on every vision position of ``inputs_embeds``);
the training-free importance gives them the image's lowest score. Kept tokens keep their original order and
position ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import functional as F
from ..config import PruneConfig, check_int_option
from ..registry import register_method
from ..signals import check_importance
from . import surrogates as S
from .base import ImageInputs, Method, crop_importance, vision_layer


@dataclass
class IDPrunerConfig(PruneConfig):
    """IDPruner options.

    * ``mmr_lambda`` (0.5, official): weight of importance against redundancy, a number in [0, 1]
      (``lambda * imp - (1 - lambda) * max sim``).
    * ``parallel_k`` (1, official): tokens picked per greedy step, an int >= 1.
    * ``scorer`` (None): the paper's importance, a ``torch.nn.Module`` or callable mapping the image's projected
      tokens ``[1, n, D]`` to ``n`` raw scores (``[1, n]`` or ``[n]``; run without gradients, its input cast to the
      module's parameter dtype). None: the training-free importance below (not the paper's). A config with an
      in-memory scorer cannot be written as JSON.
    * ``importance`` (None): the training-free importance, ``"cls"``, ``"received"`` or None (``"cls"`` where the
      tower has a CLS token, else ``"received"``); unused with a ``scorer``.
    * ``layer`` (None): the vision layer whose attention the training-free importance reads; None: ``L - 2``.
    """

    mmr_lambda: float = 0.5
    parallel_k: int = 1
    scorer: Callable[[torch.Tensor], torch.Tensor] | None = None
    importance: str | None = None
    layer: int | None = None

    def __post_init__(self):
        super().__post_init__()
        lam = self.mmr_lambda
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= float(lam) <= 1.0:
            raise ValueError(f"mmr_lambda must be a number in [0, 1] (official 0.5), got {lam!r}")
        self.mmr_lambda = float(lam)
        check_int_option("parallel_k", self.parallel_k, 1, hint=" (tokens picked per greedy step; official 1)")
        if self.scorer is not None and not callable(self.scorer):
            raise TypeError(
                "scorer must be None (the training-free importance) or a torch.nn.Module / callable mapping the "
                f"projected tokens [1, n, D] to n scores, got {type(self.scorer).__name__}"
            )
        check_importance(self.importance)
        if self.scorer is not None and (self.importance is not None or self.layer is not None):
            raise ValueError(
                "idpruner: importance= / layer= choose the training-free importance; with a scorer= they would be "
                "unused (leave them None)"
            )
        check_int_option("layer", self.layer, 0, optional=True)

    def to_dict(self) -> dict[str, Any]:
        if self.scorer is not None:
            raise ValueError(
                "idpruner: a config with an in-memory scorer= cannot be written as a dict / JSON; save the scorer "
                "yourself and pass it again when patching"
            )
        return super().to_dict()


def _importance(method, image: ImageInputs) -> torch.Tensor:
    """``[n]`` raw importance: the scorer's outputs, or the packed CLS / received attention (training-free)."""
    scorer = method.config.scorer
    if scorer is None:
        return image.pack_crop_scores(crop_importance(image))
    x = image.features
    param = next(iter(scorer.parameters()), None) if isinstance(scorer, torch.nn.Module) else None
    out = scorer(x.unsqueeze(0).to(param.dtype) if param is not None else x.unsqueeze(0))
    if not isinstance(out, torch.Tensor) or out.shape not in ((1, image.n), (image.n,)):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"idpruner: scorer returned {shape} for an image of {image.n} visual tokens; expected a tensor of shape "
            f"[1, {image.n}] or [{image.n}] (one raw score per token)"
        )
    return out.reshape(image.n)


@register_method("idpruner", IDPrunerConfig)
class IDPruner(Method):
    stage = "vision"
    signals = frozenset({"features", "cls_attention"})
    surrogate = S.Surrogate(
        "importance",
        "the method's importance (its scorer, or the CLS / received attention); the redundancy term is not attacked",
        _importance,
    )

    def __init__(self, config: IDPrunerConfig):
        super().__init__(config)
        if config.scorer is not None:  # the scorer reads the projected tokens only
            self.signals = frozenset({"features"})

    def vision_layers(self, num_layers: int) -> list[int]:
        if self.config.scorer is not None:
            return []
        return [vision_layer("idpruner", self.config.layer, num_layers)]

    def select(self, image: ImageInputs) -> torch.Tensor:
        with torch.no_grad():
            scores = _importance(self, image)
        cfg = self.config
        return F.idpruner_select(image.features, scores, image.k, cfg.mmr_lambda, cfg.parallel_k)
