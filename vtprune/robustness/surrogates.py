"""Surrogates: the differentiable importance signal through which the attack reaches each method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import functional as F
from ..methods.base import ImageInputs, crop_importance
from ..registry import get_method


@dataclass(frozen=True)
class Surrogate:
    """A differentiable importance signal of a method: ``scores(method, image) -> [n]`` (higher: more likely kept),
    computed from the :class:`~vtprune.methods.base.ImageInputs` the method itself receives. ``exact``: the method
    keeps the top-k of these scores (only the top-k itself is not differentiable)."""

    name: str
    description: str
    scores: Callable[[object, ImageInputs], torch.Tensor]
    exact: bool = False


def _cls_scores(method, image: ImageInputs) -> torch.Tensor:
    return image.pack_crop_scores(crop_importance(image))  # CLS rows, or received attention (importance option)


def _text_attention(method, image: ImageInputs) -> torch.Tensor:
    return image.text_attention.mean(dim=0)[image.image_start: image.image_start + image.n]


def _isolation(x: torch.Tensor) -> torch.Tensor:
    """``1 - max_{j != i} cos(x_i, x_j)``: distance to the nearest neighbour (greedy k-center takes isolated
    tokens first; DivPrune's first pick is the most isolated one)."""
    u = torch.nn.functional.normalize(x.float(), dim=-1)
    sim = u @ u.T
    sim = sim - 3.0 * torch.eye(sim.shape[0], device=sim.device)
    return 1.0 - sim.max(dim=1).values


def _feature_isolation(method, image: ImageInputs) -> torch.Tensor:
    return _isolation(image.features)


def _hidden_isolation(method, image: ImageInputs) -> torch.Tensor:
    return _isolation(image.hidden[image.image_start: image.image_start + image.n])


def _key_isolation(method, image: ImageInputs) -> torch.Tensor:
    return _isolation(image.keys[image.image_start: image.image_start + image.n])


def _dpp_gain(method, image: ImageInputs) -> torch.Tensor:
    """CDPruner's first greedy-MAP gain is ``L_ii = r_i^2`` and every later one ``r_i^2`` times the part of token i
    not explained by the picked tokens: ``r^2 * (1 - max cos to a neighbour)`` with ``r`` its relevance (``text="llm"``:
    to the prompt's LLM embeddings; ``"clip"``: read from the CLIP joint space without gradient, so 1 here)."""
    text = image.extra.get("prompt_embeds")
    rel = (F.cdpruner_relevance(image.features.float(), text.float()) if text is not None and text.shape[0]
           else image.features.new_ones(image.n, dtype=torch.float32))
    return rel.pow(2) * _isolation(image.features)


def _dart_duplication(method, image: ImageInputs) -> torch.Tensor:
    cfg = method.config
    start, n = image.image_start, image.n
    l1 = image.keys.detach().float().abs().sum(-1)
    img_piv = l1[start:start + n].topk(min(cfg.image_pivots, n)).indices + start
    after = l1[start + n:]
    txt_piv = after.topk(min(cfg.text_pivots, after.numel())).indices + start + n
    normed = torch.nn.functional.normalize(image.final_norm(image.hidden).float(), dim=-1)
    cos = normed[start:start + n] @ normed[torch.cat([img_piv, txt_piv])].T  # [n, pivots]
    return -cos.min(dim=1).values


SURROGATES: dict[str, Surrogate] = {
    "cls": Surrogate("cls-attention", "the method's own score: CLS attention summed over its vision layers",
                     _cls_scores, exact=True),
    "fastv": Surrogate("text-attention", "the method's own score: head-mean attention of the last prompt token at "
                       "layer K-1 (debias weights, when on, are not applied)", _text_attention, exact=True),
    "visionzip": Surrogate("cls-attention", "the score of its dominant tokens (CLS attention of its layer); the "
                           "contextual merge of the rest is not attacked", _cls_scores),
    "divprune": Surrogate("feature-isolation", "greedy k-center on the projected features -> each token's cosine "
                          "distance to its nearest neighbour (the quantity k-center maximises)", _feature_isolation),
    "todre": Surrogate("feature-isolation", "greedy k-center from the top-CLS pivot -> cosine distance to the "
                       "nearest neighbour among the features (the pivot choice is not attacked)", _feature_isolation),
    "zoo": Surrogate("feature-isolation", "its diversity term (1 - max cos to the selected) -> cosine distance to "
                     "the nearest neighbour; the sensitivity term reads the projector input, which the engine hands "
                     "over without gradient, and is not attacked", _feature_isolation),
    "dart": Surrogate("pivot-duplication", "tokens least cosine-similar to a pivot are kept -> minus the lowest "
                      "cosine similarity of the (final-normed) hidden state to the key-norm pivots (pivot choice "
                      "held fixed)", _dart_duplication),
    "pdrop": Surrogate("layer-attention", "the method's own score at its first point: head-mean attention of the last "
                       "prompt token at that layer, recomputed on its input (later points are not attacked)",
                       _text_attention, exact=True),
    "cdpruner": Surrogate("dpp-gain", "greedy DPP MAP -> each token's squared relevance to the prompt times its "
                          "cosine distance to the nearest neighbour (its marginal gain against its closest "
                          "competitor)", _dpp_gain),
    "pact": Surrogate("key-isolation", "density-peak clustering of the keys keeps isolated tokens as their own "
                      "centres -> cosine distance of each key to its nearest neighbour", _key_isolation),
}

#: the signal-level stand-ins for methods without their own surrogate, tried in this order
_BY_SIGNAL = (
    ("text_attention", Surrogate("text-attention", "declared signal text_attention: head-mean attention of the "
                                 "last prompt token over the image tokens", _text_attention)),
    ("cls_attention", Surrogate("cls-attention", "declared signal cls_attention: CLS attention summed over the "
                                "method's vision layers", _cls_scores)),
    ("features", Surrogate("feature-isolation", "declared signal features: cosine distance to the nearest "
                           "neighbour", _feature_isolation)),
    ("hidden", Surrogate("hidden-isolation", "declared signal hidden: cosine distance of the hidden states to the "
                         "nearest neighbour", _hidden_isolation)),
)

_UNREACHABLE = {
    "random": "its kept set depends only on its seed and the token count, never on the image: no perturbation can "
              "change it",
}


def surrogate_for(method: str) -> tuple[Surrogate | None, str | None]:
    """``(surrogate, None)`` for a method the attack can reach, else ``(None, reason)``."""
    spec = get_method(method)
    if method in _UNREACHABLE:
        return None, _UNREACHABLE[method]
    if method in SURROGATES:
        return SURROGATES[method], None
    for signal, surrogate in _BY_SIGNAL:
        if signal in spec.method_cls.signals:
            return surrogate, None
    return None, (f"it declares no image-dependent signal a gradient can reach (signals: "
                  f"{sorted(spec.method_cls.signals) or 'none'})")
