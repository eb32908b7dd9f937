"""``hiprune`` (Danielement321/HiPrune): anchor tokens by the attention of a middle ("object") vision layer, their
grid neighbours as buffer, register tokens by the attention of the layer the projector reads
(``vtprune.functional.hiprune_select``; official ``LLaVA/llava/model/llava_arch.py`` lines 140-184 and
``Qwen2_5_VL/qwen2_5_vl_HiPrune.py`` lines 1854-1881, commit 6e83a124).

Vision stage. Two vision layers are read: ``object_layer`` (None: ``round(9 L / 24) - 1``, the official 9th of
CLIP-L's 24 layers, index 8; the official Qwen2.5-VL setting is the 16th of 32, ``object_layer=15``) and
``deep_layer`` (None: ``L - 2``, the layer LLaVA's projector reads; the official Qwen2.5-VL code reads the last
layer, ``deep_layer=L - 1``). The official attention is the one each token *receives*: the head mean averaged over
all queries (CLS included), CLS column dropped — ``importance="received"``, the default here on every tower; the
official code's commented-out alternative, the [CLS] row, is ``importance="cls"``. Kept tokens in original order,
keeping their position ids; exactly the budget (the official count is the budget too: buffer + registers = ``T``).

Grids: each crop's tokens are a row-major grid, ``width`` tokens a row (LLaVA: ``sqrt`` of the crop's patches, 24;
Qwen-VL: the merged grid's width, as the official port; a Qwen video is one grid of ``t x h x w`` units, the
official raster arithmetic running across frames). Neighbours follow the official index arithmetic (no row-end
check, clamped to the grid: ``vtprune.functional.hiprune_select``).

AnyRes (LLaVA-NeXT): per crop, as the official code (``int(T / crops)`` per crop, each crop's own anchors on its own
24 x 24 grid): the image's budget split evenly over its crops (exact total, ``visionzip``'s ``even_shares``). Where
a crop's unpadding removed patches, the official code still counts buffer neighbours that fall in the removed rows
(they are then cut out: fewer tokens than ``T``); here removed patches are never anchors or registers, and the slots
of buffer neighbours that were removed go to the crop's next registers, so the budget is met. Row separators are
kept only when the budget exceeds the patches (the official code keeps every one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import functional as F
from ..config import PruneConfig, check_int_option
from ..registry import register_method
from ..signals import check_importance
from ._packing import crop_tokens
from .base import ImageInputs, Method
from .visionzip import even_shares


@dataclass
class HiPruneConfig(PruneConfig):
    """HiPrune options. ``alpha``: share of the budget for anchors and their buffer, a number in [0, 1] (official
    0.1: ``round(k * alpha / 5)`` anchors); ``object_layer``: the middle vision layer whose attention picks anchors
    (None: ``round(9 L / 24) - 1``, the official 9th of 24; Qwen2.5-VL official: 15); ``deep_layer``: the layer
    whose attention picks registers (None: ``L - 2``, the layer LLaVA's projector reads; Qwen2.5-VL official:
    ``L - 1``); ``importance``: ``"received"`` (default, the official signal: attention averaged over all queries)
    or ``"cls"`` (the [CLS] query's row; the official code's commented-out variant)."""

    alpha: float = 0.1
    object_layer: int | None = None
    deep_layer: int | None = None
    importance: str | None = "received"

    def __post_init__(self):
        super().__post_init__()
        check_importance(self.importance)
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= float(a) <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1] (share of anchors and buffer; official 0.1), got {a!r}")
        self.alpha = float(a)
        check_int_option("object_layer", self.object_layer, 0, optional=True)
        check_int_option("deep_layer", self.deep_layer, 0, optional=True)


@register_method("hiprune", HiPruneConfig)
class HiPrune(Method):
    stage = "vision"
    signals = frozenset({"features", "cls_attention", "projector_inputs"})

    def _layers(self, num_layers: int) -> tuple[int, int]:
        obj = self.config.object_layer
        obj = max(0, round(9 * num_layers / 24) - 1) if obj is None else obj
        deep = max(0, num_layers - 2) if self.config.deep_layer is None else self.config.deep_layer
        for name, layer in (("object_layer", obj), ("deep_layer", deep)):
            if not 0 <= layer < num_layers:
                raise ValueError(
                    f"hiprune: {name}={layer} is out of range for a {num_layers}-layer vision tower; "
                    f"allowed: 0 <= {name} <= {num_layers - 1}"
                )
        return obj, deep

    def vision_layers(self, num_layers: int) -> list[int]:
        self._obj, self._deep = self._layers(num_layers)
        return sorted({self._obj, self._deep})

    def _layer_scores(self, image: ImageInputs, layer: int) -> torch.Tensor:
        """``[C, P]`` float32 attention of one of the method's vision layers per crop patch."""
        j = sorted({self._obj, self._deep}).index(layer)
        if image.received is not None:
            return image.received[:, j].float()
        return F.cls_scores(image.cls_attention, [j])

    def select(self, image: ImageInputs) -> torch.Tensor:
        obj_patch, deep_patch = self._layer_scores(image, self._obj), self._layer_scores(image, self._deep)
        obj, deep = image.pack_crop_scores(obj_patch), image.pack_crop_scores(deep_patch)  # [n] per token
        ids, p, parts = crop_tokens(image)
        carrier = ids >= 0
        grid = image.extra.get("grid")
        if grid is not None:  # Qwen-VL: one grid of merge units, (t, h, w) in patches
            merge = math.isqrt(obj_patch.shape[-1] // p)
            width = int(grid.reshape(-1)[2]) // merge
        else:
            width = math.isqrt(p)
            if width * width != p:
                raise ValueError(
                    f"hiprune needs each crop's visual tokens on a grid: {p} tokens per crop are not a square and "
                    "the model gives no grid width"
                )
        k = min(image.k, int(carrier.sum()))
        kept = []
        for tokens, share in zip(parts, even_shares(k, [t.numel() for t in parts])):
            if share:
                kept.append(self._select_crop(obj[tokens], deep[tokens], ids[tokens] % p, p, width, share, tokens))
        if image.k > k:  # budget beyond the patches: add row separators, first ones first
            kept.append((~carrier).nonzero().squeeze(1)[: image.k - k])
        return torch.cat(kept).sort().values

    def _select_crop(self, obj, deep, local, p, width, share, tokens) -> torch.Tensor:
        """The kept ``tokens`` of one crop whose tokens sit at grid cells ``local`` of its ``p``-cell grid."""
        # an unpadded crop's absent cells score below every present one: they are never anchors or registers
        low = torch.minimum(obj.min(), deep.min()).detach() - 1.0  # a fill value: no gradient
        full_obj = torch.full((p,), float(low), dtype=obj.dtype, device=obj.device).index_copy_(0, local, obj)
        full_deep = torch.full((p,), float(low), dtype=deep.dtype, device=deep.device).index_copy_(0, local, deep)
        cell_token = torch.full((p,), -1, dtype=torch.long, device=obj.device).index_copy_(0, local, tokens)
        cells = F.hiprune_select(full_obj, full_deep, share, self.config.alpha, width=width)
        chosen = cell_token[cells]
        chosen = chosen[chosen >= 0]
        missing = share - chosen.numel()  # buffer neighbours in removed rows: their slots go to the next registers
        if missing:
            rest = deep.clone()
            rest[torch.isin(tokens, chosen)] = -math.inf
            chosen = torch.cat([chosen, tokens[F.topk_indices(rest, missing)]])
        return chosen
