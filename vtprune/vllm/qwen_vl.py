"""vLLM's Qwen2.5-VL with pre-LLM visual-token pruning (registered by :func:`vtprune.vllm.register`).

How a pruned request runs (the same steps as vLLM's own video pruning, EVS, for any pre-LLM vtprune method):

1. the processor sizes each image / video's placeholder run to the exact kept count ``k = config.budget(n)``
   (``n`` = the item's visual tokens after the 2x2 merge), so the scheduler and the KV cache see the pruned prompt;
2. :meth:`get_mrope_input_positions` numbers the pruned prompt as the unpruned one: text after an item keeps its
   unpruned M-RoPE positions, so decode positions continue from the unpruned length (as vtprune's Hugging Face
   path does);
3. ``embed_multimodal`` runs the stock vision tower, hands each item's projected tokens ``[n, D]`` to the method's
   ``select`` (the code the Hugging Face path runs, ``vtprune.functional``) and returns the ``k`` kept rows, each
   with extra channels carrying its rank among the kept tokens and its original (t, h, w) position;
4. :meth:`recompute_mrope_positions` (called by the model runner once pruning is enabled there) strips those
   channels and writes the kept tokens' original positions into the request's M-RoPE positions.

Without a ``vtprune`` setting in the model config the class behaves exactly as vLLM's stock model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from ..methods.base import ImageInputs
from . import setting

#: extra channels appended to each kept row: (rank, t, h, w), each as two base-256 digits so that they are exact
#: in bf16 / fp16 (integers up to 256 are exact there) for values below 65536
_DIGITS = 2
EXTRA = 4 * _DIGITS


def _encode(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` ``[m, 4]`` int64 in [0, 65536) -> ``[m, 8]`` channels (high digit, low digit per value)."""
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 256**_DIGITS):
        raise ValueError(f"vtprune.vllm: a position or rank of {int(values.max())} does not fit the extra channels "
                         f"(allowed: 0 <= value < {256 ** _DIGITS})")
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


class VTPruneQwen2_5_VLProcessor(Qwen2_5_VLMultiModalProcessor):
    """Placeholder runs sized to the kept count of the deployment's method and budget."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        config = setting.read(self.info.get_hf_config())
        if config is None:
            return updates

        def pruned(item_idx: int, update: PromptReplacement):
            full = update.replacement(item_idx)
            return full[:1] * config.budget(len(full))

        return [PromptReplacement(modality=u.modality, target=u.target, replacement=partial(pruned, update=u))
                for u in updates]


@MULTIMODAL_REGISTRY.register_processor(
    VTPruneQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class VTPruneQwen2_5_VL(Qwen2_5_VLForConditionalGeneration):
    """vLLM's ``Qwen2_5_VLForConditionalGeneration`` with the deployment's vtprune method before the LLM."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtprune_config = setting.read(self.config)
        self.vtprune_method = None
        #: what each pruned item kept, in the order the encoder ran them: dicts with ``modality``, ``n``, ``kept``
        #: (ascending indices into the item's visual tokens) and ``select_ms`` (read with ``LLM.apply_model``)
        self.vtprune_log: list[dict] = []
        if self.vtprune_config is None:
            return
        if self.is_multimodal_pruning_enabled:
            raise ValueError("vtprune cannot be combined with vLLM's video pruning (EVS): the 'vtprune' setting and "
                             f"video_pruning_rate={self.video_pruning_rate} were both given; give one of them")
        self.vtprune_method = setting.method(self.vtprune_config)

    # -- which tokens each item keeps ---------------------------------------------------------------------------
    def _prune(self, embeds: Sequence[torch.Tensor], grid_thw: torch.Tensor, modality: str,
               t_factors: Sequence[float]) -> tuple[torch.Tensor, ...]:
        merge = self.visual.spatial_merge_size
        out = []
        for emb, (t, h, w), t_factor in zip(embeds, grid_thw.tolist(), t_factors):
            n = emb.shape[0]
            k = self.vtprune_config.budget(n)
            start = time.perf_counter()
            kept = self.vtprune_method.select(ImageInputs(n=n, k=k, features=emb))
            select_ms = (time.perf_counter() - start) * 1e3
            kept = torch.as_tensor(kept, dtype=torch.long).cpu()
            if kept.numel() != k:
                raise RuntimeError(f"vtprune.vllm: method {self.vtprune_config.method!r} kept {kept.numel()} of {n} "
                                   f"tokens but the prompt was sized for {k}")
            pos = torch.from_numpy(grid_positions(t, h // merge, w // merge, t_factor))[:, kept]
            values = torch.cat([torch.arange(k)[None], pos]).T  # [k, 4]: rank, t, h, w
            self.vtprune_log.append(dict(modality=modality, n=n, kept=kept.tolist(), select_ms=select_ms))
            out.append(torch.cat([emb[kept.to(emb.device)], _encode(values, emb.dtype).to(emb.device)], dim=1))
        return tuple(out)

    def embed_multimodal(self, **kwargs: object):
        if self.vtprune_config is None:
            return super().embed_multimodal(**kwargs)
        out: tuple[torch.Tensor, ...] = ()
        for modality, inputs in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality == "image":
                embeds = self._process_image_input(inputs)
                out += self._prune(embeds, inputs["image_grid_thw"], "image", [1.0] * len(embeds))
            elif modality == "video":
                embeds = self._process_video_input(inputs)
                seconds = inputs.get("second_per_grid_ts")
                per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
                factors = ([1.0] * len(embeds) if seconds is None
                           else [float(s) * per_second for s in torch.as_tensor(seconds).flatten().tolist()])
                out += self._prune(embeds, inputs["video_grid_thw"], "video", factors)
        return out

    # -- positions ------------------------------------------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens, mm_features):
        """The pruned prompt's positions: text as in the unpruned prompt; each item's ``k`` placeholders hold
        stand-ins until :meth:`recompute_mrope_positions` writes the kept tokens' original positions."""
        if self.vtprune_config is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        lengths = {f.mm_position.offset: f.mm_position.length for f in mm_features}
        chunks, st, next_pos = [], 0, 0
        for offset, t, h, w, t_factor in self.iter_mm_grid_thw(mm_features):
            text_len = offset - st
            chunks.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_pos)
            full = grid_positions(t, h, w, t_factor) + text_len + next_pos
            k = lengths[offset]
            chunks.append(full[:, :k])
            next_pos = int(full.max()) + 1
            st = offset + k
        if st < len(input_tokens):
            text_len = len(input_tokens) - st
            chunks.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_pos)
            next_pos += text_len
        positions = np.concatenate(chunks, axis=1).reshape(3, -1)
        return torch.from_numpy(positions), next_pos - len(input_tokens)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """Write the kept tokens' original positions (carried in the extra channels) into ``mrope_positions``
        ``[3, N]`` of the whole prompt; ``multimodal_embeddings`` are the slices of the items this step's chunk
        covers, in prompt order (a slice may be part of an item under chunked prefill)."""
        if self.vtprune_config is None:
            return super().recompute_mrope_positions(input_ids, multimodal_embeddings, mrope_positions,
                                                     num_computed_tokens)
        ids = torch.as_tensor(input_ids, dtype=torch.long).cpu()
        visual = (ids == self.config.image_token_id) | (ids == self.config.video_token_id)
        where = visual.nonzero().squeeze(1)
        breaks = (where[1:] != where[:-1] + 1).nonzero().squeeze(1) + 1
        runs = [(int(r[0]), int(r[-1]) + 1) for r in torch.tensor_split(where, breaks.tolist()) if r.numel()]
        first = next((i for i, (_, end) in enumerate(runs) if end > num_computed_tokens), len(runs))
        positions = mrope_positions.clone()
        out = []
        for i, emb in enumerate(multimodal_embeddings):
            start, end = runs[first + i]
            values = _decode(emb[:, -EXTRA:]).to(positions.device)  # [m, 4]
            base = positions[0, start - 1] + 1  # the item's first position: one past the vision-start token
            positions[:, start + values[:, 0]] = base + values[:, 1:].T
            out.append(emb[:, :-EXTRA])
        delta = int(positions.max()) + 1 - ids.numel()
        return out, positions, delta
