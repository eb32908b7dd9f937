"""``random``: a uniformly random kept set from a seeded generator (the baseline every table needs).

The generator is re-seeded for every image, so an image's kept set depends only on ``seed`` and its token
count: a row in a batch keeps the same tokens as when run alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import PruneConfig
from ..registry import register_method
from .base import ImageInputs, Method


@dataclass
class RandomConfig(PruneConfig):
    """Random baseline options (budget: ``keep`` / ``ratio`` and the common options of :class:`vtprune.PruneConfig`).

    * ``seed`` (0): the generator's seed, re-seeded for every image.
    """

    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")


@register_method("random", RandomConfig)
class RandomPrune(Method):
    stage = "vision"
    kept_from_grid = True
    unreachable = (
        "its kept set depends only on its seed and the token count, never on the image: no perturbation can change it"
    )

    def select(self, image: ImageInputs) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.config.seed)
        return torch.randperm(image.n, generator=gen)[: image.k].sort().values
