"""``sparsevlm`` — SparseVLM (Gumpest/SparseVLMs, ICML 2025): text-guided visual token sparsification in the LLM.

Raters, chosen from the LLM's input embeddings: the text tokens after the image whose (image-averaged) softmax
affinity to the image tokens is above the mean (``vtprune.functional.sparsevlm_raters``; multi-image prompts: the
non-visual tokens after the image). At each pruning layer ``l`` (``layers``, 0-based, official v1.5 ``(2, 6, 15)``)
the layer runs on the full current sequence; an image token's score is its head-mean, rater-mean attention from the
raters at layer ``l``; the top ``count`` are kept and the layer's output is pruned, i.e. a prune point before decoder
layer ``l + 1``. Recycling: of the pruned tokens the ``int(0.3 P) + 1`` best-scored are clustered (DPC-KNN) into
``int(that / 10) + 1`` merged tokens, which later pruning layers score like any image token
(``vtprune.functional.sparsevlm_select``; deterministic: no density noise, ties to the lower index).

``version="v1.5"`` (default, the v1.5 branch): fixed per-budget counts, official for 576-token images
``192 -> (300, 200, 110)``, ``128 -> (303, 110, 36)``, ``64 -> (66, 30, 17)``; another budget / image size takes
the row of the nearest budget fraction ``keep / n`` with its counts scaled by ``keep / keep_row`` (rounded, at
least 1); ``counts=`` gives them directly. ``version="v1"`` (first release 91fb6d98): layers ``(2, 6, 15, 19)``, the
count at each layer is
``min(int(rank(P) * scale + bias), V - 1)`` (``sparsevlm_rank_count``), (scale, bias) 192 -> (13.5, 0),
128 -> (9, 6), 64 -> (0.8, 0) (nearest budget fraction otherwise), or ``scale=`` / ``bias=``.
``version="v2"`` (SparseVLM+, branch v2.0 9e1f649e, ``USE_VERSION=2_0``): the same raters and layers; at each
pruning layer every head's rater->image attention is divided by the RoPE-only "gravity" term of the same positions
(``vtprune.functional.rope_gravity``), and only the ``heads`` (official 14) heads with the largest corrected mass
score the image tokens (``vtprune.functional.sparsevlm_plus_attention``); no recycling (``recycle`` defaults to
False); its own per-budget counts ``192 -> (300, 200, 118)``, ``128 -> (238, 108, 60)``, ``96 -> (246, 54, 28)``,
``64 -> (66, 34, 20)`` (scaled like v1.5's); kept tokens keep their position ids, as the official v2.0 code does
(vtprune's default ``positions="original"``: there is no deviation to document for v2).
A count at or above the image's current tokens keeps them all (the official ``min(count, V - 1)``
would still drop and recycle one); a budget of every token (``keep >= n`` or ``ratio=1``) prunes nothing.

Positions: the official code renumbers the sequence after every pruning layer and places the merged tokens right
after the kept image tokens: ``positions="compact"`` (1-D positions only) reproduces that exactly. The default
``positions="original"`` keeps every kept token's position id; a merged token then takes the slot and position id
of its cluster centre (a pruned token), so it sits among the kept tokens in position order (documented deviation).
Either way ``PruneStats.kept_indices`` lists the cluster centres among the kept tokens (they carry merged tokens).
Layers default to the official ones scaled to the model's depth L (``round(l * L / 32)``; unchanged on 32 layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import functional as F
from ..config import PruneConfig
from ..registry import register_method
from .base import ImageInputs, Method, Selection
from .pdrop import _check_tuple

VERSIONS = ("v1.5", "v1", "v2")
_LAYERS = {"v1.5": (2, 6, 15), "v1": (2, 6, 15, 19), "v2": (2, 6, 15)}
#: v1.5 per-budget counts for a 576-token image (score.py, sparse_token_dict)
V15_COUNTS = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
#: SparseVLM+ (v2.0 branch, score.py with V2_0) per-budget counts for a 576-token image
V2_COUNTS = {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)}
_COUNTS = {"v1.5": V15_COUNTS, "v1": V15_COUNTS, "v2": V2_COUNTS}
#: SparseVLM+'s priority heads (score.py ``select_attn_head_by_sum``: ``topk(14)``)
V2_HEADS = 14
#: first-release (scale, bias) per budget
V1_RANK = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}
_IMAGE = 576


def _number(name, v):
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise TypeError(f"{name} must be a number, got {v!r}")


@dataclass
class SparseVLMConfig(PruneConfig):
    """SparseVLM options (budget: ``keep`` / ``ratio`` and the common options of :class:`vtprune.PruneConfig`).

    * ``version`` (``"v1.5"``): ``"v1.5"`` (fixed per-budget counts), ``"v1"`` (rank-based counts), ``"v2"``
      (SparseVLM+: RoPE-gravity-corrected attention of the top heads).
    * ``layers`` (None): the pruning layers (0-based); None: the official ones scaled to the model's depth.
    * ``counts`` (None): tokens kept at each pruning layer, instead of the version's per-budget table.
    * ``scale`` / ``bias`` (None): v1's count ``int(rank * scale + bias)``, instead of its per-budget table.
    * ``recycle`` (None): recycle (cluster and merge) the best pruned tokens; None: True except for v2.
    * ``heads`` (None): v2 only: how many heads score the image tokens (official 14).
    """

    version: str = "v1.5"
    layers: tuple | None = None
    counts: tuple | None = None
    scale: float | None = None
    bias: float | None = None
    recycle: bool | None = None
    heads: int | None = None

    def __post_init__(self):
        if self.version not in VERSIONS:
            raise ValueError(
                f"version must be one of {VERSIONS} ('v1.5' the v1.5 branch, 'v1' the first release, "
                f"'v2' SparseVLM+), got {self.version!r}"
            )
        if self.heads is not None:
            if self.version != "v2":
                raise ValueError(
                    f"heads= (SparseVLM+'s priority heads) applies to version='v2', got version={self.version!r}"
                )
            if isinstance(self.heads, bool) or not isinstance(self.heads, int) or self.heads < 1:
                raise ValueError(f"heads must be an int >= 1, got {self.heads!r}")
        self.layers = _check_tuple(
            "layers",
            self.layers,
            "ints >= 0 (0-based pruning layers)",
            lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        )
        if self.layers is not None and list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be strictly ascending (0-based pruning layers), got {list(self.layers)}")
        self.counts = _check_tuple(
            "counts", self.counts, "ints >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1
        )
        _number("scale", self.scale)
        _number("bias", self.bias)
        if self.recycle is not None and not isinstance(self.recycle, bool):
            raise TypeError(
                f"recycle must be None (the version's own: True for v1 / v1.5, False for v2), True or "
                f"False, got {self.recycle!r}"
            )
        if self.version == "v1" and self.counts is not None:
            raise ValueError("counts= applies to version='v1.5'; version='v1' counts by rank (scale=, bias=)")
        if self.version != "v1" and (self.scale is not None or self.bias is not None):
            raise ValueError(f"scale= / bias= apply to version='v1' (rank-based counts); {self.version} takes counts=")
        if (self.scale is None) != (self.bias is None):
            raise ValueError(f"give scale= and bias= together, got scale={self.scale!r}, bias={self.bias!r}")
        explicit = self.counts is not None or self.scale is not None
        if explicit:
            if self.keep is not None or self.ratio is not None:
                raise ValueError(
                    "give either counts= / scale=+bias= (the per-layer rule) or a budget keep= / ratio=, "
                    f"not both (got keep={self.keep}, ratio={self.ratio})"
                )
            if self.counts is not None and self.layers is not None and len(self.counts) != len(self.layers):
                raise ValueError(
                    f"layers and counts need one entry per pruning layer, got {list(self.layers)} and "
                    f"{list(self.counts)}"
                )
            self.ratio = 1.0  # the base class wants a budget; the rule above replaces it
            super().__post_init__()
            self.ratio = None
            return
        super().__post_init__()

    def budget(self, n: int) -> int:
        """Tokens left after the last pruning layer (before recycling) of an ``n``-token image; with an explicit
        rule (``counts`` / ``scale``) its last count (v1: ``n - 1``, the rank decides)."""
        if self.keep is None and self.ratio is None:
            return min(n, self.counts[-1]) if self.counts is not None else max(1, n - 1)
        return super().budget(n)

    def row(self, n: int) -> tuple[int, float]:
        """The official budget row nearest to this budget's fraction of an ``n``-token image, and the factor that
        scales its counts: ``keep / keep_row`` (the row's counts as fractions of 576 tokens, times ``n``, times the
        ratio of the budget fractions)."""
        keep = self.keep if self.keep is not None else self.ratio * n
        row = min(_COUNTS[self.version], key=lambda b: (abs(keep / n - b / _IMAGE), -b))
        return row, keep / row


@register_method("sparsevlm", SparseVLMConfig)
class SparseVLM(Method):
    stage = "llm"
    signals = frozenset({"queries", "hidden", "prompt_embeds"})
    merges = True
    kept_count = "own"  # the per-budget counts (a nominal budget), plus the tokens carrying recycled ones

    def __init__(self, config: SparseVLMConfig):
        super().__init__(config)
        if config.version == "v2":  # SparseVLM+ divides the attention by the RoPE-only term
            self.signals = SparseVLM.signals | {"rope_gravity"}
        #: recycle pruned tokens: the config's choice, or the version's own (v1 / v1.5 yes, SparseVLM+ no)
        self.recycle = config.recycle if config.recycle is not None else config.version != "v2"

    def pruning_layers(self, num_layers: int) -> list[int]:
        layers = self.config.layers
        if layers is None:  # scaled to the depth; on shallow models the layers that collide merge into one
            layers = tuple(sorted({int(l * num_layers / 32 + 0.5) for l in _LAYERS[self.config.version]}))
            if self.config.counts is not None and len(self.config.counts) != len(layers):
                raise ValueError(
                    f"sparsevlm: counts has {len(self.config.counts)} entries but the default layers "
                    f"{list(layers)} are {len(layers)}; pass layers= too"
                )
        bad = [l for l in layers if not 0 <= l <= num_layers - 2]
        if bad:  # named as given: pruning layer l scores, the prune point is before layer l + 1
            raise ValueError(
                f"sparsevlm: pruning layer(s) {bad} of layers={list(layers)} out of range for a "
                f"{num_layers}-layer language model; allowed: 0 <= l <= {num_layers - 2} (layer l's "
                "attention scores the tokens, which are pruned before layer l + 1)"
            )
        return list(layers)  # ascending and distinct: the config checks given layers, the default ones are a sorted set

    def bind(self, adapter) -> None:
        """Refuse pruning layers without softmax attention (Qwen3.5's linear-attention layers), naming ``layers=``
        in this method's own terms (0-based pruning layers, not prune points)."""
        num_layers = len(adapter.decoder_layers)
        layers = self.pruning_layers(num_layers)
        linear = [l for l in layers if not adapter.has_attention(l)]
        if linear:
            ok = [l for l in range(num_layers - 1) if adapter.has_attention(l)]
            types = [adapter.layer_type(l) for l in linear]
            raise ValueError(
                f"sparsevlm scores tokens with the attention of each pruning layer, but layer(s) {linear} of "
                f"layers={layers} are {types} (no softmax attention; "
                f"{'the default layers scaled to this depth' if self.config.layers is None else 'as given'}): "
                f"pass layers= with full-attention layers, from {ok[:12]}{'...' if len(ok) > 12 else ''}"
            )

    def layers(self, num_layers: int) -> list[int]:
        return [l + 1 for l in self.pruning_layers(num_layers)]

    def layer(self, num_layers: int) -> int:
        return self.layers(num_layers)[0]

    def counts(self, n: int, points: int) -> list[int]:
        """v1.5 / v2 per-point counts for an image of ``n`` original visual tokens, at ``points`` prune points."""
        cfg = self.config
        if cfg.counts is not None:
            return list(cfg.counts)
        row, factor = cfg.row(n)
        table = _COUNTS[cfg.version][row]
        if points > len(table):
            raise ValueError(
                f"sparsevlm {cfg.version}: the official counts {table} are for 3 pruning layers, got "
                f"{points} layers; pass counts= with one count per layer"
            )
        return [max(1, round(c * factor)) for c in table[len(table) - points :]]  # fewer layers: the last

    def check_budget(self, num_layers: int, tokens: int | None) -> None:
        """A budget's official counts need as many rows as pruning layers (checked at ``patch``, not at the first
        forward)."""
        points = len(self.layers(num_layers))
        if self.config.version != "v1" and self.config.counts is None and not self.keeps_all(tokens or _IMAGE):
            self.counts(tokens or _IMAGE, points)

    def keeps_all(self, n_original: int) -> bool:
        """Whether the budget keeps the whole ``n_original``-token image (``ratio=1``, or ``keep >= n_original``: a
        budget of every token prunes nothing, as for every method; the scaled counts would still drop some)."""
        cfg = self.config
        if cfg.counts is not None or cfg.scale is not None:
            return False
        return cfg.ratio == 1.0 if cfg.keep is None else cfg.keep >= n_original

    def point_budget(self, n: int, n_original: int, layer: int, point) -> int:
        if self.keeps_all(n_original):
            return n
        if self.config.version == "v1":
            return n - 1 if n > 1 else n  # the count comes from the rank, in select
        count = self.counts(n_original, len(point.layers))[point.layers.index(layer)]
        return n if count >= n else count

    def rank_rule(self, n: int) -> tuple[float, float]:
        cfg = self.config
        if cfg.scale is not None:
            return cfg.scale, cfg.bias
        return V1_RANK[cfg.row(n)[0]]

    def select(self, image: ImageInputs) -> torch.Tensor | Selection:
        n = image.n
        if image.text_columns.numel() == 0:
            raise ValueError("sparsevlm needs text after the image (its raters); the prompt has none")
        with torch.no_grad():
            raters = F.sparsevlm_raters(
                image.prompt_embeds[image.image_columns], image.prompt_embeds[image.text_columns]
            )
            columns = image.text_columns[raters]
            image_slots = slice(image.image_start, image.image_start + n)
            attn = image.attention_rows(columns)[:, :, image_slots]
            if self.config.version == "v2":
                attn = F.sparsevlm_plus_attention(
                    attn, image.rope_gravity(columns)[:, image_slots], self.config.heads or V2_HEADS
                )
            k = image.k
            if self.config.version == "v1":
                k = F.sparsevlm_rank_count(attn, *self.rank_rule(image.n_original))
            hidden = image.hidden[image.image_start : image.image_start + n]
            kept, merged, centres, mix = F.sparsevlm_select(
                attn, hidden, min(k, n), recycle=self.recycle, return_weights=True
            )
        if merged.shape[0] == 0:
            return kept
        carriers = torch.cat([kept, centres]).sort().values
        own = torch.nn.functional.one_hot(kept, n).float()  # a kept token carries itself
        if self.config.positions == "compact":  # official: merged tokens right after the kept ones
            vectors, weights = torch.cat([hidden[kept], merged]), torch.cat([own, mix])
        else:  # each merged token at its centre's slot and position id
            vectors = hidden[carriers].clone()
            weights = torch.nn.functional.one_hot(carriers, n).float()
            at = torch.searchsorted(carriers, centres)
            vectors[at], weights[at] = merged, mix
        return Selection(carriers, vectors, weights=weights)
