"""``cdpruner`` (Theia-4869/CDPruner, NeurIPS 2025): a conditional DPP over the projected visual tokens, greedy MAP
inference with the incremental Cholesky update (``vtprune.functional.cdpruner_select``).

Vision stage, after the projector. Kernel ``L = diag(r) S diag(r)``: ``S`` the cosine similarity of the projected
tokens, ``r`` each token's relevance to the instruction (negated mean cosine to the instruction's text embeddings,
min-max normalised: the official sign). Exactly ``k`` tokens, kept in original order with their position ids.

Where the relevance comes from (``text=``):

* ``"clip"`` (the paper's): the CLIP joint space. Image side: ``visual_projection(post_layernorm(h))`` of ``h``, the
  patch states of the vision layer the projector reads (the projector's input); text side: the CLIP text tower of
  the same checkpoint, on the instruction given with ``vtprune.set_instructions`` (tokenised with the CLIP
  tokenizer, zero-padded to a multiple of 77 tokens, one embedding per 77-token segment). ``clip_model``: a
  transformers ``CLIPModel`` or a path / hub name loaded with ``CLIPModel.from_pretrained``; ``clip_tokenizer``: a
  tokenizer (``tokenizer(text)["input_ids"]``) or a path (None: ``clip_model``'s path). LLaVA families (CLIP
  towers) only.
* ``"llm"`` (default; NOT the paper's): the LLM's own input space, for families without a CLIP text tower. Image
  side: the projected tokens themselves; text side: the LLM input embeddings of the sample's text tokens after the
  image (all of its text tokens if none follows). Needs nothing beyond the model, which is why it is the default:
  pass ``text="clip"`` for the paper's method.

AnyRes (LLaVA-NeXT): one DPP over all the image's tokens within its budget (the official code runs one per crop,
``T`` tokens each, with one min-max over the crops); with ``text="clip"`` the row-separator tokens, which have no
CLIP embedding, are not candidates.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .. import functional as F
from ..config import PruneConfig
from ..registry import register_method
from ._packing import packed_patches
from .base import ImageInputs, Method

_TEXTS = ("llm", "clip")
#: CLIP's text context length: instructions are encoded in segments of this many tokens (official)
CLIP_CONTEXT = 77


@dataclass
class CDPrunerConfig(PruneConfig):
    """CDPruner options: ``text`` (``"llm"`` default, not the paper's; ``"clip"`` the paper's), ``clip_model`` /
    ``clip_tokenizer`` (``text="clip"`` only: instances or paths), ``theta`` (None, the official default, or a
    number in [0, 1): relevance exponent ``exp(theta / (2 (1 - theta)) r)``)."""

    text: str = "llm"
    clip_model: Any = None
    clip_tokenizer: Any = None
    theta: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.text not in _TEXTS:
            raise ValueError(f"text must be one of {_TEXTS} ('clip': the paper's CLIP relevance; 'llm': the LLM's "
                             f"input embeddings, not the paper's), got {self.text!r}")
        if self.text == "clip" and self.clip_model is None:
            raise ValueError("cdpruner text='clip' needs clip_model= (a transformers CLIPModel or its path, e.g. the "
                             "checkpoint of the VLM's CLIP tower, openai/clip-vit-large-patch14-336 for LLaVA-1.5)")
        if self.text == "llm" and (self.clip_model is not None or self.clip_tokenizer is not None):
            raise ValueError("clip_model / clip_tokenizer are for text='clip'; with text='llm' they would be unused")
        if self.theta is not None:
            F.cdpruner_relevance(torch.zeros(1, 1), torch.ones(1, 1), self.theta)  # validates theta
        tok = self.clip_tokenizer
        if tok is not None and not isinstance(tok, str) and not callable(tok):
            raise TypeError(f"clip_tokenizer must be None, a path or a callable tokenizer, got {type(tok).__name__}")
        if self.clip_model is not None and not isinstance(self.clip_model, str):
            for part in ("text_model", "text_projection", "vision_model", "visual_projection"):
                if not hasattr(self.clip_model, part):
                    raise TypeError(f"clip_model must be a transformers CLIPModel (or its path); "
                                    f"{type(self.clip_model).__name__} has no {part!r}")

    def to_dict(self) -> dict[str, Any]:
        out = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("clip_model", "clip_tokenizer") and value is not None and not isinstance(value, str):
                path = getattr(value, "name_or_path", None) or getattr(getattr(value, "config", None),
                                                                       "_name_or_path", None)
                if not path:
                    raise ValueError(f"cdpruner: {f.name} is an in-memory object without a path; a config with it "
                                     "cannot be written as JSON (pass a path instead)")
                value = path
            out[f.name] = value
        return out


@register_method("cdpruner", CDPrunerConfig)
class CDPruner(Method):
    stage = "vision"

    def __init__(self, config: CDPrunerConfig):
        super().__init__(config)
        if config.text == "clip":
            self.signals = frozenset({"features", "projector_inputs", "instruction"})
        else:
            self.signals = frozenset({"features", "prompt_embeds"})
        self._clip = self._tokenizer = None
        self._text_cache: dict[str, torch.Tensor] = {}

    def clip(self):
        """``(CLIPModel, tokenizer)``, loaded on first use when given as paths."""
        if self._clip is None:
            cfg = self.config
            model, tok = cfg.clip_model, cfg.clip_tokenizer
            if isinstance(model, str):
                from transformers import CLIPModel

                model = CLIPModel.from_pretrained(model).eval()
            if tok is None:
                tok = cfg.clip_model if isinstance(cfg.clip_model, str) else getattr(model, "name_or_path", None)
                if not tok:
                    raise ValueError("cdpruner text='clip' with an in-memory clip_model needs clip_tokenizer= "
                                     "(a CLIP tokenizer or its path)")
            if isinstance(tok, str):
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(tok)
            self._clip, self._tokenizer = model, tok
        return self._clip, self._tokenizer

    def text_embeds(self, text: str) -> torch.Tensor:
        """``[M, C]`` CLIP text embeddings of ``text``: one per 77-token segment of its zero-padded token ids."""
        if text not in self._text_cache:
            model, tok = self.clip()
            ids = list(tok(text)["input_ids"])
            ids += [0] * (-len(ids) % CLIP_CONTEXT)
            device = model.text_projection.weight.device
            ids = torch.tensor(ids, dtype=torch.long, device=device).view(-1, CLIP_CONTEXT)
            with torch.no_grad():
                pooled = model.text_model(input_ids=ids).pooler_output
                self._text_cache[text] = model.text_projection(pooled).float()
        return self._text_cache[text]

    def select(self, image: ImageInputs) -> torch.Tensor:
        cfg = self.config
        if cfg.text == "llm":
            text = image.extra["prompt_embeds"]
            if text.shape[0] == 0:
                raise ValueError("cdpruner text='llm' needs text tokens in the prompt to score relevance; the "
                                 "sample has none")
            return F.cdpruner_select(image.features, image.features, text, image.k, cfg.theta)
        instruction = image.extra.get("instruction")
        if instruction is None:
            raise ValueError("cdpruner text='clip' needs each prompt's instruction: call "
                             "vtprune.set_instructions(model, [question, ...]) (one str per batch row) before the "
                             "forward / generate call")
        model, _ = self.clip()
        ids, _, _ = packed_patches(image)
        tokens = (ids >= 0).nonzero().squeeze(1)
        states = image.projector_inputs.reshape(-1, image.projector_inputs.shape[-1])[ids[tokens]]
        vision = model.vision_model
        if states.shape[-1] != vision.post_layernorm.normalized_shape[0]:
            raise ValueError(f"cdpruner text='clip': the projector's input has width {states.shape[-1]} but "
                             f"clip_model's vision tower has width {vision.post_layernorm.normalized_shape[0]}; "
                             "clip_model must be the checkpoint of the VLM's own CLIP vision tower")
        with torch.no_grad():
            weight = model.visual_projection.weight
            embeds = model.visual_projection(vision.post_layernorm(states.to(weight.device, weight.dtype))).float()
        text = self.text_embeds(instruction).to(embeds.device)
        k = min(image.k, tokens.numel())
        kept = tokens[F.cdpruner_select(image.features[tokens], embeds, text, k, cfg.theta).to(tokens.device)]
        if image.k > k:  # budget beyond the patches: add row separators, first ones first
            kept = torch.cat([kept, (ids < 0).nonzero().squeeze(1)[: image.k - k]]).sort().values
        return kept
