"""``pact`` (orailix/PACT): density-peak clustering (DBDPC) of the image tokens' keys, cluster means kept.

LLM stage, before decoder layer K (official 4). The image tokens' post-RoPE keys (heads flattened) are clustered
with DBDPC (cosine distance, density ranks with ``dc = 2``, distance cutoff; ``vtprune.functional.dbdpc_cluster``);
each cluster keeps its centre token, at the centre's position, with the mean of the cluster's hidden states
entering layer K. Math: ``vtprune.functional.pact_merge``.

Budget: official PACT is cutoff-driven (``cutoff=0.21`` keeps a data-dependent number of tokens). Here ``keep`` /
``ratio`` give exactly ``k`` tokens per image: the cutoff is the smallest one ``>= cutoff`` (default 0) whose
DBDPC has at most ``k`` centres, and if that leaves fewer, the tokens farthest from their centre become centres
too (every token then joins its nearest centre), so the method always keeps exactly ``k``. The official
data-dependent count (cutoff 0.21, no budget) is ``vtprune.functional.pact_merge(hidden, keys, k=None,
cutoff=0.21)``.

Where this differs from the official code (our reading, documented):

* keys: the engine hands methods layer K-1's post-RoPE keys; the official code recomputes layer K's own keys
  (``k_proj(input_layernorm(h))`` of the layer-K input). Pruning happens at the same point (before layer K);
* importance pruning (EUTI, official ``pact.json``: keep 55% by mean-query attention x hidden-state norm, pruned
  tokens later "retrieved" into clusters within 1.5x the cutoff) needs every image token's layer-K queries, which
  the engine does not provide: this method runs the official ``dbdpc.json`` configuration (DBDPC on all image
  tokens, no retrieval). ``vtprune.functional.pact_merge(importance=...)`` implements the retrieval step for callers
  that have the scores;
* proportional attention (official: log cluster size added to the attention logits of merged tokens) is not
  applied: attention stays the model's own (SDPA / FlashAttention);
* cluster means are computed in float32 and cast to the model dtype; density ties go to the lower index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import functional as F
from ..config import PruneConfig
from ..functional.pact import PACT_DC
from ..registry import register_method
from . import surrogates as S
from .base import ImageInputs, Method, Selection, check_layer, merge_weights

#: official reduction layer (configs/pact.json "layer_for_reduction": 4)
PACT_LAYER = 4


@dataclass
class PACTConfig(PruneConfig):
    """PACT options (budget: ``keep`` / ``ratio`` and the common options of :class:`vtprune.PruneConfig`).

    * ``layer`` (None): prune before decoder layer K; None: the official 4 (the last layer of a language model
      with at most 4 layers).
    * ``cutoff`` (0.0): the smallest DBDPC distance cutoff tried (official PACT: 0.21, cutoff-driven).
    * ``dc``: the DBDPC density parameter (official 2).
    """

    layer: int | None = None  # None: the official 4, or the last layer of a language model with <= 4 layers
    cutoff: float = 0.0  # smallest DBDPC cutoff; official PACT uses 0.21 (cutoff-driven)
    dc: float = PACT_DC

    def __post_init__(self):
        super().__post_init__()
        if self.layer is not None and (
            isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1
        ):
            raise ValueError(f"layer must be an int >= 1 (prune before decoder layer K) or None, got {self.layer!r}")
        for name, low in (("cutoff", 0.0), ("dc", 1e-12)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
                raise ValueError(f"{name} must be a number >= {low}, got {value!r}")


@register_method("pact", PACTConfig)
class PACT(Method):
    stage = "llm"
    signals = frozenset({"keys", "hidden"})
    merges = True
    surrogate = S.Surrogate(
        "key-isolation",
        "density-peak clustering of the keys keeps isolated tokens as their own "
        "centres -> cosine distance of each key to its nearest neighbour",
        S.key_isolation,
    )

    def layer(self, num_layers: int) -> int:
        layer = self.config.layer if self.config.layer is not None else min(PACT_LAYER, num_layers - 1)
        return check_layer("pact", layer, num_layers)

    def select(self, image: ImageInputs) -> Selection:
        span = slice(image.image_start, image.image_start + image.n)
        with torch.no_grad():
            out = F.pact_merge(
                image.hidden[span], image.keys[span], k=image.k, cutoff=self.config.cutoff, dc=self.config.dc
            )
        return Selection(kept=out.kept, merged=out.merged, weights=merge_weights(out.assignment, out.kept.numel()))
