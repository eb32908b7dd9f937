"""``prumerge`` — PruMerge / PruMerge+ (42Shawn/LLaVA-PruMerge, 097c0411, ``clip_encoder.py``): an adaptive number
of tokens from the interquartile-range outliers of the CLS attention, each merged with its most key-similar tokens
weighted by attention; ``plus=True`` (PruMerge+, the repository's default path) adds spatially uniform tokens.

Vision stage, on the vision layer the official code hooks: ``layers[23]`` of CLIP ViT-L/336, the last layer, whose
input is ``hidden_states[-2]``, the features LLaVA's projector reads (default ``layer``: ``L - 1``). Its ``q_proj``
/ ``k_proj`` outputs at full width (heads concatenated; signal ``vision_qk``) give one attention row of the CLS
query; the merging runs on the projector's inputs, and the merged vectors are then projected
(:func:`vtprune.functional.prumerge_select` has the math).

Count (``count``):

* ``"adaptive"`` (the paper's; the default when no budget is given): the IQR outliers (PruMerge+: plus its spatial
  tokens), plus one extra row, the attention-weighted sum of the pruned tokens. A ``keep`` / ``ratio`` given with it is
  a nominal setting only (sweeps pass one per budget: ``vtprune.stats`` shows it beside the real count); a budget of
  every token (``keep >= n``, ``ratio=1``) prunes nothing, as for every method.
* ``"budget"`` (not the paper's; the default when ``keep`` / ``ratio`` is given): exactly the budget's tokens,
  ``k - 1`` kept tokens plus the extra row (the outliers first, PruMerge+ then a coarser spatial grid that fits, the
  rest by attention rank).

Order and positions (documented deviation): the official code emits the kept tokens in its own order (descending
attention, then PruMerge+'s spatial tokens ascending), then the extra row, and LLaVA numbers them consecutively.
Here every kept token sits at its own slot and keeps its original position id (ascending, as the engine requires), so
the emission order maps to positions through the kept indices; the extra row takes the slot and position id of the
pruned token with the largest attention (its largest contributor). The attention is float32 (the official code
computes it in the model's dtype).

Families: towers with a CLS token and one visual token per patch, single crop (LLaVA-1.5). Towers without a CLS token
(Qwen-VL, LLaVA-OneVision's SigLIP, Gemma 3) are refused at ``patch`` (the method is defined by the CLS query; the
received-attention port other methods offer is not PruMerge), as are AnyRes / tiled images (LLaVA-NeXT, InternVL).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import functional as F
from ..config import PruneConfig, check_int_option
from ..registry import register_method
from . import surrogates as S
from .base import ImageInputs, Method, Selection

#: values of the ``count`` option
COUNTS = ("adaptive", "budget")


@dataclass
class PruMergeConfig(PruneConfig):
    """PruMerge options (``keep`` / ``ratio`` optional, see ``count``).

    * ``plus`` (False): PruMerge+ (spatially uniform tokens added to the outliers).
    * ``count`` (None): ``"adaptive"`` (the paper's IQR count; a budget is then nominal) or ``"budget"`` (exactly the
      budget's tokens, not the paper's); None: ``"adaptive"`` without a budget, ``"budget"`` with one.
    * ``layer`` (None): the vision layer whose q/k are read (0-based); None: ``L - 1``, the official ``layers[23]``.

    Raises ``ValueError`` for a ``count`` outside :data:`COUNTS`, ``count="budget"`` without ``keep`` / ``ratio``,
    a ``layer`` that is not None or an int >= 0, and ``TypeError`` for a ``plus`` that is not a bool.
    """

    plus: bool = False
    count: str | None = None
    layer: int | None = None

    def __post_init__(self):
        if not isinstance(self.plus, bool):
            raise TypeError(f"plus must be a bool (True: PruMerge+, False: PruMerge), got {self.plus!r}")
        if self.count is not None and (not isinstance(self.count, str) or self.count not in COUNTS):
            raise ValueError(
                f"count must be one of {COUNTS} ('adaptive': the paper's IQR count, 'budget': exactly keep / ratio "
                f"tokens, not the paper's) or None (adaptive without a budget, budget with one), got {self.count!r}"
            )
        check_int_option("layer", self.layer, 0, optional=True)
        if self.keep is None and self.ratio is None:
            if self.count == "budget":
                raise ValueError("count='budget' needs a budget: keep=N or ratio=r (or count='adaptive', the paper's)")
            self.ratio = 1.0  # the base class checks a budget; the adaptive count has none
            super().__post_init__()
            self.ratio = None
            return
        super().__post_init__()

    @property
    def adaptive(self) -> bool:
        """Whether the count is the paper's adaptive one (``count``, or its default)."""
        return self.count == "adaptive" or (self.count is None and self.keep is None and self.ratio is None)

    def budget(self, n: int) -> int:
        """The budget of an ``n``-token image; without one (adaptive) ``n - 1``, a nominal count below ``n`` so that
        the method runs."""
        if self.keep is None and self.ratio is None:
            return max(1, n - 1) if n > 0 else 0
        return super().budget(n)


def _attention(method, image: ImageInputs) -> torch.Tensor:
    qk = image.vision_qk[0, 0]
    return F.prumerge_attention(qk[0, 0], qk[1])


@register_method("prumerge", PruMergeConfig)
class PruMerge(Method):
    stage = "vision"
    signals = frozenset({"features", "vision_qk", "projector_inputs"})
    merges = True
    multi_crop = False
    kept_count = "own"  # the adaptive count; an instance with count="budget" keeps exactly its budget
    surrogate = S.Surrogate(
        "cls-attention",
        "the full-width CLS attention of its layer, which ranks the kept tokens (the adaptive count and the merge "
        "are not attacked)",
        _attention,
    )

    def __init__(self, config: PruMergeConfig):
        super().__init__(config)
        if not config.adaptive:
            self.kept_count = "budget"

    def bind(self, adapter) -> None:
        """Refuse towers without a CLS token and multi-crop images, naming the model type."""
        kind = adapter.config.model_type
        if not adapter.has_cls_token:
            raise ValueError(
                f"prumerge scores patches with the vision tower's CLS query, but {kind!r} models have no CLS token; "
                "use a method with importance='received' there (e.g. 'visionzip', 'cls') or 'divprune'"
            )
        if adapter.multi_crop:
            raise ValueError(
                f"prumerge does not support AnyRes / multi-crop images ({kind!r}); use it on single-crop "
                "LLaVA-1.5-style models"
            )

    def vision_layers(self, num_layers: int) -> list[int]:
        layer = num_layers - 1 if self.config.layer is None else self.config.layer
        if not 0 <= layer < num_layers:
            raise ValueError(
                f"prumerge: layer={layer} is out of range for a {num_layers}-layer vision tower; "
                f"allowed: 0 <= layer <= {num_layers - 1}"
            )
        return [layer]

    def select(self, image: ImageInputs) -> Selection:
        qk = image.vision_qk[0, 0]  # [2, 1+P, E]: q_proj / k_proj outputs of the one crop
        x = image.projector_inputs[0]  # [P, D_in]
        if qk.shape[1] - 1 != image.n or x.shape[0] != image.n:
            raise RuntimeError(
                f"prumerge needs one visual token per patch: {qk.shape[1] - 1} patches, {x.shape[0]} projector rows, "
                f"{image.n} visual tokens"
            )
        keep = None if self.config.adaptive else image.k
        with torch.no_grad():
            query, keys = qk[0, 0], qk[1]
            kept, merged, weights = F.prumerge_select(
                query, keys, x.float(), self.config.plus, keep=keep, return_weights=True
            )
            attn = F.prumerge_attention(query, keys)
            pruned = torch.ones(image.n, dtype=torch.bool, device=attn.device)
            pruned[kept] = False
            if bool(pruned.any()):  # the extra row sits at its largest contributor's slot
                carrier = int(torch.where(pruned, attn, -1.0).argmax())
                kept = torch.cat([kept, torch.tensor([carrier], device=kept.device)])
            else:  # no pruned token: the extra row is zero and has no slot
                merged, weights = merged[:-1], weights[:-1]
            order = torch.argsort(kept)
            vectors = image.projector(merged[order]).to(image.features.dtype)
        return Selection(kept[order], vectors, weights=weights[order].float())
