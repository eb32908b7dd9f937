"""Attention debiasing (intcomp/attention-bias) for attention-scored pruners: recency profiles.

A *profile* is the positional trend of the attention that the last prompt token pays to image token ``i``; the
pruner multiplies its scores by ``w_i = trend(0) / trend(i)`` (``vtprune.functional.trend_weights``). Built-in
profiles are the official ones: ``"cubic"`` (the FastV vector) and ``"exp"`` (``exp(-beta i)``, the form shipped
for the other pruners). :func:`vtprune.calibration.calibrate` fits a profile for a given model and layer on calibration
images, and
:meth:`DebiasProfile.save` writes it to a JSON file that ``debias_weights=PATH`` loads.

The padding half of debiasing (zero score and no budget for patches that are padding of a padded-to-square image)
needs each image's original size: :func:`vtprune.set_image_sizes` passes them for the next prompt.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch

from . import functional as F

__all__ = ["DebiasProfile", "builtin_profile", "load_profile"]


@dataclass(frozen=True)
class DebiasProfile:
    """A positional attention trend: ``kind`` ``"cubic"`` (4 coefficients, ``c0 = 1``) or ``"exp"`` (``(beta,)``),
    with where it came from (``source``: ``"official"`` or what it was fitted on)."""

    kind: str
    coefficients: tuple[float, ...]
    source: str = "official"
    model_type: str | None = None
    layer: int | None = None
    images: int | None = None

    def __post_init__(self):
        F.trend_weights(1, self.kind, self.coefficients)  # validates kind and coefficient count

    def weights(self, n: int) -> torch.Tensor:
        return F.trend_weights(n, self.kind, self.coefficients)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump({"vtprune_debias_profile": 1, **self.to_dict()}, f, indent=2)
            f.write("\n")


def builtin_profile(kind: str, beta: float = 0.003) -> DebiasProfile:
    """The official trends: ``"cubic"`` (FastV) or ``"exp"`` with ``beta``."""
    if kind == "cubic":
        return DebiasProfile("cubic", F.debias.FASTV_CUBIC)
    if kind == "exp":
        return DebiasProfile("exp", (float(beta),))
    raise ValueError(f"built-in debias profiles are 'cubic' and 'exp', got {kind!r}")


def load_profile(path: str | os.PathLike) -> DebiasProfile:
    """A profile written by :meth:`DebiasProfile.save` (``vtprune calibrate``)."""
    if not os.path.isfile(path):
        raise ValueError(
            f"debias profile file {str(path)!r} does not exist: debias_weights takes 'cubic', 'exp', "
            "'none' or the path of a profile written by `vtprune calibrate`"
        )
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.pop("vtprune_debias_profile", None) != 1:
        raise ValueError(f"{str(path)!r} is not a vtprune debias profile (written by `vtprune calibrate`)")
    data["coefficients"] = tuple(data["coefficients"])
    return DebiasProfile(**data)
