"""The ``vote`` defense: the tokens a method keeps most often over augmented copies of the image."""

from __future__ import annotations

import torch

from .perturbations import quantize, shift_image
from .runner import Runner


def vote_select(
    runner: Runner,
    x: torch.Tensor,
    text: dict,
    budget: int,
    augmentations: int,
    noise: float,
    shift: int,
    generator: torch.Generator,
) -> list[list[int]]:
    """Per row, the ``budget`` tokens the patched method keeps most often over ``x`` and ``augmentations`` copies
    of it (Gaussian noise of ``noise`` pixel units, a random shift of up to ``shift`` pixels each way); ties go to
    tokens kept on ``x`` itself, then to the lower index."""
    b = x.shape[0]
    runs = [runner.selections(x, text)]
    for _ in range(augmentations):
        dx, dy = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=generator))
        xa = quantize(shift_image(x, dx, dy) + noise * torch.randn(x.shape, generator=generator))
        runs.append(runner.selections(xa, text))
    voted = []
    for i in range(b):
        counts = torch.zeros(runner.n_tokens)
        for run in runs:
            counts[run[i]] += 1
        own = torch.zeros(runner.n_tokens)
        own[runs[0][i]] = 0.5
        key = counts + own - torch.arange(runner.n_tokens) * 1e-6
        k = min(budget, runner.n_tokens)
        voted.append(sorted(key.topk(k).indices.tolist()))
    return voted
