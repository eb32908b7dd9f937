"""The pruning engine: the hooks one ``patch`` installs on one model instance, and what they do.

Flow of one forward of a patched VLM (``model.model`` is the inner VLM, ``LM`` its language model):

1. pre-hook on the inner VLM: note ``input_ids`` and whether this is a new prompt with images (prefill) or a
   decode step continuing a pruned prompt;
2. wrapped ``get_image_features`` / ``get_video_features``: keep each image's projected features (and, while
   they run, the CLS rows of the requested vision layers, from hooks on ``q_proj`` / ``k_proj``);
3. pre-hook on the LM — *vision stage*: select per image, drop the other visual tokens from ``inputs_embeds``,
   the 2-D mask and the position ids (rows re-left-padded to a common length; kept tokens keep their original
   position ids); decode steps get the mask compressed to the pruned cache;
4. *llm stage*: a pre-hook on layer K-1's attention recomputes the needed rows from its q/k; a pre-hook on layer
   K selects and shortens the hidden states; layers >= K get a mask, rotary tables and (no) position ids for the
   shorter sequence, in prefill and in every decode step (their KV cache is shorter than layers < K's);
5. forward hook on the inner VLM: record :class:`PruneStats`, clear the per-forward state.

Nothing changes a class or the attention implementation; ``remove`` undoes everything.
"""

from __future__ import annotations

import copy
import functools
import inspect
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from . import compat, flops
from .adapters import ModelAdapter
from .methods.base import ImageInputs, Method, Selection
from .signals import cls_attention_rows, query_attention, rope_keys, rope_query
from .stats import PruneStats


@dataclass
class Layout:
    """How a pruned prompt was compacted: slot j of row b holds original column ``gather[b, j]`` (valid slots),
    rows are left-padded to a common length. Kept for the decode steps that continue that prompt."""

    gather: torch.Tensor  # [B, L'] long
    valid: torch.Tensor  # [B, L'] bool
    seq_len: int  # S, the unpruned prompt length
    shift: torch.Tensor | None = None  # [B] real tokens dropped per row (positions="compact")

    @property
    def dropped(self) -> int:
        """Columns the compaction removed: ``S - L'``."""
        return self.seq_len - self.gather.shape[1]

    def compact_positions(self) -> torch.Tensor:
        """``[B, L']`` position ids numbering each row's kept tokens 0, 1, ... (padding slots get 0)."""
        return (self.valid.long().cumsum(1) - 1).clamp(min=0)

    @staticmethod
    def from_keep(keep: torch.Tensor) -> "Layout":
        b, s = keep.shape
        counts = keep.sum(1)
        width = int(counts.max())
        gather = torch.zeros(b, width, dtype=torch.long, device=keep.device)
        valid = torch.zeros(b, width, dtype=torch.bool, device=keep.device)
        for row in range(b):
            cols = keep[row].nonzero().squeeze(1)
            gather[row, width - cols.numel() :] = cols
            valid[row, width - cols.numel() :] = True
        return Layout(gather, valid, s)

    def take(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Gather the kept columns of ``x`` along its sequence dim ``dim`` (batch dim is ``dim - 1``)."""
        dim = dim % x.ndim
        b, w = self.gather.shape
        shape = list(x.shape)
        shape[dim - 1] = b
        x = x.expand(*shape)
        idx_shape = [1] * x.ndim
        idx_shape[dim - 1], idx_shape[dim] = b, w
        idx = self.gather.view(idx_shape).expand(*shape[:dim], w, *shape[dim + 1 :])
        return x.gather(dim, idx)

    def compress_mask(self, mask: torch.Tensor | None, total: int) -> torch.Tensor | None:
        """A 2-D mask over ``S + t`` unpruned columns -> over the ``L' + t`` cached ones."""
        if mask is None:
            if bool(self.valid.all()):
                return None
            mask = torch.ones(self.gather.shape[0], total, dtype=torch.long, device=self.gather.device)
        if mask.ndim != 2:
            raise ValueError(f"pruned models need a 2-D attention_mask, got shape {tuple(mask.shape)}")
        head = self.take(mask[:, : self.seq_len], 1) * self.valid.to(mask.dtype)
        return torch.cat([head, mask[:, self.seq_len :]], dim=1)


@dataclass
class PrunedPrompt:
    """The bookkeeping of a pruned prompt, stored on the KV cache it filled (one source of truth: whoever holds
    the cache holds its layout, whichever call, loop or turn continues it).

    ``layout`` is the compaction at the first prune point: from decoder layer ``start`` on (0 for the vision
    entry) each layer's cache holds ``layout``'s kept columns; ``drop`` (a late drop at ``drop_layer``) compacts
    further what entered the LM. The cache reports the *unpruned* length to its consumers (``get_seq_length``:
    generate's new-token slicing, default and M-RoPE decode positions), so decode positions continue from the
    unpruned prompt; its mask functions keep seeing what each layer stores (:func:`vtprune.compat.report_lengths`).
    """

    layout: Layout
    start: int
    drop: Layout | None = None
    drop_layer: int | None = None

    def hidden(self, layer_idx: int) -> int:
        """Prompt columns that layer ``layer_idx``'s cache does not hold."""
        n = self.layout.dropped if layer_idx >= self.start else 0
        if self.drop is not None and layer_idx >= self.drop_layer:
            n += self.drop.dropped
        return n


_PROMPT_ATTR = "_vtprune_pruned_prompt"


def pruned_prompt(cache) -> PrunedPrompt | None:
    """The :class:`PrunedPrompt` a cache was filled by (None: not a cache vtprune pruned)."""
    return None if cache is None else getattr(cache, _PROMPT_ATTR, None)


def attach_prompt(cache, prompt: PrunedPrompt) -> None:
    if compat.is_static(cache):
        raise ValueError(_STATIC_CACHE)
    cache.__dict__[_PROMPT_ATTR] = prompt
    compat.report_lengths(cache, lambda layer_idx, stored: stored + prompt.hidden(layer_idx))


def detach_prompt(cache) -> None:
    cache.__dict__.pop(_PROMPT_ATTR, None)
    compat.restore_lengths(cache)


_STATIC_CACHE = (
    "a static KV cache (StaticCache, cache_implementation='static' or any pre-allocated, compileable cache) is not "
    "supported on a pruned model: its pre-built masks assume the unpruned length. Use the default dynamic cache "
    "(DynamicCache, or no cache argument)"
)


@dataclass
class ImageInfo:
    """What the wrapped feature method recorded about one image (keyed by its feature tensor)."""

    crops: int
    grid: torch.Tensor | None  # [1, 3] (t, h, w) for Qwen-VL
    cls_attention: torch.Tensor | None  # [crops, L, H, 1+P] CLS rows of the requested vision layers
    projector_inputs: torch.Tensor | None  # [crops, P, D_in] what the projector received
    vision_keys: torch.Tensor | None  # [crops, L, 1+P, Dh] head-mean keys of the requested vision layers
    pack: Any  # per-crop patch scores [crops, P] -> per visual token [n]


@dataclass
class Unit:
    """One image's (or video's) visual tokens in the prompt."""

    row: int
    positions: torch.Tensor  # ascending sequence positions in the (padded) prompt row
    features: torch.Tensor | None = None
    info: ImageInfo | None = None
    real_mask: torch.Tensor | None = None  # [n] bool, from the image's original size (set_image_sizes)
    kept: torch.Tensor | None = None
    merged: torch.Tensor | None = None  # [len(kept), D] replacement vectors of a merging method


@dataclass
class Forward:
    """Per-forward state of a patched model."""

    input_ids: torch.Tensor | None
    prefill: bool
    prompt: PrunedPrompt | None = None  # prefill: the layout being built; decode: the one the cache holds
    image_sizes: list | None = None  # original (w, h) per image, from set_image_sizes
    features: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # visual token id -> per-image features
    units: list[Unit] = field(default_factory=list)
    mask2d: torch.Tensor | None = None  # bool [B, S]: the prompt's real tokens
    last: torch.Tensor | None = None  # [B] position of each row's last real token (llm stage)
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    layer_kwargs: dict[str, Any] = field(default_factory=dict)  # overrides for decoder layers >= K
    scrub_position_ids: bool = False
    select_ms: float = 0.0
    done: bool = False
    drop_mask: torch.Tensor | None = None  # bool [B, L'] real tokens entering the LM (late drop)
    drop_visual: torch.Tensor | None = None  # bool [B, L'] which of them are visual tokens
    dropped: list[bool] | None = None  # per row: every visual token dropped at the late-drop layer


class Session:
    """Everything one ``patch`` installed on one model; ``remove()`` undoes it."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, method: Method):
        self.model, self.adapter, self.method = model, adapter, method
        self.config = method.config
        self.num_layers = len(adapter.decoder_layers)
        self.layer = method.layer(self.num_layers) if method.stage == "llm" else None
        self.drop_layer = method.drop_layer(self.num_layers) if method.stage == "vision" else None
        #: the first decoder layer whose sequence is shorter than the LM's input (llm stage or late drop)
        self.cut = self.layer if self.layer is not None else self.drop_layer
        self.vision_layers: list[int] = []
        if method.signals & {"cls_attention", "vision_keys"}:
            if not adapter.has_cls_token:
                raise ValueError(
                    f"method {method.name!r} needs the vision tower's CLS attention, but "
                    f"{adapter.config.model_type!r} models have no CLS token; use a method that does not need it "
                    "(e.g. 'fastv', 'random')"
                )
            adapter.check_cls_strategy()
            if adapter.multi_crop and not method.multi_crop:
                raise ValueError(
                    f"method {method.name!r} does not support AnyRes / multi-crop images ({adapter.config.model_type!r}) "
                    "yet; use it on single-crop LLaVA-1.5-style models"
                )
            self.vision_layers = method.vision_layers(len(adapter.vision_attention_modules()))
        self.compact = self.config.positions == "compact"
        if self.compact and adapter.mrope:
            raise ValueError(
                f"positions='compact' renumbers 1-D position ids; {adapter.config.model_type!r} uses 3-D M-RoPE "
                "positions, whose image-grid layout has no compact form: use positions='original'"
            )
        if self.compact and self.drop_layer is not None:
            raise ValueError(f"positions='compact' is not supported with {method.name!r}'s late drop; "
                             "use positions='original' (or turn the late drop off)")
        if self.cut is not None and (why := adapter.unsupported_llm_stage()):
            raise ValueError(f"method {method.name!r} prunes inside the LLM, which {why}")
        self.visual_ids = adapter.visual_token_ids()
        self.fwd: Forward | None = None
        self.stats: PruneStats | None = None
        #: selections by unit (row, first position) reused by every forward of one generate(use_cache=False) call:
        #: without a cache each step re-runs the prompt, and a selection that reads the last token would move
        self._sticky: dict | None = None
        self._reselects = self.cut is not None
        self._handles: list = []
        self._wrapped: list[tuple[object, str]] = []
        self._rope = adapter.rope_fn() if self.cut is not None else None
        self._needs_text_attention = "text_attention" in method.signals or self.drop_layer is not None
        self._image_info: dict[int, tuple[weakref.ref, ImageInfo]] = {}
        self._cls_rows: list | None = None
        self._vision_keys: list | None = None
        self._cls_q: torch.Tensor | None = None
        self._projector_in: list | None = None
        self._projector32: nn.Module | None = None
        self.image_sizes: list | None = None  # for the next prompt (vtprune.set_image_sizes)

    # -- install / remove ---------------------------------------------------------------------------
    def install(self) -> None:
        a = self.adapter
        try:
            self._hook(self.model.register_forward_pre_hook(self._top_pre, with_kwargs=True))
            self._hook(a.inner.register_forward_pre_hook(self._inner_pre, with_kwargs=True))
            self._hook(a.inner.register_forward_hook(self._inner_post, always_call=True))
            self._hook(a.language_model.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
            for name in a.feature_methods:
                if hasattr(a.inner, name):
                    self._wrap_features(name)
            if self._reselects and hasattr(self.model, "generate"):
                self._wrap_generate()
            if "projector_inputs" in self.method.signals:
                self._hook(a.projector_module().register_forward_pre_hook(self._projector_hook))
            for i in self.vision_layers:
                attn = a.vision_attention_modules()[i]
                self._hook(attn.q_proj.register_forward_hook(self._cls_q_hook))
                self._hook(attn.k_proj.register_forward_hook(self._make_cls_k_hook(attn)))
            for i, layer in enumerate(a.decoder_layers):
                self._hook(layer.register_forward_pre_hook(self._make_layer_hook(i), with_kwargs=True))
            if self.cut is not None:
                attn = a.decoder_layers[self.cut - 1].self_attn
                self._hook(attn.register_forward_pre_hook(self._signal_pre, with_kwargs=True))
                self._hook(attn.k_proj.register_forward_hook(self._signal_k))
                if self._needs_text_attention:
                    self._hook(attn.q_proj.register_forward_hook(self._signal_q))
        except Exception:
            self.remove()
            raise

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for obj, name in self._wrapped:
            obj.__dict__.pop(name, None)
        self._handles, self._wrapped = [], []
        self.fwd = None

    def _hook(self, handle) -> None:
        self._handles.append(handle)

    def _wrap_features(self, name: str) -> None:
        """Wrap ``inner.get_image_features`` (or ``get_video_features``) on this instance: record, for each image's
        feature tensor, what the methods and FLOPs need (CLS rows, crops, grid). ``generate`` calls it before the
        forward and hands the features over in ``mm_encoder_outputs``; a plain forward calls it inside."""
        inner = self.adapter.inner
        original = getattr(inner, name)
        signature = inspect.signature(original)
        token_id = self._feature_token_id(name)

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            call = signature.bind(*args, **kwargs).arguments
            self._cls_rows = [] if self.vision_layers else None
            self._vision_keys = [] if "vision_keys" in self.method.signals else None
            self._projector_in = [] if "projector_inputs" in self.method.signals else None
            try:
                out = original(*args, **kwargs)
            finally:
                rows, self._cls_rows = self._cls_rows, None
                keys, self._vision_keys = self._vision_keys, None
                projected, self._projector_in = self._projector_in, None
            self._record_features(call, list(out.pooler_output), rows, keys, projected, token_id)
            return out

        inner.__dict__[name] = wrapped
        self._wrapped.append((inner, name))

    def _wrap_generate(self) -> None:
        """``generate(use_cache=False)`` re-runs the whole sequence at every step; a method whose selection reads
        the last token (llm stage, late drop) would then re-select with each new token as the "last prompt token".
        For the duration of such a call the first forward's selections are reused, so generation without cache
        gives the tokens generation with cache gives."""
        model = self.model
        original = model.generate

        @functools.wraps(original)
        def generate(*args, **kwargs):
            config = kwargs.get("generation_config") or model.generation_config
            use_cache = kwargs.get("use_cache", getattr(config, "use_cache", True))
            outer, self._sticky = self._sticky, (None if use_cache is not False else {})
            try:
                return original(*args, **kwargs)
            finally:
                self._sticky = outer

        model.__dict__["generate"] = generate
        self._wrapped.append((model, "generate"))

    def _feature_token_id(self, name: str) -> int:
        key = "video_token_id" if "video" in name else "image_token_id"
        return int(getattr(self.adapter.config, key))

    def _record_features(self, call: dict, feats: list[torch.Tensor], rows, keys, projected, token_id: int) -> None:
        self._image_info = {k: v for k, v in self._image_info.items() if v[0]() is not None}
        grid = call.get("image_grid_thw", call.get("video_grid_thw"))
        grid = torch.as_tensor(grid).reshape(-1, 3) if grid is not None else None
        counts = self.adapter.crop_counts(call, len(feats))
        per_image = torch.split(torch.stack(rows, dim=1), counts) if rows else [None] * len(feats)
        keys = torch.split(torch.stack(keys, dim=1), counts) if keys else [None] * len(feats)
        if projected:
            if len(projected) != 1:
                raise RuntimeError(f"the projector ran {len(projected)} times in one feature call; expected once")
            projector_inputs = self.adapter.split_projector_inputs(projected[0], call, counts)
        else:
            projector_inputs = [None] * len(feats)
        for i, feat in enumerate(feats):
            info = ImageInfo(
                crops=counts[i],
                grid=grid[i : i + 1] if grid is not None else None,
                cls_attention=per_image[i],
                vision_keys=keys[i],
                projector_inputs=projector_inputs[i],
                pack=functools.partial(self.adapter.pack_crop_scores, call=call, index=i),
            )
            self._image_info[id(feat)] = (weakref.ref(feat), info)
        if self.fwd is not None and self.fwd.prefill:  # called inside a forward (not by generate beforehand)
            self.fwd.features.setdefault(token_id, []).extend(feats)

    def _info(self, feat: torch.Tensor) -> "ImageInfo | None":
        entry = self._image_info.get(id(feat))
        return entry[1] if entry is not None and entry[0]() is feat else None

    # -- vision-side hooks ----------------------------------------------------------------------------
    def _projector_hook(self, module, args):
        if self._projector_in is not None:
            self._projector_in.append(args[0].detach())

    def _float32_projector(self) -> nn.Module:
        """The per-token projector in float32 (a copy, made once, when the model runs in another dtype)."""
        if self._projector32 is None:
            proj = self.adapter.projector()
            if any(p.dtype != torch.float32 for p in proj.parameters()):
                proj = copy.deepcopy(proj).float()
            self._projector32 = proj
        return self._projector32

    def _cls_q_hook(self, module, args, output):
        if self._cls_rows is not None:
            self._cls_q = output[:, :1]

    def _make_cls_k_hook(self, attn):
        def hook(module, args, output):
            if self._cls_rows is not None:
                self._cls_rows.append(cls_attention_rows(self._cls_q, output, attn.num_heads, attn.scale))
            if self._vision_keys is not None:
                c, t, e = output.shape
                self._vision_keys.append(output.detach().view(c, t, attn.num_heads, e // attn.num_heads).mean(2))

        return hook

    # -- top-level / inner hooks ----------------------------------------------------------------------
    def _top_pre(self, module, args, kwargs):
        if kwargs.get("labels") is not None:
            raise ValueError(
                "labels are not supported on a pruned model: its logits cover only the kept positions. "
                "Compute the loss on an unpatched model (vtprune.unpatch or the vtprune.patched context)."
            )
        visual_keys = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw")
        has_visual = any(kwargs.get(k) is not None for k in visual_keys) or bool(kwargs.get("mm_encoder_outputs"))
        if self.adapter.mrope and has_visual and kwargs.get("mm_token_type_ids") is None:
            raise ValueError(
                f"{self.adapter.config.model_type!r} needs mm_token_type_ids with pixel_values / pixel_values_videos "
                "to number the visual tokens' 3-D M-RoPE positions (without it the model falls back to 1-D positions "
                "and the kept tokens would lose theirs): pass the processor's mm_token_type_ids (1 for image "
                "tokens, 2 for video tokens, 0 elsewhere)"
            )

    def _inner_pre(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = compat.get_cache(kwargs)
        stored = compat.stored_length(cache)
        prompt = pruned_prompt(cache)
        if prompt is not None and stored == 0:  # the cache was reset: whatever comes is a new prompt
            detach_prompt(cache)
            prompt = None
        has_visual = any(kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos"))
        has_visual = has_visual or bool(kwargs.get("mm_encoder_outputs"))
        if prompt is not None:
            if has_visual:
                raise ValueError(
                    "new images on a KV cache that vtprune pruned are not supported; start a new prompt "
                    "(no cache) or unpatch first"
                )
            self.fwd = Forward(input_ids=input_ids, prefill=False, prompt=prompt)
            return
        if not has_visual:
            self.fwd = None
            return
        if cache is not None and compat.is_static(cache):
            raise ValueError(_STATIC_CACHE)
        if stored > 0:
            raise ValueError(
                f"images in a forward that continues a KV cache already holding {stored} positions (a later turn or a "
                "prefix cache): vtprune prunes the visual tokens of a prompt's first forward. Put the images in the "
                "conversation's first prompt, or unpatch to run this turn unpruned"
            )
        if input_ids is None:
            raise ValueError("a patched model needs input_ids (not only inputs_embeds) to locate the visual tokens")
        self.fwd = Forward(input_ids=input_ids, prefill=True, image_sizes=self.image_sizes)
        self.image_sizes = None
        for modality, encoded in (kwargs.get("mm_encoder_outputs") or {}).items():
            if encoded is not None:
                token_id = self._feature_token_id(modality)
                self.fwd.features.setdefault(token_id, []).extend(encoded.pooler_output)

    def _inner_post(self, module, args, output):
        fwd, self.fwd = self.fwd, None
        if fwd is None or not fwd.prefill:
            return
        if fwd.prompt is not None and output is not None and (cache := compat.output_cache(output)) is not None:
            attach_prompt(cache, fwd.prompt)  # the cache now holds the pruned prompt: it carries its layout
        if fwd.done:
            self.stats = self._make_stats(fwd)

    # -- language model ---------------------------------------------------------------------------------
    def _lm_pre(self, module, args, kwargs):
        fwd = self.fwd
        if fwd is None:
            return None
        embeds = kwargs["inputs_embeds"]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim != 2:
            raise ValueError(f"pruned models need a 2-D attention_mask, got shape {tuple(mask.shape)}")
        if not fwd.prefill:
            return self._lm_decode(kwargs, embeds, mask)
        b, s = embeds.shape[:2]
        fwd.mask2d = torch.ones(b, s, dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        fwd.units = self._find_units(fwd)
        if not fwd.units:
            self.fwd = None
            return None
        if self.method.stage == "llm":
            cols = torch.arange(s, device=embeds.device)
            fwd.last = torch.where(fwd.mask2d, cols, -1).max(dim=1).values
            fwd.layer_kwargs["pending"] = True
            return None
        t0 = time.perf_counter()
        keep = self._select(fwd, lambda unit: self._vision_inputs(fwd, unit))
        fwd.select_ms += (time.perf_counter() - t0) * 1e3
        fwd.done = True
        if keep is None:
            return None
        layout = self._start_layout(fwd, keep, start=0)
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = self.adapter.default_position_ids(b, s, 0, embeds.device)
        kwargs["inputs_embeds"] = layout.take(self._merge(fwd, embeds), 1)
        # always pass a mask (kept position ids have gaps, which transformers would read as packed sequences)
        kwargs["attention_mask"] = layout.compress_mask(
            torch.ones(b, s, dtype=torch.long, device=embeds.device) if mask is None else mask, s
        )
        kwargs["position_ids"] = layout.compact_positions() if self.compact else layout.take(pos, -1)
        fwd.scrub_position_ids = True
        if self.drop_layer is not None:  # the late drop reads the compacted prompt
            visual = torch.isin(fwd.input_ids, torch.tensor(self.visual_ids, device=fwd.input_ids.device))
            fwd.drop_mask = kwargs["attention_mask"].bool()
            fwd.drop_visual = layout.take(visual, 1) & layout.valid
            cols = torch.arange(fwd.drop_mask.shape[1], device=embeds.device)
            fwd.last = torch.where(fwd.drop_mask, cols, -1).max(dim=1).values
            fwd.layer_kwargs["pending"] = True
        return args, kwargs

    def _lm_decode(self, kwargs, embeds, mask):
        """A forward that continues a pruned prompt's cache (a decode step, or a later text turn of ``q`` tokens).
        ``mask`` covers the unpruned columns (``S + t``, as the unpatched model's would); the cache reports the
        unpruned length, so the host numbers positions as for the unpruned prompt."""
        fwd = self.fwd
        prompt = fwd.prompt
        cache = compat.get_cache(kwargs)
        q = embeds.shape[1]
        past = cache.get_seq_length()  # unpruned length (PrunedPrompt)
        if self.compact:  # kept tokens renumbered from each row's first real token, dropped ones not counted
            pos = kwargs.get("position_ids")
            if pos is None and mask is not None:  # number from the mask, as the compacted prompt was
                pos = (mask.long().cumsum(1) - 1).clamp(min=0)[:, -q:]
            elif pos is None:
                pos = self.adapter.default_position_ids(embeds.shape[0], q, past, embeds.device)
            pos = pos - prompt.layout.shift[:, None].to(pos.device)
        if prompt.start > 0:  # llm stage: layers < K hold the whole prompt, masks of layers >= K come at the cut
            fwd.layer_kwargs["decode_mask"] = prompt.layout.compress_mask(mask, past + q)
            if self.compact:
                fwd.layer_kwargs["decode_positions"] = pos
            return None
        kwargs["attention_mask"] = prompt.layout.compress_mask(mask, past + q)
        if prompt.drop is not None:
            stored = compat.stored_length(cache, 0)
            fwd.layer_kwargs["decode_mask"] = prompt.drop.compress_mask(kwargs["attention_mask"], stored + q)
        if self.compact:
            kwargs["position_ids"] = pos
        return (), kwargs

    def _start_layout(self, fwd: Forward, keep: torch.Tensor, start: int) -> Layout:
        """The compaction of this prefill's first prune point (at decoder layer ``start``; 0: the vision entry);
        it goes onto the cache with the prompt at the end of the forward."""
        layout = Layout.from_keep(keep)
        layout.shift = fwd.mask2d.sum(1) - keep.sum(1)
        fwd.prompt = PrunedPrompt(layout=layout, start=start)
        return layout

    # -- units and selection --------------------------------------------------------------------------
    def _find_units(self, fwd: Forward) -> list[Unit]:
        ids = fwd.input_ids
        units: list[Unit] = []
        for token_id in self.visual_ids:
            where = (ids == token_id).nonzero()  # row-major [(row, col)]
            if where.numel() == 0:
                continue
            feats = fwd.features.get(token_id)
            if feats is not None:
                lengths = [f.shape[0] for f in feats]
                if sum(lengths) != where.shape[0]:
                    raise ValueError(
                        f"{where.shape[0]} visual placeholder tokens (id {token_id}) but the vision features "
                        f"have {sum(lengths)} tokens"
                    )
                chunks = torch.split(where, lengths)
            else:  # features given by the caller (mm_encoder_outputs): one unit per contiguous run
                chunks = _runs(where)
            for i, chunk in enumerate(chunks):
                rows = chunk[:, 0].unique()
                if rows.numel() != 1:
                    raise ValueError("an image's visual tokens span several batch rows; check the prompt")
                unit = Unit(row=int(rows[0]), positions=chunk[:, 1])
                if feats is not None:
                    unit.features, unit.info = feats[i], self._info(feats[i])
                units.append(unit)
        units.sort(key=lambda u: (u.row, int(u.positions[0])))  # each sample's visual tokens in prompt order
        if fwd.image_sizes is not None:
            self._attach_real_masks(fwd, units)
        needs = self.method.signals & {"features", "cls_attention", "projector_inputs", "vision_keys"}
        if units and needs and any(u.info is None or u.features is None for u in units):
            raise ValueError(
                f"method {self.method.name!r} needs {sorted(needs)} from the vision tower; pass pixel_values "
                "(features computed by an unpatched model carry no signals)"
            )
        return units

    def _attach_real_masks(self, fwd: Forward, units: list[Unit]) -> None:
        images = [u for u in units if int(fwd.input_ids[u.row, u.positions[0]]) == self.adapter.config.image_token_id]
        if len(images) != len(fwd.image_sizes):
            raise ValueError(f"vtprune.set_image_sizes gave {len(fwd.image_sizes)} size(s) but the prompt has "
                             f"{len(images)} image(s); give one (width, height) per image, in order")
        threshold = getattr(self.config, "pad_threshold", 0.5)
        for unit, size in zip(images, fwd.image_sizes):
            mask = self.adapter.real_patch_mask(size, unit.positions.numel(), threshold)
            unit.real_mask = mask.to(unit.positions.device)

    def _select(self, fwd: Forward, make_inputs) -> torch.Tensor | None:
        """Run the method on every unit. Returns the keep mask [B, S] over the prompt's real tokens (padding
        dropped too: rows are re-padded), or None when no visual token is dropped (then nothing changes)."""
        keep = fwd.mask2d.clone()
        dropped = False
        for unit in fwd.units:
            n = unit.positions.numel()
            key = (unit.row, int(unit.positions[0]), n)
            if self._sticky is not None and key in self._sticky:  # generate(use_cache=False): reuse the prompt's
                kept = self._sticky[key]
            else:
                inputs = make_inputs(unit)
                if inputs.k >= n:
                    unit.kept = torch.arange(n, device=unit.positions.device)
                    continue
                kept = self.method.select(inputs)
                if self._sticky is not None:
                    self._sticky[key] = kept
            if isinstance(kept, Selection):
                unit.merged = kept.merged
                kept = kept.kept
            kept = kept.to(unit.positions.device)
            _check_selection(self.method.name, kept, n, self.config.budget(n))
            unit.kept = kept
            keep[unit.row, unit.positions] = False
            keep[unit.row, unit.positions[kept]] = True
            dropped = True
        return keep if dropped else None

    def _merge(self, fwd: Forward, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, S, D] with each merging unit's kept rows replaced by its merged vectors (a copy if any)."""
        merging = [u for u in fwd.units if u.merged is not None]
        if not merging:
            return x
        x = x.clone()
        for unit in merging:
            cols = unit.positions[unit.kept]
            if tuple(unit.merged.shape) != (cols.numel(), x.shape[-1]):
                raise RuntimeError(
                    f"method {self.method.name!r} returned merged vectors of shape {tuple(unit.merged.shape)}; "
                    f"expected {(cols.numel(), x.shape[-1])} (one per kept token)"
                )
            x[unit.row, cols] = unit.merged.to(device=x.device, dtype=x.dtype)
        return x

    def _vision_inputs(self, fwd: Forward, unit: Unit) -> ImageInputs:
        n = unit.positions.numel()
        return ImageInputs(
            n=n,
            k=self.config.budget(n),
            features=unit.features,
            cls_attention=unit.info.cls_attention if unit.info else None,
            vision_keys=unit.info.vision_keys if unit.info else None,
            pack_crop_scores=unit.info.pack if unit.info else None,
            projector_inputs=unit.info.projector_inputs if unit.info else None,
            projector=self._float32_projector() if "projector_inputs" in self.method.signals else None,
            real_mask=unit.real_mask,
            image_start=int(unit.positions[0]),
        )

    # -- decoder layers (llm stage, position-id scrubbing) -------------------------------------------------
    def _pending(self) -> Forward | None:
        fwd = self.fwd
        return fwd if fwd is not None and fwd.layer_kwargs.get("pending") else None

    def _signal_pre(self, module, args, kwargs):
        if fwd := self._pending():
            fwd.signals["_rope"] = kwargs["position_embeddings"]

    def _signal_q(self, module, args, output):
        if fwd := self._pending():
            rows = torch.arange(output.shape[0], device=output.device)
            fwd.signals["_q"] = output[rows, fwd.last]

    def _signal_k(self, module, args, output):
        if fwd := self._pending():
            fwd.signals["_k"] = output

    def _llm_signals(self, fwd: Forward, mask2d: torch.Tensor, renumber: bool) -> None:
        """Layer K-1's signals from its captured q_proj / k_proj outputs (RoPE applied here, nothing recomputed);
        ``mask2d`` marks the real tokens of the sequence that layer saw. ``renumber`` (1-D positions, the prompt as
        the model received it): RoPE at positions numbered from the attention mask, whatever position ids the
        caller passed, so position-dependent signals (DART's post-RoPE key norms) do not depend on left padding."""
        attn = self.adapter.decoder_layers[self.cut - 1].self_attn
        rope = fwd.signals.pop("_rope")
        k_out = fwd.signals.pop("_k")
        if renumber and not self.adapter.mrope:
            rope = self._rotary(k_out, (mask2d.long().cumsum(1) - 1).clamp(min=0))
        k = rope_keys(attn, k_out, rope, self._rope)
        if self._needs_text_attention:
            q = rope_query(attn, fwd.signals.pop("_q"), rope, fwd.last, self._rope)
            cols = torch.arange(mask2d.shape[1], device=mask2d.device)
            visible = mask2d & (cols[None, :] <= fwd.last[:, None])
            fwd.signals["text_attention"] = query_attention(q, k, attn.scaling, visible)
        if "keys" in self.method.signals:
            fwd.signals["keys"] = k.transpose(1, 2).reshape(k.shape[0], k.shape[2], -1)

    def _make_layer_hook(self, index: int):
        def hook(module, args, kwargs):
            fwd = self.fwd
            if fwd is None:
                return None
            if index == self.layer:
                return self._at_prune_layer(fwd, args, kwargs)
            if index == self.drop_layer and (out := self._at_drop_layer(fwd, args, kwargs)) is not None:
                return out
            if self.cut is not None and index > self.cut and "masks" in fwd.layer_kwargs:
                kwargs.update(fwd.layer_kwargs["override"])
                kwargs["attention_mask"] = fwd.layer_kwargs["masks"][self.adapter.layer_type(index)]
                return args, kwargs
            if fwd.scrub_position_ids:
                kwargs["position_ids"] = None
                return args, kwargs
            return None

        return hook

    def _at_prune_layer(self, fwd: Forward, args, kwargs):
        cache = compat.get_cache(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if not fwd.prefill:
            return self._decode_at_cut(fwd, hidden, kwargs, cache)
        if not fwd.layer_kwargs.pop("pending", False):
            return None
        t0 = time.perf_counter()
        self._llm_signals(fwd, fwd.mask2d, renumber=True)
        keep = self._select(fwd, lambda unit: self._llm_inputs(fwd, unit, hidden))
        fwd.select_ms += (time.perf_counter() - t0) * 1e3
        fwd.done = True
        fwd.signals.clear()
        if keep is None:
            return None
        layout = self._start_layout(fwd, keep, start=self.layer)
        return self._shorten(fwd, layout, self._merge(fwd, hidden), fwd.mask2d, kwargs, cache)

    def _at_drop_layer(self, fwd: Forward, args, kwargs):
        """Late drop (e.g. ToDRE stage 2): every visual token of a row whose last prompt token gives them too
        little attention at layer K2-1 leaves the sequence from layer K2 on. None: nothing to do here."""
        cache = compat.get_cache(kwargs)
        if not fwd.prefill:
            if fwd.prompt.drop is None:
                return None
            return self._decode_at_cut(fwd, args[0] if args else kwargs.pop("hidden_states"), kwargs, cache)
        if not fwd.layer_kwargs.pop("pending", False):
            return None
        t0 = time.perf_counter()
        self._llm_signals(fwd, fwd.drop_mask, renumber=False)
        share = (fwd.signals.pop("text_attention").mean(1) * fwd.drop_visual).sum(1)
        fwd.signals.clear()
        has_visual = fwd.drop_visual.any(1)
        fwd.dropped = [bool(v) and self.method.drop_all(float(x)) for x, v in zip(share, has_visual)]
        if self._sticky is not None:  # generate(use_cache=False): the prompt's decisions hold for every step
            fwd.dropped = self._sticky.setdefault("late_drop", fwd.dropped)
        fwd.select_ms += (time.perf_counter() - t0) * 1e3
        if not any(fwd.dropped):
            return None
        rows = torch.tensor(fwd.dropped, device=fwd.drop_mask.device)
        layout = Layout.from_keep(fwd.drop_mask & ~(fwd.drop_visual & rows[:, None]))
        fwd.prompt.drop, fwd.prompt.drop_layer = layout, self.drop_layer
        hidden = args[0] if args else kwargs.pop("hidden_states")
        return self._shorten(fwd, layout, hidden, fwd.drop_mask, kwargs, cache)

    def _decode_at_cut(self, fwd: Forward, hidden, kwargs, cache):
        """A decode step at the cut layer: layers >= cut get masks sized for their shorter cache."""
        masks = self._layer_masks(hidden, fwd.layer_kwargs.get("decode_mask"), cache)
        override = {"position_ids": None}
        if "decode_positions" in fwd.layer_kwargs:  # positions="compact": layers >= K number the pruned sequence
            override["position_embeddings"] = self._rotary(hidden, fwd.layer_kwargs["decode_positions"])
            kwargs.update(override)
        fwd.layer_kwargs.update(masks=masks, override=override)
        kwargs["attention_mask"] = masks[self.adapter.layer_type(self.cut)]
        kwargs["position_ids"] = None
        return (hidden,), kwargs

    def _shorten(self, fwd: Forward, layout: Layout, hidden, mask2d, kwargs, cache):
        """Compact the cut layer's input (hidden states, rotary tables, masks) with ``layout``; layers after it get
        the same overrides."""
        hidden = layout.take(hidden, 1)
        mask2d = layout.compress_mask(mask2d.long(), layout.seq_len)
        if self.compact:
            rope = self._rotary(hidden, layout.compact_positions())
        else:
            cos, sin = kwargs["position_embeddings"]
            rope = (layout.take(cos, 1), layout.take(sin, 1))
        override = {"position_embeddings": rope, "position_ids": None}
        masks = self._layer_masks(hidden, mask2d, cache)
        fwd.layer_kwargs.update(masks=masks, override=override)
        kwargs.update(override)
        kwargs["attention_mask"] = masks[self.adapter.layer_type(self.cut)]
        return (hidden,), kwargs

    def _rotary(self, hidden, position_ids):
        """The LM's rotary tables ``(cos, sin)`` for ``position_ids`` (positions="compact" after pruning)."""
        return self.adapter.language_model.rotary_emb(hidden, position_ids)

    def _layer_masks(self, hidden, mask2d, cache) -> dict[str, Any]:
        """Masks of layers >= the cut for their (shorter) sequence and cache, by layer type."""
        types = {self.adapter.layer_type(i) for i in range(self.cut, self.num_layers)}
        return compat.causal_masks(self.adapter.language_model.config, hidden, mask2d, cache, self.cut, types)

    def _llm_inputs(self, fwd: Forward, unit: Unit, hidden: torch.Tensor) -> ImageInputs:
        n = unit.positions.numel()
        start = int(unit.positions[0])
        if int(unit.positions[-1]) - start + 1 != n:
            raise ValueError(f"method {self.method.name!r} needs each image's visual tokens to be contiguous")
        row = unit.row
        signals = fwd.signals
        return ImageInputs(
            n=n,
            k=self.config.budget(n),
            features=unit.features,
            hidden=hidden[row],
            keys=signals["keys"][row] if "keys" in signals else None,
            text_attention=signals["text_attention"][row] if "text_attention" in signals else None,
            image_start=start,
            final_norm=self.adapter.final_norm,
            real_mask=unit.real_mask,
        )

    # -- stats ----------------------------------------------------------------------------------------------
    def _make_stats(self, fwd: Forward) -> PruneStats:
        b = fwd.mask2d.shape[0]
        n_in, n_kept = [0] * b, [0] * b
        kept_indices: list[list[torch.Tensor]] = [[] for _ in range(b)]
        for unit in fwd.units:
            n = unit.positions.numel()
            kept_indices[unit.row].append(unit.kept.cpu() + n_in[unit.row])
            n_in[unit.row] += n
            n_kept[unit.row] += unit.kept.numel()
        real = fwd.mask2d.sum(1).tolist()
        text_cfg = self.adapter.text_config
        k = self.layer or 0
        dropped = fwd.dropped or [False] * b
        full = pruned = 0
        for row in range(b):
            short = real[row] - (n_in[row] - n_kept[row])
            lengths = [real[row]] * k + [short] * (self.num_layers - k)
            if dropped[row]:  # late drop: no visual token from that layer on
                lengths[self.drop_layer :] = [short - n_kept[row]] * (self.num_layers - self.drop_layer)
            full += flops.decoder_prefill_flops(text_cfg, real[row])
            pruned += flops.decoder_prefill_flops(text_cfg, lengths)
        vision = self._vision_flops(fwd)
        return PruneStats(
            visual_tokens_in=n_in,
            visual_tokens_kept=n_kept,
            stage=self.method.stage,
            layer=self.layer,
            select_ms=fwd.select_ms,
            prefill_flops=pruned + vision,
            prefill_flops_full=full + vision,
            kept_indices=[torch.cat(k_) if k_ else torch.zeros(0, dtype=torch.long) for k_ in kept_indices],
            late_drop_layer=self.drop_layer,
            late_dropped=fwd.dropped,
        )

    def _vision_flops(self, fwd: Forward) -> int:
        infos = [u.info for u in fwd.units if u.info is not None]
        if not infos:
            return 0  # features computed elsewhere: the vision tower did not run here
        if self.adapter.mrope:
            return flops.vision_flops(self.adapter.config, image_grid_thw=torch.cat([i.grid for i in infos]))
        return flops.vision_flops(self.adapter.config, num_images=sum(i.crops for i in infos))


def _runs(where: torch.Tensor) -> list[torch.Tensor]:
    """Split row-major (row, col) pairs into contiguous runs."""
    if where.shape[0] == 0:
        return []
    breaks = ((where[1:, 0] != where[:-1, 0]) | (where[1:, 1] != where[:-1, 1] + 1)).nonzero().squeeze(1) + 1
    return list(torch.tensor_split(where, breaks.tolist()))


def _check_selection(name: str, kept: torch.Tensor, n: int, k: int) -> None:
    """A method returns about ``k`` ascending unique int64 indices in [0, n) (a method may round its budget,
    e.g. DART's official rounding)."""
    if kept.dtype != torch.long or kept.ndim != 1 or not 1 <= kept.numel() <= n:
        raise RuntimeError(f"method {name!r} returned {tuple(kept.shape)} {kept.dtype}; expected ~{k} int64 indices")
    if int(kept.min()) < 0 or int(kept.max()) >= n or bool((kept[1:] <= kept[:-1]).any()):
        raise RuntimeError(f"method {name!r} returned indices that are not ascending, unique and in [0, {n})")
