"""Vision-side capture: what the vision tower and projector tell the engine about each image, while they run.

Owns :class:`VisionCapture`: it wraps the inner model's ``get_image_features`` / ``get_video_features`` on the
instance and records, per image feature tensor (:class:`ImageInfo`), its crops, its M-RoPE grid, and the signals
the vision-stage method asked for: CLS attention rows and head-mean keys of the requested vision layers (hooks on
their ``q_proj`` / ``k_proj``, one row recomputed, no eager attention) or, with ``importance="received"``, the
attention each patch receives (a forward pre-hook on each requested attention module hands its arguments to the
adapter's ``vision_qk``; ``vtprune.functional.received_attention`` reduces the q/k in bounded chunks), and the
projector's input. ``generate``
calls the feature method before the forward and hands the features over in ``mm_encoder_outputs``; a plain
forward calls it inside: either way :meth:`VisionCapture.info` finds an image's record from its feature tensor.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import functional as F
from ..adapters import ModelAdapter
from ..methods.base import Method
from ..signals import cls_attention_rows, resolve_importance


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def outside_checkpoint():
    """Context for what a hook computes inside a layer that activation checkpointing may wrap (transformers' gradient
    checkpointing recomputes a decoder / vision layer's ``forward`` in backward): autograd keeps the tensors these ops
    save itself, not through the checkpoint. The signal is computed once, in the forward; the recomputation runs the
    hooks with no forward in progress (nothing recorded), so it saves what the layer alone saved, as the checkpoint
    requires. Without a checkpoint (or without gradients) this changes nothing."""
    return torch.autograd.graph.saved_tensors_hooks(_same, _same)


@dataclass
class ImageInfo:
    """What the wrapped feature method recorded about one image (keyed by its feature tensor)."""

    crops: int
    grid: torch.Tensor | None  # [1, 3] (t, h, w) for Qwen-VL
    cls_attention: torch.Tensor | None  # [crops, L, H, 1+P] CLS rows of the requested vision layers
    projector_inputs: torch.Tensor | None  # [crops, P, D_in] what the projector received
    vision_keys: torch.Tensor | None  # [crops, L, 1+P, Dh] head-mean keys (received: [crops, L, P, Dh], patches)
    vision_qk: torch.Tensor | None  # [crops, L, 2, 1+P, E] full-width q_proj / k_proj outputs (signal vision_qk)
    received: torch.Tensor | None  # [crops, L, P] attention each patch receives (importance="received")
    pack: Any  # per-crop patch scores [crops, P] -> per visual token [n]
    token_patches: Any = None  # (crops, P) -> [n, m] the crop patches each visual token carries


class VisionCapture:
    """The vision-side hooks of one patch. ``method`` is the schedule's vision-entry method (None: none), whose
    signals are captured; ``on_features(token_id, feats)`` receives the features computed inside a forward."""

    def __init__(self, adapter: ModelAdapter, method: Method | None, on_features: Callable):
        self.adapter = adapter
        self.signals = method.signals if method is not None else frozenset()
        self.on_features = on_features
        self.vision_layers: list[int] = []
        #: the method's reduction of a vision layer's q/k to per-token scores (importance="received")
        self.reduce = method.received_attention if method is not None else F.received_attention
        #: "cls" or "received" (the method's ``importance`` option resolved on this model); None: no vision scores
        self.importance: str | None = None
        if self.signals & {"cls_attention", "vision_keys", "vision_qk"}:
            self.importance = resolve_importance(
                method.name,
                method.importance(),
                adapter.config.model_type,
                adapter.has_cls_token,
            )
            adapter.check_cls_strategy(self.importance)
            if "vision_qk" in self.signals and "cls_attention" not in self.signals and self.importance != "cls":
                raise ValueError(
                    f"method {method.name!r} reads the vision tower's full-width CLS query and keys (signal "
                    f"'vision_qk'), which needs a CLS token and importance='cls', and declares no 'cls_attention' "
                    f"to read the received attention instead; got importance={self.importance!r}"
                )
            if self.importance == "received" and type(adapter).vision_qk is ModelAdapter.vision_qk:
                adapter.vision_qk(None, (), {})  # the default raises the family's "not implemented" ValueError
            if adapter.multi_crop and not method.multi_crop:
                raise ValueError(
                    f"method {method.name!r} does not support AnyRes / multi-crop images "
                    f"({adapter.config.model_type!r}) yet; use it on single-crop LLaVA-1.5-style models"
                )
            self.vision_layers = method.vision_layers(len(adapter.vision_attention_modules()))
        self._image_info: dict[int, tuple[weakref.ref, ImageInfo]] = {}
        #: per placeholder token id, the last feature call whose ``pooler_output`` was one stacked tensor (InternVL's
        #: tiles ``[tiles, n, D]``, Gemma 3's images, LLaVA-OneVision / -NeXT-Video videos ``[V, n, D]``): that tensor,
        #: the per-image views recorded from it and their records. Iterating a tensor makes new view objects, and
        #: ``generate`` hands such features back (the same tensor, new views of it, or for beams a repeated copy), so
        #: they are found by identity, then by storage, then by value (held until that feature method runs again)
        self._batched: dict[int, tuple[torch.Tensor, list[torch.Tensor], list[ImageInfo]]] = {}
        self._cls_rows: list | None = None
        self._received: list | None = None
        self._vision_keys: list | None = None
        self._vision_qk: list | None = None
        self._cls_q: torch.Tensor | None = None
        self._projector_in: list | None = None
        self._projector32: nn.Module | None = None

    def install(self, hook: Callable, wrap: Callable) -> None:
        """Register the hooks through ``hook(handle)`` and the wrapped methods through ``wrap(obj, name, make)``
        (``make(original)`` returns the wrapper)."""
        a = self.adapter
        for name in a.feature_methods:
            if hasattr(a.inner, name):
                wrap(a.inner, name, functools.partial(self._wrapped_features, name=name))
        if "projector_inputs" in self.signals:
            hook(a.projector_module().register_forward_pre_hook(self._projector_hook))
        for i in self.vision_layers:
            attn = a.vision_attention_modules()[i]
            if self.importance == "received":
                hook(attn.register_forward_pre_hook(self._received_hook, with_kwargs=True))
                continue
            q_mod, k_mod = a.vision_qk_modules(attn)
            hook(q_mod.register_forward_hook(self._cls_q_hook))
            hook(k_mod.register_forward_hook(self._make_cls_k_hook(attn)))

    def token_id(self, name: str) -> int:
        """The placeholder token id of a feature method (``get_video_features``: videos) or modality name."""
        key = "video_token_id" if "video" in name else "image_token_id"
        return int(getattr(self.adapter.config, key))

    def split_features(self, pooler_output) -> list[torch.Tensor]:
        """A feature method's ``pooler_output`` (a list of per-image tensors, or one stacked tensor) as the per-image
        tensors the capture recorded (the same objects, so :meth:`info` finds their records)."""
        if isinstance(pooler_output, torch.Tensor):
            for batched, feats, _ in self._batched.values():
                if batched is pooler_output:
                    return feats
        return list(pooler_output)

    def info(self, feat: torch.Tensor) -> ImageInfo | None:
        entry = self._image_info.get(id(feat))
        if entry is not None and entry[0]() is feat:
            return entry[1]
        for same_view in (True, False):  # a new view of a recorded image first, then a copy of one (beam expansion)
            for _, feats, infos in self._batched.values():
                for recorded, info in zip(feats, infos):
                    if recorded.shape != feat.shape or recorded.dtype != feat.dtype or recorded.device != feat.device:
                        continue
                    if same_view and recorded.data_ptr() == feat.data_ptr() and recorded.stride() == feat.stride():
                        return info
                    if not same_view and torch.equal(recorded, feat):
                        return info
        return None

    def clear(self) -> None:
        """Drop the records kept for stacked features (at unpatch)."""
        self._batched = {}
        self._image_info = {}

    def float32_projector(self) -> nn.Module:
        """The per-token projector in float32 (a copy, made once, when the model runs in another dtype)."""
        if self._projector32 is None:
            proj = self.adapter.projector()
            if any(p.dtype != torch.float32 for p in proj.parameters()):
                proj = copy.deepcopy(proj).float()
            self._projector32 = proj
        return self._projector32

    # -- the wrapped feature methods -------------------------------------------------------------------------
    def _wrapped_features(self, original: Callable, name: str):
        signature = inspect.signature(original)
        token_id = self.token_id(name)

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            call = signature.bind(*args, **kwargs).arguments
            received = self.importance == "received"
            self._cls_rows = [] if self.vision_layers and not received else None
            self._received = [] if self.vision_layers and received else None
            self._vision_keys = [] if "vision_keys" in self.signals else None
            # the full-width CLS query and keys exist with importance="cls" only (None with "received")
            self._vision_qk = [] if "vision_qk" in self.signals and not received else None
            self._projector_in = [] if "projector_inputs" in self.signals else None
            try:
                out = original(*args, **kwargs)
            finally:
                rows, self._cls_rows = self._cls_rows, None
                got, self._received = self._received, None
                keys, self._vision_keys = self._vision_keys, None
                qk, self._vision_qk = self._vision_qk, None
                projected, self._projector_in = self._projector_in, None
            feats = list(out.pooler_output)
            infos = self._record(call, feats, rows, keys, projected, got, qk)
            if isinstance(out.pooler_output, torch.Tensor):
                self._batched[token_id] = (out.pooler_output, feats, infos)
            self.on_features(token_id, feats)
            return out

        return wrapped

    def _record(
        self, call: dict, feats: list[torch.Tensor], rows, keys, projected, received=None, qk=None
    ) -> list[ImageInfo]:
        self._image_info = {k: v for k, v in self._image_info.items() if v[0]() is not None}
        grid = self.adapter.patch_grids(call)
        counts = self.adapter.crop_counts(call, len(feats))
        per_image = torch.split(torch.stack(rows, dim=1), counts) if rows else [None] * len(feats)
        if received:  # per layer [N] (tower order) / [N, Dh] -> per image [crops, L, P(, Dh)] in packing order
            split = self.adapter.split_vision_tokens
            received = [torch.stack(layers, 1) for layers in zip(*(split(r, call, counts) for r in received))]
            keys = (
                [torch.stack(layers, 1) for layers in zip(*(split(k, call, counts) for k in keys))]
                if keys
                else [None] * len(feats)
            )
        else:
            received = [None] * len(feats)
            keys = torch.split(torch.stack(keys, dim=1), counts) if keys else [None] * len(feats)
        if len(received) != len(feats) or len(keys) != len(feats):
            raise RuntimeError(
                f"{type(self.adapter).__name__}.split_vision_tokens gave {len(received)} images for "
                f"a feature call of {len(feats)}"
            )
        qk = torch.split(torch.stack(qk, dim=1), counts) if qk else [None] * len(feats)
        if projected:
            if len(projected) != 1:
                raise RuntimeError(f"the projector ran {len(projected)} times in one feature call; expected once")
            projector_inputs = self.adapter.split_projector_inputs(projected[0], call, counts)
        else:
            projector_inputs = [None] * len(feats)
        infos = []
        for i, feat in enumerate(feats):
            info = ImageInfo(
                crops=counts[i],
                grid=grid[i : i + 1] if grid is not None else None,
                cls_attention=per_image[i],
                vision_keys=keys[i],
                vision_qk=qk[i],
                received=received[i],
                projector_inputs=projector_inputs[i],
                pack=functools.partial(self.adapter.pack_crop_scores, call=call, index=i),
                token_patches=functools.partial(self.adapter.token_patches, call, i),
            )
            self._image_info[id(feat)] = (weakref.ref(feat), info)
            infos.append(info)
        return infos

    # -- vision tower / projector hooks ----------------------------------------------------------------------
    def _projector_hook(self, module, args):
        if self._projector_in is not None:
            self._projector_in.append(args[0].detach())

    def _received_hook(self, module, args, kwargs):
        if self._received is None:
            return None
        with outside_checkpoint():  # differentiable, like the CLS rows (robustness attacks)
            qk = self.adapter.vision_qk(module, args, kwargs)
            self._received.append(self.reduce(qk.q, qk.k, qk.cu_seqlens, qk.scaling))
            if self._vision_keys is not None:
                self._vision_keys.append(qk.k.detach().mean(1))
        return None

    def _cls_q_hook(self, module, args, output):
        if self._cls_rows is not None:
            with outside_checkpoint():
                self._cls_q = output if self._vision_qk is not None else output[:, :1]  # vision_qk: every query

    def _make_cls_k_hook(self, attn):
        def hook(module, args, output):
            with outside_checkpoint():
                if self._cls_rows is not None:
                    self._cls_rows.append(cls_attention_rows(self._cls_q, output, attn.num_heads, attn.scale))
                if self._vision_keys is not None:
                    c, t, e = output.shape
                    self._vision_keys.append(output.detach().view(c, t, attn.num_heads, e // attn.num_heads).mean(2))
                if self._vision_qk is not None:
                    self._vision_qk.append(torch.stack([self._cls_q, output], dim=1))  # [C, 2, 1+P, E] (differentiable)

        return hook


def join_infos(infos: list[ImageInfo | None]) -> ImageInfo | None:
    """One image's record from the records of its consecutive tiles (``adapter.tiled``): crops concatenated in tile
    order, the packing of each tile applied to its own crops. None if any tile has no record."""
    if len(infos) == 1 or any(i is None for i in infos):
        return infos[0] if len(infos) == 1 else None
    counts = [i.crops for i in infos]

    def cat(name):
        parts = [getattr(i, name) for i in infos]
        return None if any(p is None for p in parts) else torch.cat(parts)

    def pack(scores: torch.Tensor) -> torch.Tensor:
        return torch.cat([i.pack(s) for i, s in zip(infos, torch.split(scores, counts))])

    def token_patches(crops: int, patches: int) -> torch.Tensor:
        parts, offset = [], 0
        for info, c in zip(infos, counts):
            ids = info.token_patches(c, patches)
            parts.append(torch.where(ids >= 0, ids + offset * patches, ids))
            offset += c
        return torch.cat(parts)

    calls = ("crops", "pack", "token_patches")
    joined = {f.name: cat(f.name) for f in dataclasses.fields(ImageInfo) if f.name not in calls}
    return ImageInfo(crops=sum(counts), pack=pack, token_patches=token_patches, **joined)
