"""Which tokens each item keeps (step 3 of :mod:`vtprune.vllm.qwen_vl`): the deployment's checks when the model is
built, the float32 per-token patch merger made when the weights load, and ``embed_multimodal`` running the stock
vision tower and the method's ``select`` (the code vtprune's Hugging Face path runs) on each image / video, returning
its kept (or merged) rows with their DeepStack levels and the extra channels of :mod:`vtprune.vllm.positions`.
No vLLM import.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ..adapters import qwen_grid
from ..methods.base import ImageInputs, Selection
from . import setting
from .capture import Capture
from .positions import Positions, encode_values
from .sizing import frame_plan, kept_count, refill


class Pruning(Capture, Positions):
    """What the pruning model classes share (mixed in before vLLM's model class)."""

    #: the vision tower's output channels per row beyond the projected feature (Qwen3-VL: DeepStack levels)
    _levels = 0

    def _init_vtprune(self, vllm_config) -> None:
        self.vtprune_config = setting.read(self.config)
        self.vtprune_method = None
        self.vtprune_projector: qwen_grid.PerTokenMerger | None = None
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
                self,
                "vtprune_projector",
                qwen_grid.PerTokenMerger.float32_copy(merger, merger.hidden_size // self.visual.spatial_merge_unit),
            )
        return loaded

    # -- which tokens each item keeps ---------------------------------------------------------------------------
    def _inputs(
        self, main: torch.Tensor, k: int, grid: tuple[int, int, int], signals, frames: int | None = None
    ) -> ImageInputs:
        projector_inputs, (received, vision_keys) = signals
        unit = self.visual.spatial_merge_unit

        def pack(scores: torch.Tensor) -> torch.Tensor:
            # per patch (received attention, [1, P]): a token's score is the mean of its merge unit's patches, as
            # vtprune's Qwen adapter pools them; per token ([1, n]): as they are
            return qwen_grid.pool_merge_units(scores, main.shape[0], unit)

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
            token_patches=lambda crops, patches: qwen_grid.token_patches(crops, patches, unit),
            extra={"grid": torch.tensor([grid])},
            frames=frames,
            n_original=main.shape[0],
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
            frames = t if modality == "video" else None
            k = kept_count(self.vtprune_config, self.vtprune_method, modality, n, frames)
            main = emb[:, :width]
            start = time.perf_counter()
            chosen = self.vtprune_method.select(self._inputs(main, k, (t, h, w), item_signals, frames))
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
            out.append(torch.cat(rows + [encode_values(values, emb.dtype).to(emb.device)], dim=1))
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
