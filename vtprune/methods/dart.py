"""``dart`` (ZichenWen1/DART): duplication matters more than importance.

LLM stage, before decoder layer K (default 2), prefill only. Pivots: the ``image_pivots`` image tokens and the
``text_pivots`` text tokens (every token after the image) with the largest L1 norm of layer K-1's post-RoPE keys.
For each pivot in ascending position order (our reading of the official Python-set iteration), the remaining
image tokens least cosine-similar to it — on layer K-1's output states after the LLM's final RMSNorm, weight
included — are picked and leave the pool. Kept = image pivots + picks, in original order, original positions.

Budget: by default exactly ``keep`` tokens: ``min(image_pivots, k)`` image pivots plus ``k - pivots`` picks split
as evenly as possible over the pivots (earlier pivots take the remainder). ``budget_rounding="official"``
reproduces the official LLaVA-1.5 code, ``per_pivot = k // 8`` for every pivot, so 64 / 128 / 192 keep 68 / 132
/ 196 tokens. Math: ``vtprune.functional.dart_select``. With several images in one prompt, each image is pruned
on its own and "text after the image" includes later images' tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import functional as F
from ..config import PruneConfig, check_int_option
from ..registry import register_method
from . import surrogates as S
from .base import ImageInputs, Method, check_layer

_ROUNDING = ("exact", "official")


@dataclass
class DARTConfig(PruneConfig):
    """DART options (budget: ``keep`` / ``ratio`` and the common options of :class:`vtprune.PruneConfig`).

    * ``layer`` (2): prune before decoder layer K; pivots and similarities come from layer K-1.
    * ``image_pivots`` (4): image tokens with the largest key L1 norm taken as pivots (and kept).
    * ``text_pivots`` (4): text tokens after the image taken as pivots.
    * ``budget_rounding`` (``"exact"``): keep exactly ``keep`` tokens; ``"official"``: the official code's
      ``per_pivot = k // 8`` (64 / 128 / 192 keep 68 / 132 / 196).
    """

    layer: int = 2
    image_pivots: int = 4
    text_pivots: int = 4
    budget_rounding: str = "exact"

    def __post_init__(self):
        super().__post_init__()
        check_int_option("layer", self.layer, 1)
        check_int_option("image_pivots", self.image_pivots, 1)
        check_int_option("text_pivots", self.text_pivots, 0)
        if self.budget_rounding not in _ROUNDING:
            raise ValueError(f"budget_rounding must be one of {_ROUNDING}, got {self.budget_rounding!r}")


def _duplication(method, image: ImageInputs) -> torch.Tensor:
    """The robustness surrogate: minus the lowest cosine similarity of each image token's final-normed hidden state to
    the key-norm pivots (pivot choice held fixed): DART keeps the tokens least similar to a pivot."""
    cfg = method.config
    start, n = image.image_start, image.n
    l1 = image.keys.detach().float().abs().sum(-1)
    img_piv = l1[start : start + n].topk(min(cfg.image_pivots, n)).indices + start
    after = l1[start + n :]
    txt_piv = after.topk(min(cfg.text_pivots, after.numel())).indices + start + n
    normed = torch.nn.functional.normalize(image.final_norm(image.hidden).float(), dim=-1)
    cos = normed[start : start + n] @ normed[torch.cat([img_piv, txt_piv])].T  # [n, pivots]
    return -cos.min(dim=1).values


@register_method("dart", DARTConfig)
class DART(Method):
    stage = "llm"
    signals = frozenset({"keys", "hidden"})
    surrogate = S.Surrogate(
        "pivot-duplication",
        "tokens least cosine-similar to a pivot are kept -> minus the lowest "
        "cosine similarity of the (final-normed) hidden state to the key-norm pivots (pivot choice "
        "held fixed)",
        _duplication,
    )

    def __init__(self, config: DARTConfig):
        super().__init__(config)
        if config.budget_rounding == "official":  # pivots + k // 8 per pivot: the budget is nominal
            self.kept_count = "own"

    def layer(self, num_layers: int) -> int:
        return check_layer("dart", self.config.layer, num_layers)

    def select(self, image: ImageInputs) -> torch.Tensor:
        cfg, n, k = self.config, image.n, image.k
        text_after = image.hidden.shape[0] - image.image_start - n
        image_pivots = min(cfg.image_pivots, k)
        pivots = image_pivots + min(cfg.text_pivots, text_after)
        if cfg.budget_rounding == "official":
            per_pivot = k // 8
        else:
            base, extra = divmod(k - image_pivots, pivots)
            per_pivot = [base + (i < extra) for i in range(pivots)]
        with torch.no_grad():
            normed = image.final_norm(image.hidden)
        return F.dart_select(
            normed,
            image.keys,
            image.image_start,
            n,
            per_pivot,
            image_pivots=image_pivots,
            text_pivots=cfg.text_pivots,
        )
