"""What vtprune needs to know about a VLM family, in one object per ``config.model_type``.

An adapter only *locates* things (modules, token ids, default positions); the pruning mechanics live in
``vtprune.engine`` and are shared by every family.
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import torch
from torch import nn


class ModelAdapter:
    """Base adapter for stock HF ``*ForConditionalGeneration`` VLMs whose inner model is ``model.model``
    with ``language_model`` (decoder with ``layers`` and ``norm``) and ``get_image_features``."""

    model_types: ClassVar[tuple[str, ...]] = ()
    #: the vision tower prepends a CLS token whose attention row can score patches
    has_cls_token: ClassVar[bool] = False
    #: names of the inner-model methods that return per-image projected features in ``pooler_output``
    feature_methods: ClassVar[tuple[str, ...]] = ("get_image_features",)
    #: position ids are 3-D (M-RoPE) rather than 1-D
    mrope: ClassVar[bool] = False
    #: an image may be several vision-tower crops (AnyRes)
    multi_crop: ClassVar[bool] = False
    #: name of the text model's method that adds DeepStack features to the visual rows (None: no DeepStack)
    deepstack_method: ClassVar[str | None] = None
    #: ``q_proj`` outputs the query and an output gate per head (``[.., H, 2*Dh]``, query first: Qwen3.5)
    gated_query: ClassVar[bool] = False
    #: keyword of the inner model's forward whose per-token types make each contiguous run of image tokens (type 1)
    #: one bidirectional attention block of the decoder's masks (Gemma 3: ``token_type_ids``; None: none)
    token_types_key: ClassVar[str | None] = None
    #: the decoder's rotary tables differ per layer type (Gemma 3: local and global bases): :meth:`rotary` takes the
    #: layer, and a prune point hands each layer type its own tables
    rotary_per_layer_type: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.inner = model.model
        self.config = model.config

    # -- modules --------------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self.inner.language_model

    @property
    def text_config(self):
        return self.config.text_config

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.language_model.norm

    def input_norm(self, index: int) -> nn.Module:
        """The norm decoder layer ``index`` applies to its input before attention (PyramidDrop's ranking)."""
        layer = self.decoder_layers[index]
        norm = getattr(layer, "input_layernorm", None)
        if norm is None:
            raise ValueError(f"decoder layer {index} of {self.config.model_type!r} has no input_layernorm; "
                             "its attention cannot be recomputed on its input (signal 'layer_attention')")
        return norm

    def vision_attention_modules(self) -> list[nn.Module]:
        """Self-attention modules of the vision encoder layers, in order (for CLS-attention signals)."""
        raise NotImplementedError(f"{type(self).__name__} has no CLS-attention signal")

    def visual_token_ids(self) -> tuple[int, ...]:
        ids = [getattr(self.config, "image_token_id", None), getattr(self.config, "video_token_id", None)]
        return tuple(int(i) for i in ids if i is not None)

    def rope_fn(self):
        """The family's ``apply_rotary_pos_emb(q, k, cos, sin)`` as the decoder attention calls it."""
        attn = next(layer.self_attn for layer in self.decoder_layers if hasattr(layer, "self_attn"))
        return sys.modules[type(attn).__module__].apply_rotary_pos_emb

    def layer_type(self, index: int) -> str:
        types = getattr(self.text_config, "layer_types", None)
        return types[index] if types else "full_attention"

    def sliding_window(self, index: int) -> int | None:
        """The window of decoder layer ``index`` if it is a sliding-window layer (a query sees the keys of the last
        ``window`` slots, itself included), else None."""
        if self.layer_type(index) != "sliding_attention":
            return None
        return int(self.text_config.sliding_window)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor, index: int):
        """The rotary tables ``(cos, sin)`` decoder layer ``index`` uses at ``position_ids``."""
        return self.language_model.rotary_emb(hidden, position_ids)

    def block_ids(self, token_types: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` ids of the bidirectional image blocks (-1: no block) from the ``token_types_key`` values."""
        raise NotImplementedError(f"{type(self).__name__} has no bidirectional image blocks")

    def has_attention(self, index: int) -> bool:
        """Decoder layer ``index`` has softmax self-attention (``self_attn`` with q/k projections), whose q/k give
        attention-based signals; linear-attention (Gated DeltaNet) layers do not."""
        return hasattr(self.decoder_layers[index], "self_attn")

    # -- positions --------------------------------------------------------------------------------
    def default_position_ids(self, batch: int, seq: int, past: int, device) -> torch.Tensor:
        """Position ids the decoder computes when none are passed (1-D: ``arange + past``)."""
        return (torch.arange(seq, device=device) + past).unsqueeze(0).expand(batch, -1)

    # -- CLS scores per visual token ----------------------------------------------------------------
    def crop_counts(self, call: dict[str, Any], num_images: int) -> list[int]:
        """Number of vision-tower crops per image of a ``get_image_features`` call."""
        return [1] * num_images

    def pack_crop_scores(self, scores: torch.Tensor, call: dict[str, Any], index: int) -> torch.Tensor:
        """Map per-crop patch scores ``[crops, P]`` of image ``index`` of a ``get_image_features`` call (its bound
        arguments ``call``) to that image's visual tokens ``[n]``."""
        return scores.reshape(-1)

    # -- projector (zoo, visionzip) -------------------------------------------------------------------
    def projector_module(self) -> nn.Module:
        """The module that maps vision-tower features to LM tokens; its input is captured for ``projector_inputs``."""
        raise NotImplementedError(f"{type(self).__name__} does not locate its projector")

    def projector(self) -> nn.Module:
        """The projector as a per-token map ``[N, D_in] -> [N, D_lm]`` (sharing the model's weights)."""
        raise NotImplementedError(f"{type(self).__name__} does not locate its projector")

    def split_projector_inputs(self, captured: torch.Tensor, call: dict[str, Any], counts: list[int]) -> list[torch.Tensor]:
        """The projector's input of one ``get_image_features`` call -> per image ``[crops, P, D_in]``, each crop's
        rows in the order that :meth:`pack_crop_scores` expects."""
        raise NotImplementedError(f"{type(self).__name__} does not locate its projector")

    def real_patch_mask(self, image_size, n: int, threshold: float) -> torch.Tensor:
        """``[n]`` bool: which of an image's ``n`` visual tokens hold real content when the processor padded the
        image (original ``(w, h)``) to a centred square (attention debiasing)."""
        raise ValueError(
            f"{self.config.model_type!r} models do not pad images to a square (no padding mask applies); "
            "vtprune.set_image_sizes is for LLaVA-1.5-style pad-to-square preprocessing"
        )

    def unsupported_llm_stage(self) -> str | None:
        """Why llm-stage pruning is not possible on this family (None: it is)."""
        return None
