"""vLLM's Qwen2.5-VL and Qwen3-VL with pre-LLM visual-token pruning (registered by :func:`vtprune.vllm.register`).

How a pruned request runs (the same steps as vLLM's own video pruning, EVS, for any pre-LLM vtprune method):

1. the processor sizes each image / video's placeholder run to the exact kept count ``k = config.budget(n)``
   (``n`` = the item's visual tokens after the 2x2 merge), so the scheduler and the KV cache see the pruned prompt
   (a Qwen3-VL video: each frame's run to that frame's kept count, :func:`frame_plan`);
2. :meth:`get_mrope_input_positions` numbers the pruned prompt as the unpruned one: text after a run keeps its
   unpruned M-RoPE positions, so decode positions continue from the unpruned length (as vtprune's Hugging Face
   path does);
3. ``embed_multimodal`` runs the stock vision tower, hands each item's projected tokens ``[n, D]`` (and, for methods
   that ask, the patch merger's input per token with a float32 per-token copy of the merger, the attention each
   patch receives in the method's vision blocks with their head-mean keys, from the queries and keys vLLM's
   attention kernel gets, and the item's (t, h, w) grid) to the method's ``select`` (the code the Hugging Face path
   runs, ``vtprune.functional``) and returns the ``k`` kept rows (a merging method's merged vectors; Qwen3-VL: each
   row's DeepStack channels sliced, or merged with the method's weights, the same way), each with extra channels
   carrying its frame, rank in its run and original (t, h, w) position;
4. :meth:`recompute_mrope_positions` (called by the model runner once pruning is enabled there) strips those
   channels and writes the kept tokens' original positions into the request's M-RoPE positions.

Qwen3-VL videos are served only with methods whose kept tokens do not depend on the pixels (``random``, ``pool``;
see :data:`QWEN3_VIDEO_REFUSAL`). Without a ``vtprune`` setting in the model config both classes behave exactly as
vLLM's stock models.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from .. import functional as F
from ..engine.units import refill_frames
from ..methods.base import ImageInputs, Selection
from . import setting

#: values carried by each kept row in extra channels: the frame of the item it belongs to and the item's number of
#: frames (placeholder runs: Qwen3-VL videos have one per frame, every other item one), its rank among the kept
#: tokens of that run, and its original (t, h, w) position offset from the run's first position
VALUES = 6
#: each value as two base-256 digits, exact in bf16 / fp16 (integers up to 256 are exact there) below 65536
_DIGITS = 2
EXTRA = VALUES * _DIGITS

#: why Qwen3-VL videos are refused with a vtprune setting whose method is not in setting.frame_counts_ahead()
QWEN3_VIDEO_REFUSAL = (
    "vtprune.vllm prunes Qwen3-VL videos only with {ahead}: Qwen3-VL lays a video out as one placeholder run per "
    "frame between timestamp text ('<t seconds>'), and vLLM sizes those runs when the request arrives "
    "(Qwen3VLMultiModalProcessor._get_prompt_updates, through get_video_repl(tokens_per_frame=...)), before the "
    "vision tower runs; vtprune's Hugging Face path keeps each kept token in its own frame, so the plugin needs each "
    "frame's kept count before selecting. Only methods whose kept tokens do not depend on the pixels ({ahead}) "
    "give it; method {method!r} selects from the pixels. (vLLM's EVS instead puts all retained tokens in the first "
    "frame's run, ahead of the later frames' timestamps: a different prompt.) Serve Qwen3-VL with {method!r} for "
    "images only: start vLLM with --limit-mm-per-prompt '{{\"video\": 0}}' (or use vLLM's --video-pruning-rate "
    "without vtprune)"
)


def qwen3_video_refusal(method: str) -> str:
    return QWEN3_VIDEO_REFUSAL.format(ahead=" and ".join(sorted(setting.frame_counts_ahead())), method=method)


def frame_plan(config, method, t: int, h: int, w: int, merge: int) -> tuple[torch.Tensor, list[int]]:
    """A Qwen3-VL video's kept tokens and kept count per frame, known before the vision tower runs, for a method
    whose selection does not depend on the pixels (``setting.frame_counts_ahead()``): the method's ``select`` on
    zero features of the video's ``t`` frames of ``h x w`` merged tokens (its (t, h, w) patch grid ``t x h*merge x
    w*merge`` in ``extra["grid"]``, as the Hugging Face path hands it), then :func:`refill`. Returns ``(kept [k]
    ascending, counts [t])``."""
    n = t * h * w
    inputs = ImageInputs(
        n=n,
        k=config.budget(n),
        features=torch.zeros(n, 1),
        pack_crop_scores=lambda scores: scores.reshape(-1),
        extra={"grid": torch.tensor([[t, h * merge, w * merge]])},
    )
    chosen = method.select(inputs)
    if isinstance(chosen, Selection):
        return refill(config, torch.as_tensor(chosen.kept).long().cpu(), chosen.merged is not None, t, h * w)
    return refill(config, torch.as_tensor(chosen).long().cpu(), False, t, h * w)


def refill(config, kept: torch.Tensor, merged: bool, t: int, per: int) -> tuple[torch.Tensor, list[int]]:
    """As vtprune's Hugging Face path treats a video whose frames are separate runs: a frame the method left empty
    gets a token back (``empty_frames="refill"``, a method that does not merge; ``vtprune.engine.units
    .refill_frames``). Returns ``(kept, per-frame counts)`` for ``t`` frames of ``per`` tokens."""
    if config.empty_frames == "refill" and not merged and t > 1:
        kept = refill_frames(kept, [per] * t)
    return kept, torch.bincount(kept // per, minlength=t).tolist()


def _encode(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` ``[m, VALUES]`` int64 in [0, 65536) -> ``[m, EXTRA]`` channels (high, low digit per value)."""
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 256**_DIGITS):
        raise ValueError(
            f"vtprune.vllm: a position or rank of {int(values.max())} does not fit the extra channels "
            f"(allowed: 0 <= value < {256**_DIGITS})"
        )
    return torch.stack([values // 256, values % 256], dim=-1).reshape(values.shape[0], -1).to(dtype)


def _decode(channels: torch.Tensor) -> torch.Tensor:
    pairs = channels.float().round().long().reshape(channels.shape[0], -1, _DIGITS)
    return pairs[..., 0] * 256 + pairs[..., 1]


def grid_positions(t: int, h: int, w: int, t_factor: float = 1.0) -> np.ndarray:
    """M-RoPE (t, h, w) offsets ``[3, t*h*w]`` of an item's merged tokens from its first position, as vLLM's
    ``get_mrope_input_positions`` and transformers' ``get_rope_index`` number them (video: ``t * t_factor``,
    truncated)."""
    grid = np.indices((t, h, w))
    if t_factor != 1.0:
        grid[0] = (grid[0] * t_factor).astype(np.int64)
    return grid.reshape(3, -1)


class PerTokenMerger(nn.Module):
    """A float32 copy of a Qwen-VL patch merger as a per-token map ``[N, unit * D_vit]`` (a merged token's patches,
    concatenated, in the order the merger reads them) -> ``[N, D_lm]``: norm, Linear, GELU, Linear, as the merger
    computes (what vtprune's Hugging Face path hands ``zoo`` as ``projector``).

    Built from the merger's parameters when the weights load: vLLM's CPU linear layers drop their weight tensors
    afterwards (pre-packed kernels), and ``torch.func.jvp`` needs plain torch operations."""

    def __init__(self, merger: nn.Module, vit_dim: int):
        super().__init__()
        norm = getattr(merger, "ln_q", None) or getattr(merger, "norm", None)
        fc1 = merger.mlp[0] if hasattr(merger, "mlp") else getattr(merger, "linear_fc1", None)
        fc2 = merger.mlp[2] if hasattr(merger, "mlp") else getattr(merger, "linear_fc2", None)
        if norm is None or fc1 is None or fc2 is None:
            raise RuntimeError(
                f"vtprune.vllm: unknown patch merger layout ({type(merger).__name__}); expected a "
                "norm and two linear layers"
            )
        self.vit_dim = vit_dim
        self.postshuffle = bool(getattr(merger, "use_postshuffle_norm", False))
        if isinstance(norm, nn.LayerNorm):
            self.rms, self.eps = False, float(norm.eps)
        elif hasattr(norm, "variance_epsilon"):  # vLLM's RMSNorm
            self.rms, self.eps = True, float(norm.variance_epsilon)
        else:
            raise RuntimeError(f"vtprune.vllm: unknown patch-merger norm {type(norm).__name__}")

        def copy(t):
            return None if t is None else nn.Parameter(t.detach().float().clone(), requires_grad=False)

        self.norm_weight, self.norm_bias = copy(norm.weight), copy(getattr(norm, "bias", None))
        self.w1, self.b1 = copy(fc1.weight), copy(fc1.bias)
        self.w2, self.b2 = copy(fc2.weight), copy(fc2.bias)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight
        return nn.functional.layer_norm(x, x.shape[-1:], self.norm_weight, self.norm_bias, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = self._norm(x) if self.postshuffle else self._norm(x.reshape(-1, self.vit_dim)).reshape(n, -1)
        x = nn.functional.gelu(nn.functional.linear(x, self.w1, self.b1))
        return nn.functional.linear(x, self.w2, self.b2)


def _pruned_replacement(config, update: PromptReplacement) -> PromptReplacement:
    def pruned(item_idx: int):
        full = update.replacement(item_idx)
        return full[:1] * config.budget(len(full))

    return PromptReplacement(modality=update.modality, target=update.target, replacement=pruned)


class VTPruneQwen2_5_VLProcessor(Qwen2_5_VLMultiModalProcessor):
    """Placeholder runs sized to the kept count of the deployment's method and budget."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        config = setting.read(self.info.get_hf_config())
        if config is None:
            return updates
        return [_pruned_replacement(config, u) for u in updates]


class VTPruneQwen3VLProcessor(Qwen3VLMultiModalProcessor):
    """Image placeholder runs sized to the kept count; a video's per-frame runs sized to each frame's kept count
    (:func:`frame_plan`; only for methods in ``setting.frame_counts_ahead()``, others are refused)."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        config = setting.read(self.info.get_hf_config())
        if config is None:
            return updates
        hf_config = self.info.get_hf_config()
        merge = hf_config.vision_config.spatial_merge_size
        tokenizer = self.info.get_tokenizer()
        method = setting.method(config)

        def video(item_idx: int):
            if config.method not in setting.frame_counts_ahead():
                raise ValueError(qwen3_video_refusal(config.method))
            out_item = out_mm_kwargs["video"][item_idx]
            t, h, w = (int(v) for v in out_item["video_grid_thw"].data.tolist())
            timestamps = out_item["timestamps"].data
            _, counts = frame_plan(config, method, t, h // merge, w // merge, merge)
            # the stock layout (timestamp text, vision start, the frame's tokens, vision end per frame), each frame's
            # run holding its kept count
            return Qwen3VLMultiModalProcessor.get_video_repl(
                tokens_per_frame=counts,
                timestamps=timestamps,
                tokenizer=tokenizer,
                vision_start_token_id=hf_config.vision_start_token_id,
                vision_end_token_id=hf_config.vision_end_token_id,
                video_token_id=hf_config.video_token_id,
                select_token_id=True,
            )

        return [
            _pruned_replacement(config, u)
            if u.modality == "image"
            else PromptReplacement(modality=u.modality, target=u.target, replacement=video)
            for u in updates
        ]


class _Pruning:
    """What the pruning model classes share (mixed in before vLLM's model class)."""

    #: the vision tower's output channels per row beyond the projected feature (Qwen3-VL: DeepStack levels)
    _levels = 0

    def _init_vtprune(self, vllm_config) -> None:
        self.vtprune_config = setting.read(self.config)
        self.vtprune_method = None
        self.vtprune_projector: PerTokenMerger | None = None
        #: what each pruned item kept, in the order the encoder ran them: dicts with ``modality``, ``n``, ``kept``
        #: (ascending indices into the item's visual tokens) and ``select_ms`` (read with ``LLM.apply_model``)
        self.vtprune_log: list[dict] = []
        if self.vtprune_config is None:
            return
        if self.is_multimodal_pruning_enabled:
            raise ValueError(
                "vtprune cannot be combined with vLLM's video pruning (EVS): the 'vtprune' setting and "
                f"video_pruning_rate={self.video_pruning_rate} were both given; give one of them"
            )
        self.vtprune_method = setting.method(self.vtprune_config)
        compilation = vllm_config.compilation_config
        if getattr(compilation, "cudagraph_mm_encoder", False):
            raise ValueError(
                "vtprune cannot run with compilation_config.cudagraph_mm_encoder=True: the encoder's CUDA "
                "graph replaces embed_multimodal, where the plugin selects the kept tokens; turn it off"
            )
        if self._needs_projector() and getattr(compilation, "compile_mm_encoder", False):
            raise ValueError(
                f"method {self.vtprune_config.method!r} reads the patch merger's input, which a compiled "
                "vision encoder (compilation_config.compile_mm_encoder=True) does not show; turn it off "
                "or use a method that needs only the projected tokens (divprune, pool, random)"
            )
        #: vision blocks whose attention the method reads (importance="received"; empty: none)
        self._received_layers: list[int] = []
        if self._needs_received():
            if getattr(compilation, "compile_mm_encoder", False):
                raise ValueError(
                    f"method {self.vtprune_config.method!r} reads the vision tower's attention (the "
                    "attention each patch receives), which a compiled vision encoder "
                    "(compilation_config.compile_mm_encoder=True) does not show; turn it off or use a "
                    "method that needs only the projected tokens (divprune, pool, random)"
                )
            tp = vllm_config.parallel_config.tensor_parallel_size
            if tp > 1 or getattr(self, "use_data_parallel", False):
                raise ValueError(
                    f"method {self.vtprune_config.method!r} reads the vision tower's attention, which "
                    f"is split across processes with tensor_parallel_size={tp} (each holds part of the "
                    "heads, or with mm_encoder_tp_mode='data' part of the images); serve it with "
                    "tensor_parallel_size=1 or use a method that needs only the projected tokens"
                )
            self._received_layers = self.vtprune_method.vision_layers(len(self.visual.blocks))

    def _needs_projector(self) -> bool:
        return self.vtprune_method is not None and "projector_inputs" in self.vtprune_method.signals

    def _needs_received(self) -> bool:
        return self.vtprune_method is not None and bool(self.vtprune_method.signals & setting.RECEIVED)

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        if self._needs_projector():  # before the linear layers are pre-packed (vLLM's CPU kernels drop weights)
            merger = self.visual.merger
            # not a submodule: vLLM's loader checks that every parameter of the model came from the checkpoint
            object.__setattr__(
                self, "vtprune_projector", PerTokenMerger(merger, merger.hidden_size // self.visual.spatial_merge_unit)
            )
        return loaded

    # -- the merger's input per token ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _capture_merger_inputs(self, into: list):
        if not self._needs_projector():
            yield
            return
        # vLLM's compile decorator calls ``self.forward`` directly (module hooks do not run): wrap the instance's
        # forward for the duration of the call
        merger = self.visual.merger
        original = merger.forward

        def forward(x, *args, **kwargs):
            into.append(x.detach())
            return original(x, *args, **kwargs)

        merger.forward = forward
        try:
            yield
        finally:
            del merger.forward

    def _merger_token_order(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Merged-token order of the merger's input rows -> prompt order (None: the same)."""
        return None

    # -- the attention each patch receives (importance="received") ------------------------------------------------
    def _attention_blocks(self, grid: list[list[int]], layer: int) -> torch.Tensor:
        """``[B + 1]`` int64 boundaries of the blocks of patches that attend among themselves in vision block
        ``layer`` for a tower call on ``grid`` (in the tower's token order): one per frame. Computed from the grid,
        not read from the call: some attention backends (FlashInfer) receive the boundaries rescaled."""
        frames = [h * w for t, h, w in grid for _ in range(t)]
        return torch.tensor([0] + frames).cumsum(0)

    @contextlib.contextmanager
    def _capture_received(self, grid: list[list[int]], into: dict):
        """While the vision tower runs on ``grid``: for each of the method's vision blocks, the attention each patch
        receives (``into[layer] = [N]``, ``vtprune.functional.received_attention`` of the queries and keys the
        block's attention kernel gets, after vLLM's rotary embedding) and the head-mean keys (``into[("keys",
        layer)] = [N, Dh]``), in the tower's token order."""
        if not self._needs_received():
            yield
            return
        modules = []
        for layer in self._received_layers:
            kernel = self.visual.blocks[layer].attn.attn  # vLLM's MMEncoderAttention: q/k after the rotary embedding
            original = kernel.forward
            blocks = self._attention_blocks(grid, layer)

            def forward(*args, _layer=layer, _kernel=kernel, _original=original, _blocks=blocks, **kwargs):
                q = kwargs["query"] if "query" in kwargs else args[0]
                k = kwargs["key"] if "key" in kwargs else args[1]
                if q.dim() != 4 or q.shape[0] != 1 or k.shape[:2] != q.shape[:2]:
                    raise RuntimeError(
                        f"vtprune.vllm: vision block {_layer}'s attention got queries of shape "
                        f"{tuple(q.shape)} and keys {tuple(k.shape)}; expected [1, N, H, Dh]"
                    )
                if _layer in into:
                    raise RuntimeError(f"vtprune.vllm: vision block {_layer} ran twice in one tower call")
                into[_layer] = F.received_attention(q[0], k[0], _blocks.to(q.device), float(_kernel.scale))
                into[("keys", _layer)] = k[0].detach().mean(1)
                return _original(*args, **kwargs)

            kernel.forward = forward
            modules.append(kernel)
        try:
            yield
        finally:
            for kernel in modules:
                del kernel.forward

    def _split_received(self, into: dict, grid_thw: torch.Tensor, patches: list[int]):
        """Per item ``([1, L, P], [1, L, P, Dh])``: received attention and head-mean keys of the method's layers,
        each item's ``P`` patches in the processor's order (merge unit by merge unit), as vtprune's Hugging Face
        path hands them (``ImageInputs.received`` / ``vision_keys``)."""
        if not self._needs_received():
            return [(None, None)] * len(patches)
        missing = [layer for layer in self._received_layers if layer not in into]
        if missing:
            raise RuntimeError(
                f"vtprune.vllm: vision block(s) {missing} did not run their attention kernel (a "
                "compiled or CUDA-graphed vision encoder hides it)"
            )
        unit = self.visual.spatial_merge_unit
        order = self._merger_token_order(grid_thw)
        per_layer = []
        for layer in self._received_layers:
            scores, keys = into[layer], into[("keys", layer)]
            if order is not None:  # the tower holds merge units in window order: back to the processor's order
                at = order.to(scores.device)
                scores = scores.reshape(-1, unit)[at].reshape(-1)
                keys = keys.reshape(-1, unit, keys.shape[-1])[at].reshape(-1, keys.shape[-1])
            per_layer.append((torch.split(scores, patches), torch.split(keys, patches)))
        out = []
        for i in range(len(patches)):
            received = torch.stack([scores[i] for scores, _ in per_layer]).unsqueeze(0)  # [1, L, P]
            keys = torch.stack([keys[i] for _, keys in per_layer]).unsqueeze(0)  # [1, L, P, Dh]
            out.append((received, keys))
        return out

    def _split_projector_inputs(self, captured: list, grid_thw: torch.Tensor, sizes: list[int]):
        if not self._needs_projector():
            return [None] * len(sizes)
        if len(captured) != 1:
            raise RuntimeError(
                f"vtprune.vllm: the patch merger ran {len(captured)} times for one batch of items; "
                "expected once (a compiled vision encoder, compile_mm_encoder, hides its input)"
            )
        unit = self.visual.spatial_merge_unit
        tokens = captured[0].reshape(-1, unit * captured[0].shape[-1])
        order = self._merger_token_order(grid_thw)
        if order is not None:
            tokens = tokens[order.to(tokens.device)]
        return list(torch.split(tokens, sizes))

    # -- which tokens each item keeps ---------------------------------------------------------------------------
    def _items(self, modality: str, inputs):
        """The items' projected tokens, and per item the merger's input and the (received attention, keys)."""
        captured: list = []
        attention: dict = {}
        grid = inputs[f"{modality}_grid_thw"]
        with self._capture_merger_inputs(captured), self._capture_received(grid.tolist(), attention):
            if modality == "image":
                embeds = self._process_image_input(inputs)
            else:
                embeds = self._process_video_input(inputs)
        sizes = [e.shape[0] for e in embeds]
        received = self._split_received(attention, grid, [n * self.visual.spatial_merge_unit for n in sizes])
        return embeds, list(zip(self._split_projector_inputs(captured, grid, sizes), received))

    def _inputs(self, main: torch.Tensor, k: int, grid: tuple[int, int, int], signals) -> ImageInputs:
        projector_inputs, (received, vision_keys) = signals
        unit = self.visual.spatial_merge_unit

        def pack(scores: torch.Tensor) -> torch.Tensor:
            # per patch (received attention, [1, P]): a token's score is the mean of its merge unit's patches, as
            # vtprune's Qwen adapter pools them; per token ([1, n]): as they are
            if scores.numel() == main.shape[0] * unit:
                return scores.reshape(-1, unit).mean(dim=1)
            if scores.numel() != main.shape[0]:
                raise ValueError(
                    f"vtprune.vllm: scores of shape {tuple(scores.shape)} fit neither the "
                    f"{main.shape[0] * unit} patches nor the {main.shape[0]} tokens of the item"
                )
            return scores.reshape(-1)

        projector = None
        if projector_inputs is not None:
            projector = self.vtprune_projector
            check = projector(projector_inputs.float())
            scale = float(main.float().abs().max()) + 1e-6
            if not torch.allclose(check, main.float(), rtol=0.0, atol=0.02 * scale):
                raise RuntimeError(
                    "vtprune.vllm: the float32 copy of the patch merger does not reproduce the vision "
                    "tower's output (this vLLM version lays the merger out differently)"
                )
            projector_inputs = projector_inputs.unsqueeze(0)
        return ImageInputs(
            n=main.shape[0],
            k=k,
            features=main,
            projector_inputs=projector_inputs,
            projector=projector,
            received=received,
            vision_keys=vision_keys,
            pack_crop_scores=pack,
            token_patches=lambda crops, patches: torch.arange(crops * patches).view(-1, unit),
            extra={"grid": torch.tensor([grid])},
        )

    def _prune(
        self,
        embeds: Sequence[torch.Tensor],
        grid_thw: torch.Tensor,
        modality: str,
        t_factors: Sequence[float],
        signals: Sequence,
    ) -> tuple[torch.Tensor, ...]:
        merge = self.visual.spatial_merge_size
        width = embeds[0].shape[1] // (1 + self._levels) if embeds else 0
        out = []
        for emb, (t, h, w), t_factor, item_signals in zip(embeds, grid_thw.tolist(), t_factors, signals):
            n = emb.shape[0]
            k = self.vtprune_config.budget(n)
            main = emb[:, :width]
            start = time.perf_counter()
            chosen = self.vtprune_method.select(self._inputs(main, k, (t, h, w), item_signals))
            select_ms = (time.perf_counter() - start) * 1e3
            sel = chosen if isinstance(chosen, Selection) else Selection(torch.as_tensor(chosen))
            kept = torch.as_tensor(sel.kept, dtype=torch.long).cpu()
            if self._frame_runs(modality):  # a Qwen3-VL video: as the Hugging Face path, and as the prompt was sized
                hh, ww = h // merge, w // merge
                kept, counts = refill(self.vtprune_config, kept, sel.merged is not None, t, hh * ww)
                _, planned = frame_plan(self.vtprune_config, self.vtprune_method, t, hh, ww, merge)
                if counts != planned:
                    raise RuntimeError(
                        f"vtprune.vllm: method {self.vtprune_config.method!r} kept {counts} tokens per "
                        f"frame of a video whose prompt was sized for {planned}"
                    )
            if kept.numel() != k:
                raise RuntimeError(
                    f"vtprune.vllm: method {self.vtprune_config.method!r} kept {kept.numel()} of {n} "
                    f"tokens but the prompt was sized for {k}"
                )
            at = kept.to(emb.device)
            rows = [main[at] if sel.merged is None else sel.merged.to(emb.device, emb.dtype)]
            for i in range(self._levels):  # DeepStack levels follow the kept rows (merged: with the same weights)
                level = emb[:, width * (1 + i) : width * (2 + i)]
                if sel.merged is None:
                    rows.append(level[at])
                elif sel.weights is None:
                    raise ValueError(
                        f"method {self.vtprune_config.method!r} merges tokens without their merge "
                        "weights (Selection.weights): the DeepStack levels cannot follow them"
                    )
                else:
                    rows.append((sel.weights.to(emb.device, torch.float32) @ level.float()).to(emb.dtype))
            values = self._run_values(kept, modality, (t, h // merge, w // merge), t_factor)
            self.vtprune_log.append(dict(modality=modality, n=n, kept=kept.tolist(), select_ms=select_ms))
            out.append(torch.cat(rows + [_encode(values, emb.dtype).to(emb.device)], dim=1))
        return tuple(out)

    def embed_multimodal(self, **kwargs: object):
        if self.vtprune_config is None:
            return super().embed_multimodal(**kwargs)
        out: tuple[torch.Tensor, ...] = ()
        for modality, inputs in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if inputs is None:
                continue
            if inputs["type"] not in ("pixel_values", "pixel_values_videos") and (
                self._needs_projector() or self._needs_received()
            ):
                raise ValueError(
                    f"method {self.vtprune_config.method!r} needs the vision tower's internals (the "
                    "patch merger's input or its attention), which precomputed "
                    f"{modality} embeddings ({inputs['type']!r}) do not carry; send pixels"
                )
            if modality == "image":
                embeds, proj = self._items("image", inputs)
                out += self._prune(embeds, inputs["image_grid_thw"], "image", [1.0] * len(embeds), proj)
            elif modality == "video":
                embeds, proj = self._items("video", inputs)
                out += self._prune(embeds, inputs["video_grid_thw"], "video", self._time_factors(inputs, embeds), proj)
        return out

    def _time_factors(self, inputs, embeds) -> list[float]:
        return [1.0] * len(embeds)

    def _frame_runs(self, modality: str) -> bool:
        """Whether an item of ``modality`` is one placeholder run per frame (Qwen3-VL videos)."""
        return False

    def _run_values(self, kept: torch.Tensor, modality: str, grid: tuple[int, int, int], t_factor: float):
        """``[k, VALUES]``: per kept token (ascending indices into the item's tokens) its frame, the item's number of
        frames, its rank in its frame's run and its (t, h, w) offset from the run's first position."""
        t, h, w = grid
        k = kept.numel()
        if self._frame_runs(modality):
            per = h * w
            frame = kept // per
            first = torch.searchsorted(frame, frame)  # index of the frame's first kept token (kept ascends)
            rank = torch.arange(k) - first
            pos = torch.from_numpy(grid_positions(1, h, w))[:, kept % per]
            head = torch.stack([frame, torch.full_like(frame, t), rank])
        else:
            pos = torch.from_numpy(grid_positions(t, h, w, t_factor))[:, kept]
            head = torch.stack([torch.zeros(k, dtype=torch.long), torch.ones(k, dtype=torch.long), torch.arange(k)])
        return torch.cat([head, pos.long()]).T

    # -- positions ------------------------------------------------------------------------------------------------
    def _grids(self, input_tokens, mm_features):
        """``(offset, t, h, w, t_factor, k)`` of each placeholder run, in prompt order (h, w in merged tokens; ``k``
        the run's kept count)."""
        raise NotImplementedError

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """The pruned prompt's positions: text as in the unpruned prompt; each run's ``k`` placeholders hold
        stand-ins until :meth:`recompute_mrope_positions` writes the kept tokens' original positions."""
        if self.vtprune_config is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        chunks, st, next_pos = [], 0, 0
        for offset, t, h, w, t_factor, k in self._grids(input_tokens, mm_features):
            text_len = offset - st
            chunks.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_pos)
            full = grid_positions(t, h, w, t_factor) + text_len + next_pos
            chunks.append(full[:, :k])
            next_pos = int(full.max()) + 1
            st = offset + k
        if st < len(input_tokens):
            text_len = len(input_tokens) - st
            chunks.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_pos)
            next_pos += text_len
        positions = np.concatenate(chunks, axis=1).reshape(3, -1)
        return torch.from_numpy(positions), next_pos - len(input_tokens)

    def _runs(self, ids: torch.Tensor) -> list[tuple[int, int]]:
        """``(start, end)`` of every placeholder run of the prompt ``ids``, in order: each maximal run of image /
        video tokens, and an empty run after each vision-start token followed directly by vision-end (a Qwen3-VL
        video frame that keeps no token)."""
        cfg = self.config
        visual = (ids == cfg.image_token_id) | (ids == cfg.video_token_id)
        where = visual.nonzero().squeeze(1)
        breaks = (where[1:] != where[:-1] + 1).nonzero().squeeze(1) + 1
        runs = [(int(r[0]), int(r[-1]) + 1) for r in torch.tensor_split(where, breaks.tolist()) if r.numel()]
        empty = ((ids[:-1] == cfg.vision_start_token_id) & (ids[1:] == cfg.vision_end_token_id)).nonzero()
        runs += [(int(i) + 1, int(i) + 1) for i in empty.squeeze(1)]
        return sorted(runs)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """Write the kept tokens' original positions (carried in the extra channels) into ``mrope_positions``
        ``[3, N]`` of the whole prompt; ``multimodal_embeddings`` are the slices of the items this step's chunk
        covers, in prompt order (a slice may be part of an item under chunked prefill). Returns the rows without
        the extra channels (Qwen3-VL: the projected feature and its DeepStack levels, as vLLM splits them)."""
        if self.vtprune_config is None:
            return super().recompute_mrope_positions(
                input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens
            )
        ids = torch.as_tensor(input_ids, dtype=torch.long).cpu()
        runs = self._runs(ids)
        positions = mrope_positions.clone()
        out = []
        item = None  # index of the current item's first run
        for emb in multimodal_embeddings:
            values = _decode(emb[:, -EXTRA:]).to(positions.device)  # [m, VALUES]
            frame, frames, rank, offsets = values[:, 0], values[:, 1], values[:, 2], values[:, 3:]
            if item is None:  # the first slice may start inside its item: at the first kept token to compute
                here = next(i for i, (start, end) in enumerate(runs) if end > start and end > num_computed_tokens)
                item = here - int(frame[0])
            starts = torch.tensor([runs[item + f][0] for f in range(int(frames[0]))], device=positions.device)
            slots = starts[frame] + rank
            base = positions[0, starts[frame] - 1] + 1  # each run's first position: one past its vision-start token
            positions[:, slots] = base + offsets.T
            out.append(emb[:, :-EXTRA])
            item += int(frames[0])
        delta = int(positions.max()) + 1 - ids.numel()
        return out, positions, delta


@MULTIMODAL_REGISTRY.register_processor(
    VTPruneQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class VTPruneQwen2_5_VL(_Pruning, Qwen2_5_VLForConditionalGeneration):
    """vLLM's ``Qwen2_5_VLForConditionalGeneration`` with the deployment's vtprune method before the LLM."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_vtprune(vllm_config)

    def _merger_token_order(self, grid_thw):
        # the merger runs in window order; the tower puts its output back with these indices
        meta = self.visual.prepare_encoder_metadata(grid_thw.tolist())
        return meta["reverse_indices"]

    def _attention_blocks(self, grid, layer):
        # full-attention blocks: one block per frame; the others: the attention windows, from the tower's own
        # per-item window index (as its prepare_encoder_metadata concatenates them, without a backend's rescaling)
        if layer in self.visual.fullatt_block_indexes:
            return super()._attention_blocks(grid, layer)
        bounds, last = [torch.zeros(1, dtype=torch.long)], 0
        for t, h, w in grid:
            _, cu = self.visual.get_window_index_thw(int(t), int(h), int(w))
            bounds.append(cu.long() + last)
            last = int(bounds[-1][-1])
        return torch.unique_consecutive(torch.cat(bounds))

    def _time_factors(self, inputs, embeds):
        seconds = inputs.get("second_per_grid_ts")
        per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        return (
            [1.0] * len(embeds)
            if seconds is None
            else [float(s) * per_second for s in torch.as_tensor(seconds).flatten().tolist()]
        )

    def _grids(self, input_tokens, mm_features):
        lengths = {f.mm_position.offset: f.mm_position.length for f in mm_features}
        for offset, t, h, w, t_factor in self.iter_mm_grid_thw(mm_features):
            yield offset, t, h, w, t_factor, lengths[offset]


@MULTIMODAL_REGISTRY.register_processor(
    VTPruneQwen3VLProcessor, info=Qwen3VLProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class VTPruneQwen3VL(_Pruning, Qwen3VLForConditionalGeneration):
    """vLLM's ``Qwen3VLForConditionalGeneration`` with the deployment's vtprune method before the LLM, on images
    (several per prompt) and, for methods whose kept tokens do not depend on the pixels
    (``setting.frame_counts_ahead()``), videos (each frame's run holding that frame's kept tokens); every DeepStack
    level follows the kept rows. Other methods with videos allowed are refused (:func:`qwen3_video_refusal`)."""

    def __init__(self, *, vllm_config, prefix: str = "model"):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_vtprune(vllm_config)
        if self.vtprune_config is None:
            return
        self._levels = self.deepstack_num_level if self.use_deepstack else 0
        if (
            self.multimodal_config.get_limit_per_prompt("video") > 0
            and self.vtprune_config.method not in setting.frame_counts_ahead()
        ):
            raise ValueError(qwen3_video_refusal(self.vtprune_config.method))

    def _frame_runs(self, modality):
        return modality == "video"

    def _grids(self, input_tokens, mm_features):
        merge = self.config.vision_config.spatial_merge_size
        for f in sorted(mm_features, key=lambda f: f.mm_position.offset):
            offset, length = f.mm_position.offset, f.mm_position.length
            if f.modality == "image":
                t, h, w = f.data["image_grid_thw"].data.tolist()
                yield offset, t, h // merge, w // merge, 1.0, length
                continue
            t, h, w = f.data["video_grid_thw"].data.tolist()
            # one run per frame after its timestamp text and vision-start token (positions: a 1 x h x w grid each)
            runs = [
                (s, e)
                for s, e in self._runs(torch.as_tensor(list(input_tokens), dtype=torch.long))
                if offset <= s < offset + length
            ]
            if len(runs) != t:
                raise RuntimeError(
                    f"vtprune.vllm: a Qwen3-VL video of {t} frames has {len(runs)} placeholder runs "
                    f"in its prompt ({length} tokens from position {offset})"
                )
            for start, end in runs:
                yield start, 1, h // merge, w // merge, 1.0, end - start
