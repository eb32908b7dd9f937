"""``pdrop`` — PyramidDrop (Cooperx521/PyramidDrop, CVPR 2025): visual tokens dropped in stages inside the LLM.

One method, several prune points: at each stage boundary K (``layers``, "after K decoder layers", i.e. before
decoder layer K, 0-based) the image keeps ``int(n * ratios[s])`` of its ORIGINAL ``n`` visual tokens (official
LLaVA-1.5: layers 8, 16, 24 with ratios 0.5, 0.25, 0.125: 576 -> 288 -> 144 -> 72). The ranking at a boundary:
layer K's input norm, q/k projections and RoPE applied to layer K-1's output, the last prompt token's attention
over every key (softmax, head mean), the top image tokens kept (``vtprune.functional.pdrop_select``); prefill only,
text untouched.

Budget: ``ratios=...`` gives the schedule directly (then no ``keep`` / ``ratio``); otherwise ``keep=B`` (or
``ratio=r``) is the AVERAGE number (fraction) of visual tokens per decoder layer, as papers report, and maps to the
pyramid ``ratios = (lam, lam^2, lam^3, ...)`` with ``lam`` solved (bisection) so that the layer-average is the budget
(the official 0.5 / 0.25 / 0.125 is ``lam = 0.5``). A budget below what the first stage alone costs
(``n * layers[0] / L``) cannot be met: a ``ValueError`` names that floor. ``budget_kind="last"``: the budget is
what is left after the last drop instead, ``lam = (keep / n) ** (1 / stages)`` (for sweeps that compare the tokens
a method ends with; our addition).

``layers=None`` (default): the official boundaries scaled to the model's depth L, ``(L/4, L/2, 3L/4)`` rounded
down (8, 16, 24 on 32-layer models; the official 13B script keeps 8, 16, 24: pass them); on models of fewer than
4 layers the boundaries that collide merge (a 3-layer model: 1, 2). Positions: the official
code renumbers the kept tokens after every drop; that is ``positions="compact"`` here (1-D positions only). The
default is ``positions="original"`` (kept tokens keep their position ids, as every vtprune method; it also works on
M-RoPE models): a documented deviation (docs/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import functional as F
from ..config import PruneConfig
from ..registry import register_method
from . import surrogates as S
from .base import ImageInputs, Method, check_layer


def _check_tuple(name: str, value, kind, check) -> tuple | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a sequence of {kind}, got {value!r}")
    items = tuple(value)
    if not items or not all(check(v) for v in items):
        raise ValueError(f"{name} must be a non-empty sequence of {kind}, got {value!r}")
    return items


def _is_layer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _is_ratio(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 < v <= 1.0


def check_layer_list(name: str, layers: tuple[int, ...], num_layers: int) -> list[int]:
    """Ascending, distinct prune layers, each ``1 <= K < num_layers``."""
    for k in layers:
        check_layer(name, k, num_layers)
    if list(layers) != sorted(set(layers)):
        raise ValueError(f"{name}: layers must be strictly ascending, got {list(layers)}")
    return list(layers)


BUDGETS = ("average", "last")


@dataclass
class PDropConfig(PruneConfig):
    """PyramidDrop options (budget: ``keep`` / ``ratio``, or ``ratios``; common options: :class:`vtprune.PruneConfig`).

    * ``layers`` (None): the stage boundaries K (prune before decoder layer K); None: ``(L/4, L/2, 3L/4)``.
    * ``ratios`` (None): per stage, the fraction of the image's original tokens kept (instead of a budget).
    * ``budget_kind`` (``"average"``): ``keep`` / ``ratio`` is the average per decoder layer; ``"last"``: what
      is left after the last drop.
    """

    layers: tuple | None = None
    ratios: tuple | None = None
    budget_kind: str = "average"

    def __post_init__(self):
        if self.budget_kind not in BUDGETS:
            raise ValueError(
                f"budget_kind must be one of {BUDGETS} (keep= / ratio= as the average visual tokens per "
                f"layer, or as the tokens left after the last drop), got {self.budget_kind!r}"
            )
        if self.ratios is not None and self.budget_kind != "average":
            raise ValueError("budget_kind applies to a budget (keep= / ratio=), not to an explicit ratios= schedule")
        self.layers = _check_tuple("layers", self.layers, "ints >= 1 (prune before decoder layer K)", _is_layer)
        self.ratios = _check_tuple("ratios", self.ratios, "fractions in (0, 1]", _is_ratio)
        if self.ratios is not None:
            if self.keep is not None or self.ratio is not None:
                raise ValueError(
                    f"give either ratios= (the schedule) or a budget keep= / ratio= (the average visual "
                    f"tokens per layer, mapped to a schedule), not both (got ratios={self.ratios}, "
                    f"keep={self.keep}, ratio={self.ratio})"
                )
            if list(self.ratios) != sorted(self.ratios, reverse=True):
                raise ValueError(f"ratios must not increase from one stage to the next, got {list(self.ratios)}")
            if self.layers is not None and len(self.layers) != len(self.ratios):
                raise ValueError(
                    f"layers and ratios need one entry per stage, got {len(self.layers)} layers "
                    f"{list(self.layers)} and {len(self.ratios)} ratios {list(self.ratios)}"
                )
            self.keep, self.ratio = None, 1.0  # checked by the base class; the schedule is ``ratios``
            super().__post_init__()
            self.ratio = None
            return
        super().__post_init__()

    def budget(self, n: int) -> int:
        """Average visual tokens per decoder layer of an image of ``n`` tokens (the schedule: :func:`schedule`)."""
        if self.keep is None and self.ratio is None:  # an explicit schedule
            return max(1, int(n * self.ratios[-1]))
        return super().budget(n)


def stage_ratios(n: int, average: float, layers: list[int], num_layers: int) -> list[float]:
    """The pyramid ``(lam, lam^2, ...)`` (one ratio per boundary in ``layers``) whose layer-average of visual tokens
    ``(layers[0] + sum_s (layers[s+1] - layers[s]) lam^(s+1)) / L * n`` (``layers[S] = L``) equals ``average``."""
    bounds = list(layers) + [num_layers]

    def mean(lam: float) -> float:
        return (
            n * (bounds[0] + sum((bounds[s + 1] - bounds[s]) * lam ** (s + 1) for s in range(len(layers)))) / num_layers
        )

    floor = n * bounds[0] / num_layers
    if average >= n:
        return [1.0] * len(layers)
    if average <= floor:
        raise ValueError(
            f"pdrop: an average of {average:g} visual tokens per layer cannot be met with a first drop after layer "
            f"{bounds[0]} of {num_layers}: the first {bounds[0]} layers alone average {floor:g} of the image's {n} "
            f"tokens; give an earlier first boundary (layers=...) or a budget above {floor:g}"
        )
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(mid) < average else (lo, mid)
    lam = (lo + hi) / 2
    return [lam ** (s + 1) for s in range(len(layers))]


@register_method("pdrop", PDropConfig)
class PDrop(Method):
    stage = "llm"
    signals = frozenset({"layer_attention"})
    surrogate = S.Surrogate(
        "layer-attention",
        "the method's own score at its first point: head-mean attention of the "
        "last prompt token at that layer, recomputed on its input (later points are not attacked)",
        S.text_attention,
        exact=True,
    )
    #: keep= is an average over the LM's layers, which the few layers of the bundled / benchmark LMs cannot bring that
    #: low; with budget_kind="last" keep is what its last drop leaves (the selection work is the same)
    run_options = {"budget_kind": "last"}

    def layers(self, num_layers: int) -> list[int]:
        layers = self.config.layers
        if layers is None:
            n = 3 if self.config.ratios is None else len(self.config.ratios)
            layers = tuple(sorted({max(1, (s + 1) * num_layers // (n + 1)) for s in range(n)}))
            if len(layers) < n and self.config.ratios is not None:
                raise ValueError(
                    f"pdrop: a {num_layers}-layer language model has room for only {len(layers)} of the "
                    f"{n} default stage boundaries; pass layers= with one layer per ratio"
                )
        return check_layer_list("pdrop", layers, num_layers)

    def layer(self, num_layers: int) -> int:
        return self.layers(num_layers)[0]

    def schedule(self, n: int, num_layers: int) -> dict[int, int]:
        """``{K: tokens kept from layer K on}`` for an image of ``n`` visual tokens (official ``int(n * ratio)``,
        at least 1)."""
        layers = self.layers(num_layers)
        cfg = self.config
        if cfg.ratios is not None:
            ratios = list(cfg.ratios)
        elif cfg.budget_kind == "last":  # the pyramid whose last stage keeps the budget
            lam = (min(cfg.budget(n), n) / n) ** (1.0 / len(layers))
            ratios = [lam ** (s + 1) for s in range(len(layers))]
        else:
            average = cfg.keep if cfg.keep is not None else cfg.ratio * n
            ratios = stage_ratios(n, float(average), layers, num_layers)
        counts = {k: max(1, int(n * r + 1e-9)) for k, r in zip(layers, ratios)}  # + 1e-9: a bisected 0.5 is 0.5
        if cfg.ratios is None and cfg.budget_kind == "last":
            counts[layers[-1]] = cfg.budget(n)  # exactly the budget after the last drop
        return counts

    def check_budget(self, num_layers: int, tokens: int | None) -> None:
        """An average budget below what the layers before the first drop cost: ``ratio=`` on any model, ``keep=``
        where the model's image token count is known."""
        cfg = self.config
        if cfg.ratios is not None or cfg.budget_kind == "last":
            return
        if tokens is not None:
            self.schedule(tokens, num_layers)  # raises ValueError naming the floor
        elif cfg.ratio is not None:
            first = self.layers(num_layers)[0]
            if cfg.ratio <= first / num_layers:
                raise ValueError(
                    f"pdrop: ratio={cfg.ratio:g} (the average fraction of visual tokens per layer) cannot be met with "
                    f"a first drop after layer {first} of {num_layers}: the first {first} layers alone keep "
                    f"{first / num_layers:.4g} of every image's tokens on average; give an earlier first boundary "
                    f"(layers=...) or a ratio above {first / num_layers:.4g}"
                )

    def point_budget(self, n: int, n_original: int, layer: int, point) -> int:
        return self.schedule(n_original, point.num_layers)[layer]

    def select(self, image: ImageInputs) -> torch.Tensor:
        """The ``k`` image tokens of largest head-mean attention of the last prompt token at layer K
        (:func:`vtprune.functional.pdrop_select` on the engine's ``text_attention`` row: padding, causal order and
        a sliding window already masked)."""
        return F.pdrop_select(None, None, image.image_start, image.n, image.k, attention=image.text_attention)
