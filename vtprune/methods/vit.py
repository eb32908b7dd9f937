"""Token reduction inside a vision transformer, between its blocks: ``tome``, ``pitome``, ``zerotprune``.

These methods act in a ViT host (timm, open_clip, transformers CLIP / SigLIP vision models; see
``vtprune.adapters.vit``), not at a VLM's prune points, so they have a registry of their own
(:func:`list_vit_methods`); ``vtprune.patch(vit, "tome", ratio=0.5)`` finds them.

Budget: ``keep=N`` / ``ratio=r`` = the number of **patch** tokens that reach the last block (prefix tokens — CLS,
distillation, registers — are never reduced); the reduction is spread as evenly as each method allows over blocks
``0 .. L-2`` (:func:`vtprune.functional.vit.reduction_schedule`). Each method also takes its official per-layer
option instead of a budget: ToMe's ``r`` (int, ``(r, inflection)`` or per-layer list), PiToMe's ``layer_ratio``
(every block keeps that fraction of its tokens), Zero-TPrune's ``r`` (tokens removed per block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import POSITIONS, PruneConfig
from ..functional import vit as FV
from ..registry import get_method, list_methods, register_method

__all__ = ["ToMeConfig", "PiToMeConfig", "ZeroTPruneConfig", "list_vit_methods", "get_vit_method", "ViTMethod"]


def list_vit_methods() -> list[str]:
    """Names of the methods that act inside a vision transformer, sorted (``vtprune.list_methods(host="vit")``)."""
    return list_methods(host="vit")


def get_vit_method(name: str):
    """``(method_cls, config_cls)`` of a ViT method; unknown names (or a VLM method's) raise ``ValueError``."""
    spec = get_method(name)
    if spec.host != "vit":
        raise ValueError(
            f"{name!r} prunes a VLM's visual tokens; methods that act inside a vision transformer: "
            f"{', '.join(list_vit_methods())}"
        )
    return spec.method_cls, spec.config_cls


@dataclass
class _ViTConfig(PruneConfig):
    """Budget (``keep`` / ``ratio`` of the patch tokens reaching the last block) or the method's own per-layer
    option (``_own``), exactly one of them."""

    _own: ClassVar[str] = ""

    def __post_init__(self):
        own = getattr(self, self._own)
        if own is None:
            super().__post_init__()
            return
        if self.keep is not None or self.ratio is not None:
            raise ValueError(
                f"give a budget (keep= / ratio=) or {self._own}=, not both (got keep={self.keep!r}, "
                f"ratio={self.ratio!r}, {self._own}={own!r})"
            )
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")

    def budget(self, n: int) -> int:
        """The budget's count of ``n`` tokens; with the method's own per-layer option instead of a budget, ``n`` (the
        per-layer option decides how many tokens remain)."""
        if self.keep is None and self.ratio is None:
            return max(n, 0)
        return super().budget(n)


class ViTMethod:
    """A method acting between the blocks of a ViT: a per-block reduction schedule and a per-block plan."""

    name: ClassVar[str]
    #: registry facts (vtprune.registry): acts between the blocks of a vision transformer, merging tokens
    stage: ClassVar[str] = "tower"
    merges: ClassVar[bool] = True
    #: whether the plan needs the block's attention probabilities (recomputed from q / k)
    needs_attention: ClassVar[bool] = False

    def __init__(self, config):
        self.config = config

    @property
    def prop_attn(self) -> bool:
        return bool(getattr(self.config, "prop_attn", False))

    def cap(self, n: int) -> int:
        return n // 2

    def schedule(self, num_patches: int, num_blocks: int) -> list[int]:
        """Tokens removed in each block (the budget's schedule; methods override for their own option)."""
        keep = self.config.budget(num_patches)
        return FV.reduction_schedule(num_patches, keep, num_blocks, self.cap)

    def plan(
        self, index: int, num_blocks: int, r: int, metric: torch.Tensor, attn: torch.Tensor | None, protected: int
    ):
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------- ToMe
@dataclass
class ToMeConfig(_ViTConfig):
    """ToMe (facebookresearch/ToMe). ``r``: the official per-layer option instead of a budget — an int (tokens
    merged per block), an ``(r, inflection)`` pair or a per-block list (``tome/utils.py`` ``parse_r``; the official
    code merges in every block, the last included). ``prop_attn``: proportional attention (``log(size)`` added to
    the attention logits; the official default for off-the-shelf models)."""

    r: int | tuple | list | None = None
    prop_attn: bool = True
    _own: ClassVar[str] = "r"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.prop_attn, bool):
            raise TypeError(f"prop_attn must be a bool, got {self.prop_attn!r}")
        if self.r is not None:
            FV.tome_schedule(self.r, 1 if not isinstance(self.r, list) else max(1, len(self.r)))  # validates


@register_method("tome", ToMeConfig, host="vit")
class ToMe(ViTMethod):
    def schedule(self, num_patches, num_blocks):
        if self.config.r is not None:
            return FV.tome_schedule(self.config.r, num_blocks)
        return super().schedule(num_patches, num_blocks)

    def plan(self, index, num_blocks, r, metric, attn, protected):
        return FV.tome_match(metric, r, protected)


# ---------------------------------------------------------------------------------------------------- PiToMe
@dataclass
class PiToMeConfig(_ViTConfig):
    """PiToMe (hchautran/PiToMe). ``layer_ratio``: the official per-layer option instead of a budget (each block keeps
    ``floor``-rounded ``layer_ratio`` of its non-prefix tokens: ``r = floor(T - T * layer_ratio)``). ``margin``: the
    energy margin of block 0, decreasing linearly to 0 (``margin - margin * l / L``; official 0.75 for timm / DeiT,
    0.9 for CLIP). ``alpha``: the ELU's alpha (1.0). ``bipartite_blocks``: the first blocks use the energy-ordered
    bipartite variant (``pitome_bsm``; official: ``ceil(L / 2)``, None). ``prop_attn``: proportional attention
    (official timm patch: off)."""

    layer_ratio: float | None = None
    margin: float = 0.75
    alpha: float = 1.0
    bipartite_blocks: int | None = None
    prop_attn: bool = False
    _own: ClassVar[str] = "layer_ratio"

    def __post_init__(self):
        super().__post_init__()
        if self.layer_ratio is not None and not (
            isinstance(self.layer_ratio, (int, float)) and 0.5 <= float(self.layer_ratio) <= 1.0
        ):
            raise ValueError(
                f"layer_ratio must be in [0.5, 1] (each block keeps at least half), got {self.layer_ratio!r}"
            )
        for name in ("margin", "alpha"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TypeError(f"{name} must be a finite float, got {v!r}")
        if self.bipartite_blocks is not None and (
            isinstance(self.bipartite_blocks, bool)
            or not isinstance(self.bipartite_blocks, int)
            or self.bipartite_blocks < 0
        ):
            raise ValueError(f"bipartite_blocks must be None or an int >= 0, got {self.bipartite_blocks!r}")
        if not isinstance(self.prop_attn, bool):
            raise TypeError(f"prop_attn must be a bool, got {self.prop_attn!r}")


@register_method("pitome", PiToMeConfig, host="vit")
class PiToMe(ViTMethod):
    def schedule(self, num_patches, num_blocks):
        if self.config.layer_ratio is None:
            return super().schedule(num_patches, num_blocks)
        out, n = [], num_patches
        for _ in range(num_blocks):
            r = min(math.floor(n - n * self.config.layer_ratio), n // 2)
            out.append(r)
            n -= r
        return out

    def plan(self, index, num_blocks, r, metric, attn, protected):
        margin = FV.pitome_margins(num_blocks, float(self.config.margin))[index]
        bsm = self.config.bipartite_blocks
        bsm = math.ceil(num_blocks * 0.5) if bsm is None else bsm
        return FV.pitome_match(metric, r, margin, protected, alpha=float(self.config.alpha), bipartite=index < bsm)


# ---------------------------------------------------------------------------------------------------- Zero-TPrune
@dataclass
class ZeroTPruneConfig(_ViTConfig):
    """Zero-TPrune (Wang, Dedhia & Jha, CVPR 2024). ``r``: tokens pruned per block instead of a budget.
    ``similarity_share``: the share of each block's pruning done by the S-stage (similarity), the rest by the
    I-stage (importance); ``iterations``: Weighted-PageRank iterations on the block's attention graph."""

    r: int | None = None
    similarity_share: float = 0.5
    iterations: int = 30
    _own: ClassVar[str] = "r"

    def __post_init__(self):
        super().__post_init__()
        if self.r is not None and (isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0):
            raise ValueError(f"r must be an int >= 0 (tokens pruned per block), got {self.r!r}")
        s = self.similarity_share
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= float(s) <= 1.0:
            raise ValueError(f"similarity_share must be in [0, 1], got {s!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"iterations must be an int >= 1, got {self.iterations!r}")


@register_method("zerotprune", ZeroTPruneConfig, host="vit")
class ZeroTPrune(ViTMethod):
    needs_attention = True
    merges = False  # prunes (importance, then similarity), never averages tokens

    def cap(self, n):
        return max(n - 1, 0)

    def schedule(self, num_patches, num_blocks):
        if self.config.r is None:
            return super().schedule(num_patches, num_blocks)
        out, n = [], num_patches
        for _ in range(num_blocks):
            r = min(self.config.r, max(n - 1, 0))
            out.append(r)
            n -= r
        return out

    def plan(self, index, num_blocks, r, metric, attn, protected):
        n = metric.shape[1] - protected
        r_s = min(int(r * float(self.config.similarity_share)), n - r)
        importance = FV.wpr_scores(attn, self.config.iterations)
        return FV.zerotprune_match(importance, metric, r - r_s, r_s, protected)
