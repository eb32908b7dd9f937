"""What vtprune needs to know about a VLM family, in one object per ``config.model_type``.

An adapter only *locates* things (modules, token ids, default positions); the pruning mechanics live in
``vtprune.engine`` and are shared by every family.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .. import flops


@dataclass
class VisionQK:
    """One vision-tower attention layer's queries and keys, exactly as that layer's attention uses them (after any
    q/k norm and the tower's rotary embedding), for every token of one tower call.

    * ``q`` ``[N, H, Dh]`` and ``k`` ``[N, Hkv, Dh]`` (``H`` a multiple of ``Hkv``: grouped keys serve ``H / Hkv``
      query heads each): the call's ``N`` tokens, flattened in the order the tower holds them (crops / frames /
      windows concatenated; CLS or other non-patch tokens included);
    * ``cu_seqlens`` ``[B + 1]`` int64, ascending from 0 to ``N``: tokens ``cu_seqlens[b]:cu_seqlens[b + 1]`` form
      block ``b``, a set of tokens that attend among themselves and to nothing else (a CLIP crop with its CLS token,
      a Qwen frame, a Qwen2.5-VL attention window);
    * ``scaling``: the factor the layer multiplies ``q . k`` by before the softmax (usually ``Dh ** -0.5``).

    Within a block every query sees every key (no causal mask, no padding); a tower that masks keys inside a
    block is not described by this record.
    """

    q: torch.Tensor
    k: torch.Tensor
    cu_seqlens: torch.Tensor
    scaling: float


def encoder_attention_modules(tower: nn.Module, why: str) -> list[nn.Module]:
    """Self-attention modules of a CLIP / SigLIP-style vision tower (``[vision_model.]encoder.layers[i].self_attn``),
    in order; ``ValueError`` ending with ``why`` when the tower has no such encoder."""
    encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
    if encoder is None or not hasattr(encoder, "layers"):
        raise ValueError(f"vision tower {type(tower).__name__} {why}")
    return [layer.self_attn for layer in encoder.layers]


def bound_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments a forward pre-hook (``with_kwargs=True``) saw, bound to the names of ``module.forward``."""
    return inspect.signature(module.forward).bind(*args, **kwargs).arguments


def qk_from_projections(module: nn.Module, args: tuple, kwargs: dict) -> VisionQK:
    """:meth:`ModelAdapter.vision_qk` of a CLIP / SigLIP-style attention module: ``q_proj`` / ``k_proj`` linear maps
    on ``hidden_states [C, T, D]`` (one row per crop, every token of a crop attending to every other), attributes
    ``num_heads``, ``head_dim`` and ``scale``, no rotary embedding; ``q_norm`` / ``k_norm`` when the module has them
    (InternViT), over the whole projection or per head as their weight's size says. Raises ``ValueError`` if the call
    carries an attention mask (padded crops are not described by :class:`VisionQK`)."""
    bound = bound_arguments(module, args, kwargs)
    mask = bound.get("attention_mask")
    if mask is not None:
        raise ValueError(
            f"{type(module).__name__} was called with an attention mask; received attention reads "
            "towers whose crops attend without masks"
        )
    hidden = bound["hidden_states"]
    c, t, _ = hidden.shape
    dh = module.head_dim

    def heads(x, norm):  # [C, T, H * Dh] -> [C * T, H, Dh], normed as the module norms it
        if norm is None:
            return x.reshape(c * t, -1, dh)
        weight = getattr(norm, "weight", None)
        if weight is not None and weight.numel() == dh:
            return norm(x.reshape(c * t, -1, dh))
        return norm(x).reshape(c * t, -1, dh)

    q = heads(module.q_proj(hidden), getattr(module, "q_norm", None))
    k = heads(module.k_proj(hidden), getattr(module, "k_norm", None))
    cu = torch.arange(c + 1, device=hidden.device, dtype=torch.long) * t
    return VisionQK(q, k, cu, float(module.scale))


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
    #: the feature method returns one feature tensor per tile, not per image; an image is the contiguous placeholder
    #: run of its consecutive tiles, which the engine joins into one unit (InternVL)
    tiled: ClassVar[bool] = False
    #: why the family's videos are not video units (``VisionInputs.frames``), so that video methods and
    #: ``frame_budget`` are refused at ``patch`` (None: a video is one unit whose frames the engine knows)
    no_video_units: ClassVar[str | None] = None
    #: structure tokens that end a video's placeholder run after its frames (LLaVA-OneVision: one newline). The
    #: engine leaves them out of the video unit: methods see and budgets count the frames' tokens only, and the
    #: structure tokens are always kept (``vtprune.engine.units.mark_videos``)
    video_structure_tokens: ClassVar[int] = 0
    #: keyword of the inner model's forward whose per-token types make each contiguous run of image tokens (type 1)
    #: one bidirectional attention block of the decoder's masks (Gemma 3: ``token_type_ids``; None: none)
    token_types_key: ClassVar[str | None] = None
    #: the decoder's rotary tables differ per layer type (Gemma 3: local and global bases): :meth:`rotary` takes the
    #: layer, and a prune point hands each layer type its own tables
    rotary_per_layer_type: ClassVar[bool] = False
    #: token merging inside the vision tower (``tome`` / ``pitome`` / ``zerotprune`` on a VLM,
    #: ``vtprune.methods.tower``)
    #: is supported: a CLIP / SigLIP tower read at one ``vision_feature_layer`` and a per-token projector
    tower_merging: ClassVar[bool] = False
    #: a video's frames are separate blocks of the vision tower's last layer, whose received attention
    #: (``importance="received"``) maps to each frame's tokens one patch set per token: the per-frame attention the
    #: video methods ``fastvid`` / ``flashvid`` read (Qwen2-VL / Qwen2.5-VL temporal patches, LLaVA-NeXT-Video's
    #: per-frame crops pooled as the model pools them); :meth:`check_frame_attention` refuses a model whose settings
    #: break that map
    frame_attention: ClassVar[bool] = False

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
    def cls_is_visual_token(self) -> bool:
        """Whether the vision tower's CLS token reaches the LLM as one of an image's (or crop's) visual tokens, so a
        crop's tokens are its patch grid plus one (LLaVA's ``vision_feature_select_strategy="full"``). Default: no."""
        return False

    @property
    def clip_vision_tower(self) -> bool:
        """Whether the vision tower is a CLIP vision transformer (``vision_config.model_type`` ``"clip_vision_model"``),
        i.e. its states live in a CLIP checkpoint's joint image-text space (CDPruner's ``text="clip"``)."""
        vision = getattr(self.config, "vision_config", None)
        return getattr(vision, "model_type", None) in ("clip_vision_model", "clip")

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    def image_tokens(self) -> int | None:
        """Visual tokens of every image when the config fixes the count (LLaVA-1.5, Gemma 3), else None (it depends
        on the image: AnyRes crops, native resolution, tiles, video frames). ``patch`` checks budgets against it
        (:meth:`vtprune.methods.base.Method.check_budget`)."""
        return None

    @property
    def final_norm(self) -> nn.Module:
        return self.language_model.norm

    def input_norm(self, index: int) -> nn.Module:
        """The norm decoder layer ``index`` applies to its input before attention (PyramidDrop's ranking)."""
        layer = self.decoder_layers[index]
        norm = getattr(layer, "input_layernorm", None)
        if norm is None:
            raise ValueError(
                f"decoder layer {index} of {self.config.model_type!r} has no input_layernorm; "
                "its attention cannot be recomputed on its input (signal 'layer_attention')"
            )
        return norm

    def vision_attention_modules(self) -> list[nn.Module]:
        """Self-attention modules of the vision encoder layers, in order, one per layer (layer ``i`` of a method's
        ``vision_layers`` is entry ``i``). Used by the CLS signal (hooks on their ``q_proj`` / ``k_proj``) and by
        ``importance="received"`` (a forward pre-hook with kwargs on the module itself, see :meth:`vision_qk`)."""
        raise NotImplementedError(f"{type(self).__name__} has no vision-attention signal")

    def vision_qk_modules(self, attn: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The submodules of vision attention ``attn`` (an entry of :meth:`vision_attention_modules`) whose outputs are
        the queries and keys its attention uses, ``[crops, tokens, H * Dh]`` (the CLS signal hooks them).
        Default: ``q_proj`` / ``k_proj`` (CLIP)."""
        return attn.q_proj, attn.k_proj

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

    # -- the model's call: its model-specific input keywords ----------------------------------------
    def check_model_inputs(self, kwargs: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the keyword when a call of the top-level model (``kwargs``) lacks an input
        pruning needs (Qwen-VL: ``mm_token_type_ids``). Default: nothing needed."""

    def token_types(self, kwargs: dict[str, Any], input_ids: torch.Tensor) -> torch.Tensor | None:
        """``[B, S]`` int64 per-token types of a prompt (the ``token_types_key`` keyword of the inner model's call,
        checked against ``input_ids``), or None where the family has none or none was passed."""
        if self.token_types_key is None or (types := kwargs.get(self.token_types_key)) is None:
            return None
        if tuple(types.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"{self.token_types_key} has shape {tuple(types.shape)}; expected the shape of "
                f"input_ids {tuple(input_ids.shape)} (one type per prompt token)"
            )
        return types.to(input_ids.device).long()

    def patch_grids(self, call: dict[str, Any]) -> torch.Tensor | None:
        """``[n, 3]`` (t, h, w) patch grid of each image / video of a feature call (Qwen-VL), or None."""
        return None

    def video_frames(self, info, n: int) -> int | None:
        """A video's frame count as the LLM sees it, from its vision-side record ``info`` (:class:`ImageInfo`) and its
        ``n`` visual tokens: the temporal patches of its M-RoPE grid (Qwen-VL: one per two frames), else its tower
        crops (one per sampled frame). None where the video's tokens are not ``T`` equal frames in order."""
        frames = int(info.grid.reshape(-1)[0]) if info.grid is not None else int(info.crops)
        return frames if frames > 0 and n % frames == 0 else None

    def vision_flops(self, crops: int, frames: int, grids: list[torch.Tensor | None]) -> int:
        """FLOPs of the vision tower + projector of a prefill whose images ran ``crops`` tower crops and whose
        videos ``frames`` frames (``grids``: each unit's ``[1, 3]`` patch grid, families with :meth:`patch_grids`)."""
        return flops.vision_flops(self.config, num_images=crops, **({"num_frames": frames} if frames else {}))

    # -- positions --------------------------------------------------------------------------------
    def default_position_ids(self, batch: int, seq: int, past: int, device) -> torch.Tensor:
        """Position ids the decoder computes when none are passed (1-D: ``arange + past``)."""
        return (torch.arange(seq, device=device) + past).unsqueeze(0).expand(batch, -1)

    def vision_merge_unit(self) -> int:
        """How many consecutive tokens of the vision tower's order (:class:`VisionQK`) the projector merges into one
        visual token before anything else pools them (Qwen-VL: the ``spatial_merge_size ** 2`` patches of a merge
        unit; 1: every patch is its own, e.g. a CLIP tower whose patches the model pools later). Default: 1."""
        return 1

    def check_frame_attention(self) -> None:
        """``ValueError`` when this model's videos give no per-frame attention a video method can read (see
        :attr:`frame_attention`); a family with ``frame_attention`` refuses here the settings that break the map."""

    # -- CLS scores per visual token ----------------------------------------------------------------
    def crop_counts(self, call: dict[str, Any], num_images: int) -> list[int]:
        """Number of vision-tower crops per image of a ``get_image_features`` call."""
        return [1] * num_images

    def pack_crop_scores(self, scores: torch.Tensor, call: dict[str, Any], index: int) -> torch.Tensor:
        """Map per-crop patch scores ``[crops, P]`` of image ``index`` of a ``get_image_features`` call (its bound
        arguments ``call``) to that image's visual tokens ``[n]``, in the order the model places them in the
        prompt. THE one mapping of patch scores to LLM tokens (CLS rows and received attention alike): pool the
        patches a token is made of as the model pools them (Qwen: the mean of each 2x2 merge unit), reorder /
        unpad as the model does (LLaVA-NeXT's AnyRes packing), give tokens that carry no patch (newline
        separators) the image's lowest score. Preserve the dtype (float64 in, float64 out). A family whose
        projector reads merged tokens (:meth:`split_projector_inputs` gives one row per visual token, e.g. Qwen)
        also accepts scores per projector row (``[1, n]``, returned as they are).

        Default: one crop, one token per patch, in order."""
        return scores.reshape(-1)

    # -- attention each patch receives (importance="received") ----------------------------------------------
    #
    # A family that implements the three methods below (with vision_attention_modules) gets every CLS-scored method
    # (cls, visionzip, todre, vispruner) with importance="received" on its tower: the engine registers
    #   module.register_forward_pre_hook(hook, with_kwargs=True)
    # on vision_attention_modules()[i] for each layer i the method reads, calls vision_qk(module, args, kwargs) in
    # the hook, reduces the VisionQK to per-token received attention [N] (vtprune.functional.received_attention:
    # mean over heads and over the queries of the token's block), maps it to per-image patch scores with
    # split_vision_tokens, and to the image's visual tokens with pack_crop_scores (the same mapping as CLS scores).
    # Nothing is recomputed in eager mode: the tower keeps its attention kernel.

    def vision_qk(self, module: nn.Module, args: tuple, kwargs: dict) -> VisionQK:
        """The queries and keys one vision attention layer uses, from what a forward pre-hook (``with_kwargs=True``)
        on ``module`` (an entry of :meth:`vision_attention_modules`) received: its positional ``args`` and keyword
        ``kwargs`` (hidden states, and whatever the tower passes: ``cu_seqlens``, ``position_embeddings``, an
        attention mask...). Apply the module's own projections (``q_proj``/``k_proj`` or a fused ``qkv``), q/k norms
        and rotary embedding exactly as its forward does, without running the attention itself. Must not modify
        the arguments. Returns a :class:`VisionQK` covering every token of the call.

        Raises ``ValueError`` naming the family when it has no implementation (the default)."""
        raise ValueError(
            f"importance='received' needs the attention of {self.config.model_type!r}'s vision tower, which vtprune "
            f"does not read yet ({type(self).__name__}.vision_qk is not implemented)"
        )

    def split_vision_tokens(self, values: torch.Tensor, call: dict[str, Any], counts: list[int]) -> list[torch.Tensor]:
        """Per-token values of one vision layer ``[N, *]`` (``N`` = every token of a feature call, in the tower's
        order, as in :class:`VisionQK`) -> per image ``[crops, P, *]``: the values of the image's ``crops =
        counts[i]`` crops and each crop's ``P`` patches, in the order :meth:`pack_crop_scores` expects. Drops tokens
        that are not patches (CLS, registers) and undoes any reordering the tower applies (Qwen2.5-VL's window
        order). ``call``: the bound arguments of the feature method; ``counts``: :meth:`crop_counts`.

        Default: the crops are concatenated in call order, all of the same length, each led by one CLS token
        when ``has_cls_token`` (none otherwise)."""
        crops = sum(counts)
        if crops == 0 or values.shape[0] % crops:
            raise ValueError(
                f"{values.shape[0]} vision tokens cannot be split into {crops} equal crops "
                f"({type(self).__name__}.split_vision_tokens)"
            )
        per_crop = values.reshape(crops, values.shape[0] // crops, *values.shape[1:])
        if self.has_cls_token:
            per_crop = per_crop[:, 1:]
        return list(torch.split(per_crop, counts))

    def token_patches(self, call: dict[str, Any], index: int, crops: int, patches: int) -> torch.Tensor:
        """``[n, m]`` int64: for each of image ``index``'s ``n`` visual tokens, the flat ids ``c * P + p`` of the
        ``m`` crop patches it carries (crop ``c`` of ``crops``, patch ``p`` of ``P = patches``, in the order of
        :meth:`split_vision_tokens`), in the order the model concatenates them (Qwen's merger: the 2x2 unit), or
        -1 where a token carries no patch (LLaVA-NeXT's row separators). Used by methods that need per-token
        vectors of the vision layer (``visionzip``'s keys).

        Default: one patch per token, read off :meth:`pack_crop_scores` (it must map each token to one patch
        exactly, as a plain reorder + newline insertion does); towers that pool several patches per token
        override it."""
        flat = torch.arange(crops * patches, dtype=torch.float64).view(crops, patches)
        packed = self.pack_crop_scores(flat, call, index)
        if packed.dtype != torch.float64 or not bool((packed == packed.round()).all()):
            raise ValueError(
                f"{self.config.model_type!r}: pack_crop_scores pools several patches per visual token; "
                f"{type(self).__name__}.token_patches must say which"
            )
        packed = packed.long()
        order = torch.arange(packed.numel())
        first = torch.full((crops * patches,), packed.numel(), dtype=torch.long).scatter_reduce_(
            0, packed, order, "amin"
        )
        return torch.where(first[packed] == order, packed, -1).unsqueeze(1)

    def check_cls_strategy(self, importance: str = "cls") -> None:
        """Raise ``ValueError`` if the model's configuration makes ``importance`` (``"cls"`` or ``"received"``)
        scores unmappable to its visual tokens (e.g. LLaVA feeding the CLS token to the LLM). Default: nothing."""

    # -- projector (zoo, visionzip) -------------------------------------------------------------------
    def projector_module(self) -> nn.Module:
        """The module that maps vision-tower features to LM tokens; its input is captured for ``projector_inputs``."""
        raise NotImplementedError(f"{type(self).__name__} does not locate its projector")

    def projector(self) -> nn.Module:
        """The projector as a per-token map ``[N, D_in] -> [N, D_lm]`` (sharing the model's weights)."""
        raise NotImplementedError(f"{type(self).__name__} does not locate its projector")

    def split_projector_inputs(
        self, captured: torch.Tensor, call: dict[str, Any], counts: list[int]
    ) -> list[torch.Tensor]:
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

    # -- the downsampling baseline (sweeps' ``downsample`` row) ----------------------------------------------------
    #
    # The unpatched model run on a smaller input: images (or the processor's tiling) shrunk so that the model itself
    # produces about the budget's number of visual tokens per image. A family serves it by overriding both methods.

    def check_downsample(self, budget: int, processor: Any = None) -> None:
        """Raise ``ValueError`` unless a smaller input gives this family about ``budget`` visual tokens per image.
        Without ``processor``: what the config decides (the family, a per-tile floor); with it: what the processor
        decides too (e.g. Qwen-VL's ``min_pixels``). Called by the sweep's pre-check before any weight loads.

        Default: refused. A fixed-resolution family (:meth:`image_tokens` not None: LLaVA-1.5, Gemma 3) resizes
        every image to its one input size, so a lower-resolution image is upsampled back and gives the same token
        count: no token is saved, and the row would only measure blur. Its token-level analogue is the ``pool``
        method (average pooling of the token grid)."""
        fixed = self.image_tokens()
        kind = self.config.model_type
        if fixed is not None:
            raise ValueError(
                f"downsample: {kind!r} sees every image at one fixed resolution ({fixed} visual tokens per image); a "
                "lower-resolution image is resized back up by the processor and still gives "
                f"{fixed} tokens, so downsampling reduces no token there (budget {budget}). The token-grid baseline "
                "for fixed-resolution models is the 'pool' method"
            )
        raise ValueError(
            f"downsample: not available for {kind!r} ({type(self).__name__} does not say how to shrink its input); "
            "served by the dynamic-resolution families qwen2_vl, qwen2_5_vl, qwen3_vl(_moe), qwen3_5(_moe) and "
            "internvl"
        )

    def downsample_inputs(self, processor: Any, images: list, budget: int) -> tuple[list, Any]:
        """``(images, processor)`` that render a request for the unpatched model at about ``budget`` visual tokens per
        image (at most ``budget``; an image that already gives no more is left as it is: nothing is upsampled):
        resized images and / or a copy of ``processor`` with fewer tiles. ``processor`` is not modified.
        Raises what :meth:`check_downsample` raises."""
        self.check_downsample(budget, processor)
        raise NotImplementedError(f"{type(self).__name__}.downsample_inputs")  # pragma: no cover
