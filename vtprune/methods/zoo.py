"""``zoo`` — ZOO-Prune, "Training-Free Token Pruning via Zeroth-Order Gradient Estimation in VLMs" (no public
code yet; docs/methods.md).

Vision stage, using only the projector P. Each visual token's sensitivity is the mean norm of P's response to small
perturbations of its input, ``S(i) = mean_j ||(P(x_i + h u_j) - P(x_i - h u_j)) / 2h||`` over ``m`` unit Gaussian
directions (paper m=64, h=0.01; default m=32, see below); ``S`` is min-max normalised, the first pick is the most
sensitive token, then
``argmax_i S(i) * (1 - max_{j kept} cos(z_i, z_j))`` on the projected features z. Kept tokens in original order.

Our reading (docs/methods.md): one bank of directions shared by all tokens, drawn from a generator seeded by
``seed``; cosine on projected features; computed in float32 even for fp16/bf16 models (a float32 copy of the
projector), since in half precision most ``x + h u`` round back to ``x``.

Default ``num_directions=32``: the cheapest estimator whose kept sets differ from the paper's literal estimator
(m=64) by no more than that estimator differs from itself across seeds, at LLaVA-1.5-7B projector widths
(``eval/bench/zoo_estimators.py``, ``eval/results/zoo_estimators.md``); ``num_directions=64`` is the paper's.

Estimators (``estimator=``):

* ``"jvp"`` (default): the ``h -> 0`` limit of the same quantity, ``mean_j ||J_P(x_i) u_j||``, computed exactly
  with Jacobian-vector products (``vtprune.functional.zoo_sensitivity_jvp``): for LLaVA's Linear-GELU-Linear
  projector ``W1 u`` is shared by all tokens and only the second layer runs per (token, direction); no
  ``2 m`` perturbed projector passes. The central difference differs from it by ``O(h^2)``: tests check that the
  two rank tokens alike (Spearman >= 0.99) and keep the same tokens.
* ``"literal"``: the paper's central difference, ``2 m`` projector passes per token (about 3 TFLOPs at
  LLaVA-1.5-7B sizes), in chunks of ``chunk_size`` rows.

``sketch=r`` (jvp only) measures each directional derivative's norm after a seeded Gaussian projection to ``r``
dimensions (Johnson-Lindenstrauss), ``D/r`` times cheaper in the projector's last layer; an approximation, off by
default. AnyRes (LLaVA-NeXT): every crop's patches are scored and mapped through the model's own packing, the
row-separator tokens get their image's lowest sensitivity. Qwen-VL: the merger's input is a token's 2x2 patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import functional as F
from ..config import PruneConfig, check_int_option
from ..registry import register_method
from . import surrogates as S
from .base import ImageInputs, Method

_ESTIMATORS = ("jvp", "literal")


@dataclass
class ZOOConfig(PruneConfig):
    """ZOO-Prune options (budget: ``keep`` / ``ratio`` and the common options of :class:`vtprune.PruneConfig`).

    * ``num_directions`` (32): random directions ``m`` of the sensitivity estimate (the paper: 64).
    * ``h`` (0.01): the perturbation step of the literal central difference.
    * ``seed`` (0): seed of the bank of directions.
    * ``estimator`` (``"jvp"``): ``"jvp"`` (exact Jacobian-vector products, the ``h -> 0`` limit) or
      ``"literal"`` (the paper's ``2 m`` perturbed projector passes).
    * ``sketch`` (None): jvp only: measure each derivative's norm after a seeded projection to ``r`` dimensions.
    * ``chunk_size`` (16384): rows per projector pass of the literal estimator.
    """

    num_directions: int = 32
    h: float = 0.01
    seed: int = 0
    estimator: str = "jvp"
    sketch: int | None = None
    chunk_size: int = 16384

    def __post_init__(self):
        super().__post_init__()
        check_int_option("num_directions", self.num_directions, 1)
        check_int_option("chunk_size", self.chunk_size, 2)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if isinstance(self.h, bool) or not isinstance(self.h, (int, float)) or not 0 < float(self.h) < float("inf"):
            raise ValueError(f"h must be a finite number > 0 (finite-difference step), got {self.h!r}")
        self.h = float(self.h)
        if self.estimator not in _ESTIMATORS:
            raise ValueError(f"estimator must be one of {_ESTIMATORS}, got {self.estimator!r}")
        if self.sketch is not None:
            check_int_option("sketch", self.sketch, 1)
            if self.estimator != "jvp":
                raise ValueError(f"sketch={self.sketch} needs estimator='jvp' (the literal estimator has no sketch)")


@register_method("zoo", ZOOConfig)
class ZOOPrune(Method):
    stage = "vision"
    signals = frozenset({"features", "projector_inputs"})
    surrogate = S.Surrogate(
        "feature-isolation",
        "its diversity term (1 - max cos to the selected) -> cosine distance "
        "to the nearest neighbour; the sensitivity term reads the projector input, which the engine "
        "hands over without gradient, and is not attacked",
        S.feature_isolation,
    )

    def __init__(self, config: ZOOConfig):
        super().__init__(config)
        self._banks: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def random_bank(self, in_dim: int, out_dim: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The seeded unit directions ``[m, in_dim]`` (and the sketch ``[r, out_dim]``), the same for every image."""
        key = (in_dim, out_dim)
        if key not in self._banks:
            cfg = self.config
            gen = torch.Generator().manual_seed(cfg.seed)
            dirs = torch.randn(cfg.num_directions, in_dim, generator=gen)
            dirs = dirs / dirs.norm(dim=1, keepdim=True)
            sketch = None
            if cfg.sketch is not None:
                sketch = torch.randn(cfg.sketch, out_dim, generator=gen) / cfg.sketch**0.5
            self._banks[key] = (dirs, sketch)
        dirs, sketch = self._banks[key]
        return dirs.to(device), sketch.to(device) if sketch is not None else None

    def sensitivity(self, image: ImageInputs) -> torch.Tensor:
        """``[n]`` sensitivity of each of the image's visual tokens (crops packed like the model packs them)."""
        cfg, x = self.config, image.projector_inputs
        dirs, sketch = self.random_bank(x.shape[-1], image.features.shape[-1], x.device)
        per_crop = []
        for crop in x.float():
            if cfg.estimator == "jvp":
                per_crop.append(F.zoo_sensitivity_jvp(image.projector, crop, dirs, cfg.chunk_size, sketch))
            else:
                per_crop.append(F.zoo_sensitivity(image.projector, crop, dirs, cfg.h, cfg.chunk_size))
        return image.pack_crop_scores(torch.stack(per_crop))

    def select(self, image: ImageInputs) -> torch.Tensor:
        order = F.zoo_select(self.sensitivity(image), image.features, image.k)
        return order.sort().values
