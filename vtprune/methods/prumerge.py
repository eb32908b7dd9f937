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

Families (each deviation from the official code, which serves LLaVA-1.5's single 336 px crop only, is an option or
a consequence of the model's layout, as below):

* ``importance`` (None: ``"cls"`` where the tower has a CLS token, ``"received"`` elsewhere). ``"cls"`` is the
  paper's signal, as above. ``"received"`` (not the paper's; the default on towers without a CLS token: Qwen-VL,
  LLaVA-OneVision's SigLIP, Gemma 3) scores each patch by the attention it receives at ``layer`` (mean over heads and
  queries, ``vtprune.functional.received_attention``) in place of the CLS row, and the key similarity of the merge
  reads the layer's head-mean keys (signal ``vision_keys``, after the tower's rotary embedding) in place of the
  full-width keys (:func:`vtprune.functional.prumerge_merge` runs the count, merge and extra row on them).
* Tokens that carry several patches (Qwen-VL's 2x2 merge units, InternVL's pixel-shuffled 2x2, Gemma 3's pooled 4x4
  windows): a token's attention is its patches' as the model packs scores (mean), its key the concatenation of its
  patches' keys, its feature the projector's input row (``visionzip``'s and ``scope``'s convention).
* AnyRes / multi-crop images (LLaVA-NeXT, LLaVA-OneVision, InternVL tiles): the official repository has no AnyRes
  path (42Shawn/LLaVA-PruMerge 097c0411, main and every branch: ``clip_encoder.py`` only), so PruMerge runs on each
  crop as on one LLaVA-1.5 image, the natural generalisation of its batch of crops: its own CLS softmax (over all of
  the crop's patches), IQR count, PruMerge+ spatial tokens (over the crop's tokens in raster order), merges within
  the crop and its own extra row (at the slot of the crop's largest-attention pruned token). Patches removed by
  LLaVA-NeXT's unpadding have no visual token: they are neither kept nor merged. Row separators (no patch) are
  dropped; with ``count="budget"`` the budget is split evenly over the crops (``visionzip``'s ``even_shares``, exact
  total; each crop's share includes its extra row) and the separators are kept only where it exceeds the patches.
  An image whose tokens blend patches (LLaVA-OneVision's ``anyres_max`` downscale of a large image) is refused with
  a ``ValueError`` at the forward that brings it (its token count is known only then).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import functional as F
from ..config import PruneConfig, check_int_option
from ..registry import register_method
from ..signals import check_importance
from . import surrogates as S
from ._packing import packed_patches
from .base import ImageInputs, Method, Selection
from .visionzip import even_shares

#: values of the ``count`` option
COUNTS = ("adaptive", "budget")


@dataclass
class PruMergeConfig(PruneConfig):
    """PruMerge options (``keep`` / ``ratio`` optional, see ``count``).

    * ``plus`` (False): PruMerge+ (spatially uniform tokens added to the outliers).
    * ``count`` (None): ``"adaptive"`` (the paper's IQR count; a budget is then nominal) or ``"budget"`` (exactly the
      budget's tokens, not the paper's); None: ``"adaptive"`` without a budget, ``"budget"`` with one.
    * ``layer`` (None): the vision layer whose q/k are read (0-based); None: ``L - 1``, the official ``layers[23]``.
    * ``importance`` (None): ``"cls"`` (the paper's: the CLS query's full-width row and keys), ``"received"`` (not the
      paper's: the attention each patch receives and the head-mean keys) or None (``"cls"`` where the tower has a CLS
      token, else ``"received"``).

    Raises ``ValueError`` for a ``count`` outside :data:`COUNTS`, ``count="budget"`` without ``keep`` / ``ratio``,
    a ``layer`` that is not None or an int >= 0, an ``importance`` outside ``("cls", "received", None)``, and
    ``TypeError`` for a ``plus`` that is not a bool.
    """

    plus: bool = False
    count: str | None = None
    layer: int | None = None
    importance: str | None = None

    def __post_init__(self):
        check_importance(self.importance)
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


def _crop_attention(image: ImageInputs) -> torch.Tensor:
    """``[C, P]`` float32 attention of each crop patch: the CLS query's full-width row (``importance="cls"``,
    :func:`vtprune.functional.prumerge_attention`, per crop) or the attention the patch receives (``"received"``)."""
    if image.vision_qk is not None:
        return torch.stack([F.prumerge_attention(qk[0, 0], qk[1]) for qk in image.vision_qk[:, 0]]).float()
    return image.received[:, 0].float()


def _attention(method, image: ImageInputs) -> torch.Tensor:
    return image.pack_crop_scores(_crop_attention(image))


@register_method("prumerge", PruMergeConfig)
class PruMerge(Method):
    stage = "vision"
    signals = frozenset({"features", "cls_attention", "vision_keys", "vision_qk", "projector_inputs"})
    merges = True
    kept_count = "own"  # the adaptive count; an instance with count="budget" keeps exactly its budget
    surrogate = S.Surrogate(
        "cls-attention",
        "the CLS (or received) attention of its layer, which ranks the kept tokens (the adaptive count and the merge "
        "are not attacked)",
        _attention,
    )

    def __init__(self, config: PruMergeConfig):
        super().__init__(config)
        if not config.adaptive:
            self.kept_count = "budget"

    def vision_layers(self, num_layers: int) -> list[int]:
        layer = num_layers - 1 if self.config.layer is None else self.config.layer
        if not 0 <= layer < num_layers:
            raise ValueError(
                f"prumerge: layer={layer} is out of range for a {num_layers}-layer vision tower; "
                f"allowed: 0 <= layer <= {num_layers - 1}"
            )
        return [layer]

    def select(self, image: ImageInputs) -> Selection:
        with torch.no_grad():
            attn = _crop_attention(image)  # [C, P]
            c, p = attn.shape
            # [C, P, E]: the full-width patch keys (CLS dropped) or the head-mean ones
            keys = image.vision_qk[:, 0, 1, 1:] if image.vision_qk is not None else image.vision_keys[:, 0]
            scores = image.pack_crop_scores(attn)  # [n] per visual token
            patches = image.token_patches(c, p).to(scores.device)  # [n, m]: the crop patches each token carries
            token_keys = keys.reshape(c * p, -1)[patches.clamp(min=0)].flatten(1)  # [n, m * E]
            rows, _, _ = packed_patches(image)  # [n]: each token's projector row (-1: a row separator)
            x = image.projector_inputs.reshape(-1, image.projector_inputs.shape[-1])[rows.clamp(min=0)].float()
            carrier = rows >= 0
            crop_of = torch.where(carrier, patches[:, 0] // p, -1)
            parts = [t for t in ((crop_of == i).nonzero().squeeze(1) for i in range(c)) if t.numel()]
            if self.config.adaptive:
                shares = [None] * len(parts)
            else:
                shares = even_shares(min(image.k, int(carrier.sum())), [t.numel() for t in parts])
            kept, merged, weights = [], [], []
            for tokens, share in zip(parts, shares):
                if share == 0:
                    continue
                got = self._select_crop(scores[tokens], token_keys[tokens], x[tokens], share, tokens, image.n)
                for out, part in zip((kept, merged, weights), got):
                    out.append(part)
            vectors = image.projector(torch.cat(merged)).to(image.features.dtype) if merged else None
            extra = image.k - int(carrier.sum())
            if not self.config.adaptive and extra > 0:  # budget beyond the patches: row separators, first ones first
                seps = (~carrier).nonzero().squeeze(1)[:extra]
                kept.append(seps)
                sep_weights = torch.zeros(seps.numel(), image.n, device=scores.device)
                sep_weights[torch.arange(seps.numel()), seps] = 1.0
                weights.append(sep_weights)
                vectors = torch.cat([v for v in (vectors, image.features[seps]) if v is not None])
            kept, weights = torch.cat(kept), torch.cat(weights)
            order = torch.argsort(kept)
        return Selection(kept[order], vectors[order], weights=weights[order])

    def _select_crop(self, attn, keys, x, share, tokens, n):
        """PruMerge on one crop's ``tokens`` (``[t]`` ascending image token indices, raster order in the crop):
        ``(kept [m] image indices, merged [m, D_in] projector inputs, weights [m, n] over the image's tokens)``, the
        extra row included at the slot of the crop's largest-attention pruned token (none when nothing is pruned)."""
        local, merged, w = F.prumerge_merge(attn, keys, x, self.config.plus, keep=share, return_weights=True)
        pruned = torch.ones(attn.numel(), dtype=torch.bool, device=attn.device)
        pruned[local] = False
        if bool(pruned.any()):  # the extra row sits at its largest contributor's slot
            slot = torch.where(pruned, attn, -1.0).argmax().view(1)
            local = torch.cat([local, slot])
        else:  # no pruned token: the extra row is zero and has no slot
            merged, w = merged[:-1], w[:-1]
        full = torch.zeros(w.shape[0], n, dtype=torch.float32, device=w.device)
        full[:, tokens] = w.float()
        return tokens[local], merged, full
