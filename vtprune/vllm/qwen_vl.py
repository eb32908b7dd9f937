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

The steps live in modules by responsibility: :mod:`~vtprune.vllm.sizing` (1: the processors),
:mod:`~vtprune.vllm.positions` (2 and 4), :mod:`~vtprune.vllm.capture` and :mod:`~vtprune.vllm.pruning` (3); Qwen's
grid (merge units, window order, the per-token merger) is :mod:`vtprune.adapters.qwen_grid`, shared with the Hugging
Face adapter. This module holds the two model classes vLLM registers.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..adapters.qwen_grid import PerTokenMerger, grid_positions
from . import setting
from .positions import EXTRA, VALUES
from .pruning import Pruning
from .sizing import (
    QWEN3_VIDEO_REFUSAL,
    VTPruneQwen2_5_VLProcessor,
    VTPruneQwen3VLProcessor,
    frame_plan,
    qwen3_video_refusal,
    refill,
)

__all__ = [
    "EXTRA",
    "QWEN3_VIDEO_REFUSAL",
    "VALUES",
    "PerTokenMerger",
    "VTPruneQwen2_5_VL",
    "VTPruneQwen2_5_VLProcessor",
    "VTPruneQwen3VL",
    "VTPruneQwen3VLProcessor",
    "frame_plan",
    "grid_positions",
    "qwen3_video_refusal",
    "refill",
]


@MULTIMODAL_REGISTRY.register_processor(
    VTPruneQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class VTPruneQwen2_5_VL(Pruning, Qwen2_5_VLForConditionalGeneration):
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
class VTPruneQwen3VL(Pruning, Qwen3VLForConditionalGeneration):
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
