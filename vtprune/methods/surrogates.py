"""Surrogates: the differentiable importance signals through which the robustness audit's attack reaches a method.

A method names its own on its class (``surrogate = Surrogate(...)``, read by the registry record), built from the
scoring functions here; a method without one is reached through the first signal it declares (:func:`from_signals`);
a method whose selection no perturbation can change says why (``unreachable``). See ``vtprune.robustness``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import functional as F
from .base import ImageInputs, crop_importance

__all__ = [
    "Surrogate",
    "cls_scores",
    "text_attention",
    "isolation",
    "feature_isolation",
    "hidden_isolation",
    "key_isolation",
    "dpp_gain",
    "from_signals",
]


@dataclass(frozen=True)
class Surrogate:
    """A differentiable importance signal of a method: ``scores(method, image) -> [n]`` (higher: more likely kept),
    computed from the :class:`~vtprune.methods.base.ImageInputs` the method itself receives. ``exact``: the method
    keeps the top-k of these scores (only the top-k itself is not differentiable)."""

    name: str
    description: str
    scores: Callable[[object, ImageInputs], torch.Tensor]
    exact: bool = False


def cls_scores(method, image: ImageInputs) -> torch.Tensor:
    return image.pack_crop_scores(crop_importance(image))  # CLS rows, or received attention (importance option)


def text_attention(method, image: ImageInputs) -> torch.Tensor:
    return image.text_attention.mean(dim=0)[image.image_start : image.image_start + image.n]


def isolation(x: torch.Tensor) -> torch.Tensor:
    """``1 - max_{j != i} cos(x_i, x_j)``: distance to the nearest neighbour (greedy k-center takes isolated
    tokens first; DivPrune's first pick is the most isolated one)."""
    u = torch.nn.functional.normalize(x.float(), dim=-1)
    sim = u @ u.T
    sim = sim - 3.0 * torch.eye(sim.shape[0], device=sim.device)
    return 1.0 - sim.max(dim=1).values


def feature_isolation(method, image: ImageInputs) -> torch.Tensor:
    return isolation(image.features)


def hidden_isolation(method, image: ImageInputs) -> torch.Tensor:
    return isolation(image.hidden[image.image_start : image.image_start + image.n])


def key_isolation(method, image: ImageInputs) -> torch.Tensor:
    return isolation(image.keys[image.image_start : image.image_start + image.n])


def dpp_gain(method, image: ImageInputs) -> torch.Tensor:
    """CDPruner's first greedy-MAP gain is ``L_ii = r_i^2`` and every later one ``r_i^2`` times the part of token i
    not explained by the picked tokens: ``r^2 * (1 - max cos to a neighbour)`` with ``r`` its relevance (``text="llm"``:
    to the prompt's LLM embeddings; ``"clip"``: read from the CLIP joint space without gradient, so 1 here)."""
    text = image.extra.get("prompt_embeds") if "prompt_embeds" in method.signals else None
    rel = (
        F.cdpruner_relevance(image.features.float(), text.float())
        if text is not None and text.shape[0]
        else image.features.new_ones(image.n, dtype=torch.float32)
    )
    return rel.pow(2) * isolation(image.features)


#: the signal-level stand-ins for methods without their own surrogate, tried in this order
BY_SIGNAL = (
    (
        "text_attention",
        Surrogate(
            "text-attention",
            "declared signal text_attention: head-mean attention of the last prompt token over the image tokens",
            text_attention,
        ),
    ),
    (
        "cls_attention",
        Surrogate(
            "cls-attention",
            "declared signal cls_attention: CLS attention summed over the method's vision layers",
            cls_scores,
        ),
    ),
    (
        "features",
        Surrogate(
            "feature-isolation", "declared signal features: cosine distance to the nearest neighbour", feature_isolation
        ),
    ),
    (
        "hidden",
        Surrogate(
            "hidden-isolation",
            "declared signal hidden: cosine distance of the hidden states to the nearest neighbour",
            hidden_isolation,
        ),
    ),
)


def from_signals(signals) -> Surrogate | None:
    """The stand-in for a method without its own surrogate: the first of :data:`BY_SIGNAL` whose signal it declares."""
    return next((surrogate for signal, surrogate in BY_SIGNAL if signal in signals), None)
