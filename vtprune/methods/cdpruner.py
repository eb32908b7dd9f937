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
  transformers ``CLIPModel``, a path / hub name loaded with ``CLIPModel.from_pretrained``, or an open_clip ``CLIP``
  (e.g. ``open_clip.create_model("ViT-L-14-336", pretrained="openai")``); ``clip_tokenizer``: a tokenizer
  (``tokenizer(text)["input_ids"]``, or open_clip's ``SimpleTokenizer``) or a path (None: ``clip_model``'s path). LLaVA
  families (CLIP
  towers) only.
* ``"llm"`` (NOT the paper's): the LLM's own input space, for families without a CLIP text tower. Image side: the
  projected tokens themselves; text side: the LLM input embeddings of the sample's text tokens after the image (all
  of its text tokens if none follows). Needs nothing beyond the model.
* ``None`` (default): resolved when the method meets the model (``vtprune.patch``): ``"clip"`` on a CLIP vision
  tower (LLaVA-1.5, LLaVA-NeXT, LLaVA-NeXT-Video), where it needs ``clip_model=`` (without it ``patch`` raises
  ``ValueError`` naming ``clip_model=`` and ``text="llm"``: the VLM checkpoint has no CLIP text tower, and vtprune
  does not swap the paper's method for a variant unasked); ``"llm"`` on every other tower, for which the paper has
  no method. Giving ``clip_model=`` alone means ``"clip"``.

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
from . import surrogates as S
from ._packing import packed_patches
from .base import ImageInputs, Method

_TEXTS = ("llm", "clip")
#: CLIP's text context length: instructions are encoded in segments of this many tokens (official)
CLIP_CONTEXT = 77


class ClipSpace:
    """CLIP's joint embedding space from a transformers ``CLIPModel`` or an open_clip ``CLIP`` (``open_clip_torch``).

    ``image(h)``: ``[N, W]`` vision-tower patch states -> ``[N, C]`` joint-space embeddings (transformers:
    ``visual_projection(post_layernorm(h))``; open_clip: ``ln_post(h) @ proj``, the same map). ``text(ids)``:
    ``[M, 77]`` token ids -> ``[M, C]`` (transformers: ``text_projection`` of the pooled output at the EOS token;
    open_clip: ``encode_text``, pooled at the EOT token). Raises ``TypeError`` for any other object."""

    def __init__(self, model: Any):
        if all(hasattr(model, p) for p in ("text_model", "text_projection", "vision_model", "visual_projection")):
            self.kind = "transformers"
            self.width = int(model.vision_model.post_layernorm.normalized_shape[0])
            self.device = model.visual_projection.weight.device
        elif hasattr(model, "encode_text") and all(
            hasattr(getattr(model, "visual", None), p) for p in ("ln_post", "proj")
        ):
            if model.visual.proj is None:
                raise TypeError(
                    "clip_model is an open_clip CLIP whose vision tower has no output projection "
                    "(visual.proj is None); CDPruner needs the joint-space projection"
                )
            self.kind = "open_clip"
            self.width = int(model.visual.ln_post.normalized_shape[0])
            self.device = model.visual.proj.device
        else:
            raise TypeError(
                f"clip_model must be a transformers CLIPModel (or its path) or an open_clip CLIP "
                f"(encode_text, visual.ln_post, visual.proj); got {type(model).__name__}"
            )
        self.model = model

    def image(self, states: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.kind == "transformers":
            w = m.visual_projection.weight
            return m.visual_projection(m.vision_model.post_layernorm(states.to(w.device, w.dtype)))
        proj = m.visual.proj
        return m.visual.ln_post(states.to(proj.device, proj.dtype)) @ proj

    def text(self, ids: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.kind == "transformers":
            return m.text_projection(m.text_model(input_ids=ids).pooler_output)
        return m.encode_text(ids)


def clip_token_ids(tokenizer: Any, text: str) -> list[int]:
    """The CLIP token ids of ``text`` with start and end tokens, untruncated: a transformers tokenizer
    (``tokenizer(text)["input_ids"]``) or open_clip's ``SimpleTokenizer`` (``encode`` plus ``sot_token_id`` /
    ``eot_token_id``; its ``__call__`` would truncate to 77 tokens)."""
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id") and hasattr(tokenizer, "eot_token_id"):
        return [int(tokenizer.sot_token_id), *map(int, tokenizer.encode(text)), int(tokenizer.eot_token_id)]
    out = tokenizer(text)
    if not hasattr(out, "__getitem__") or "input_ids" not in out:
        raise TypeError(
            f"clip_tokenizer must return a mapping with 'input_ids' (a transformers tokenizer) or be "
            f"open_clip's SimpleTokenizer; {type(tokenizer).__name__} returned {type(out).__name__}"
        )
    return [int(i) for i in out["input_ids"]]


@dataclass
class CDPrunerConfig(PruneConfig):
    """CDPruner options: ``text`` (``"clip"`` the paper's; ``"llm"`` vtprune's variant for towers without a CLIP
    text tower; None (default): ``"clip"`` on CLIP towers, ``"llm"`` elsewhere, see the module docstring),
    ``clip_model`` / ``clip_tokenizer`` (``text="clip"`` only: instances or paths), ``theta`` (None, the official
    default, or a number in [0, 1): relevance exponent ``exp(theta / (2 (1 - theta)) r)``)."""

    text: str | None = None
    clip_model: Any = None
    clip_tokenizer: Any = None
    theta: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.text is not None and self.text not in _TEXTS:
            raise ValueError(
                f"text must be None or one of {_TEXTS} ('clip': the paper's CLIP relevance; 'llm': the "
                f"LLM's input embeddings, not the paper's; None: 'clip' on CLIP towers, 'llm' "
                f"elsewhere), got {self.text!r}"
            )
        if self.text is None and self.clip_model is not None:
            self.text = "clip"
        if self.text is None and self.clip_tokenizer is not None:  # "llm" on a non-CLIP tower would drop it unused
            raise ValueError(
                "cdpruner clip_tokenizer= is the tokenizer of clip_model= (text='clip'); give clip_model= "
                "too, or leave clip_tokenizer out"
            )
        if self.text == "clip" and self.clip_model is None:
            raise ValueError(
                "cdpruner text='clip' needs clip_model= (a transformers CLIPModel or its path, e.g. the "
                "checkpoint of the VLM's CLIP tower, openai/clip-vit-large-patch14-336 for LLaVA-1.5)"
            )
        if self.text == "llm" and (self.clip_model is not None or self.clip_tokenizer is not None):
            raise ValueError("clip_model / clip_tokenizer are for text='clip'; with text='llm' they would be unused")
        if self.theta is not None:
            F.cdpruner_relevance(torch.zeros(1, 1), torch.ones(1, 1), self.theta)  # validates theta
        tok = self.clip_tokenizer
        if tok is not None and not isinstance(tok, str) and not callable(tok):
            raise TypeError(f"clip_tokenizer must be None, a path or a callable tokenizer, got {type(tok).__name__}")
        if self.clip_model is not None and not isinstance(self.clip_model, str):
            ClipSpace(self.clip_model)  # validates: a transformers CLIPModel or an open_clip CLIP

    def to_dict(self) -> dict[str, Any]:
        out = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("clip_model", "clip_tokenizer") and value is not None and not isinstance(value, str):
                path = getattr(value, "name_or_path", None) or getattr(
                    getattr(value, "config", None), "_name_or_path", None
                )
                if not path:
                    raise ValueError(
                        f"cdpruner: {f.name} is an in-memory object without a path; a config with it "
                        "cannot be written as JSON (pass a path instead)"
                    )
                value = path
            out[f.name] = value
        return out


@register_method("cdpruner", CDPrunerConfig)
class CDPruner(Method):
    stage = "vision"
    #: what it may read (registry record); an instance reads those of its ``text`` (``_set_signals``)
    signals = frozenset({"features", "projector_inputs", "instruction", "prompt_embeds"})
    surrogate = S.Surrogate(
        "dpp-gain",
        "greedy DPP MAP -> each token's squared relevance to the prompt times its "
        "cosine distance to the nearest neighbour (its marginal gain against its closest "
        "competitor)",
        S.dpp_gain,
    )
    #: its default on a CLIP tower is the paper's text="clip", which needs a CLIP text tower the bundled / random
    #: models lack: they run text="llm" (the same greedy DPP over the same tokens; only the relevance differs)
    run_options = {"text": "llm"}

    def __init__(self, config: CDPrunerConfig):
        super().__init__(config)
        #: the relevance source in use: ``config.text``, or (None) as resolved by :meth:`bind`; until then the
        #: signals are those of ``"llm"``, which needs nothing beyond the model
        self.text = config.text or "llm"
        self._set_signals()
        self._clip = self._tokenizer = None
        self._text_cache: dict[str, torch.Tensor] = {}

    def _set_signals(self) -> None:
        if self.text == "clip":
            self.signals = frozenset({"features", "projector_inputs", "instruction"})
        else:
            self.signals = frozenset({"features", "prompt_embeds"})

    def bind(self, adapter) -> None:
        """Resolve ``text`` on this model: an explicit value is checked (``"clip"`` needs a CLIP vision tower); None
        becomes ``"clip"`` on a CLIP tower, which then needs ``clip_model=``, and ``"llm"`` elsewhere."""
        model_type = adapter.config.model_type
        text = self.config.text
        if text == "clip" and not adapter.clip_vision_tower:
            raise ValueError(
                f"cdpruner text='clip' scores patches in a CLIP checkpoint's joint space, but {model_type!r}'s vision "
                f"tower is {getattr(adapter.config.vision_config, 'model_type', None)!r}, not CLIP; use text='llm' "
                "(the LLM's input embeddings; not the paper's, which has no method for this tower)"
            )
        if text is None and adapter.clip_vision_tower:
            raise ValueError(
                f"cdpruner on {model_type!r} (a CLIP vision tower) defaults to the paper's text='clip', which needs "
                "the CLIP text tower the VLM checkpoint lacks: pass clip_model= (a transformers CLIPModel or its path, "
                "e.g. openai/clip-vit-large-patch14-336 for LLaVA-1.5; or an open_clip CLIP), or text='llm' for "
                "vtprune's variant scored with the LLM's own input embeddings (not the paper's)"
            )
        self.text = text or "llm"
        self._set_signals()

    def clip(self) -> tuple[ClipSpace, Any]:
        """``(ClipSpace, tokenizer)``, loaded on first use when given as paths."""
        if self._clip is None:
            cfg = self.config
            model, tok = cfg.clip_model, cfg.clip_tokenizer
            if isinstance(model, str):
                from transformers import CLIPModel

                model = CLIPModel.from_pretrained(model).eval()
            if tok is None:
                tok = cfg.clip_model if isinstance(cfg.clip_model, str) else getattr(model, "name_or_path", None)
                if not tok:
                    raise ValueError(
                        "cdpruner text='clip' with an in-memory clip_model needs clip_tokenizer= "
                        "(a CLIP tokenizer or its path; for open_clip: open_clip.get_tokenizer(name))"
                    )
            if isinstance(tok, str):
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(tok)
            self._clip, self._tokenizer = ClipSpace(model), tok
        return self._clip, self._tokenizer

    def text_embeds(self, text: str) -> torch.Tensor:
        """``[M, C]`` CLIP text embeddings of ``text``: one per 77-token segment of its zero-padded token ids."""
        if text not in self._text_cache:
            space, tok = self.clip()
            ids = clip_token_ids(tok, text)
            ids += [0] * (-len(ids) % CLIP_CONTEXT)
            ids = torch.tensor(ids, dtype=torch.long, device=space.device).view(-1, CLIP_CONTEXT)
            with torch.no_grad():
                self._text_cache[text] = space.text(ids).float()
        return self._text_cache[text]

    def select(self, image: ImageInputs) -> torch.Tensor:
        cfg = self.config
        if self.text == "llm":
            text = image.extra["prompt_embeds"]
            if text.shape[0] == 0:
                raise ValueError(
                    "cdpruner text='llm' needs text tokens in the prompt to score relevance; the sample has none"
                )
            return F.cdpruner_select(image.features, image.features, text, image.k, cfg.theta)
        instruction = image.extra.get("instruction")
        if instruction is None:
            raise ValueError(
                "cdpruner text='clip' needs each prompt's instruction: call "
                "vtprune.set_instructions(model, [question, ...]) (one str per batch row) before the "
                "forward / generate call"
            )
        space, _ = self.clip()
        ids, _, _ = packed_patches(image)
        tokens = (ids >= 0).nonzero().squeeze(1)
        states = image.projector_inputs.reshape(-1, image.projector_inputs.shape[-1])[ids[tokens]]
        if states.shape[-1] != space.width:
            raise ValueError(
                f"cdpruner text='clip': the projector's input has width {states.shape[-1]} but "
                f"clip_model's vision tower has width {space.width}; "
                "clip_model must be the checkpoint of the VLM's own CLIP vision tower"
            )
        with torch.no_grad():
            embeds = space.image(states).float()
        text = self.text_embeds(instruction).to(embeds.device)
        k = min(image.k, tokens.numel())
        kept = tokens[F.cdpruner_select(image.features[tokens], embeds, text, k, cfg.theta).to(tokens.device)]
        if image.k > k:  # budget beyond the patches: add row separators, first ones first
            kept = torch.cat([kept, (ids < 0).nonzero().squeeze(1)[: image.k - k]]).sort().values
        return kept
