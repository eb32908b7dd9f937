"""Processor sizing: each image / video's placeholder run holds exactly the kept count of the deployment's method,
so vLLM's scheduler and KV cache see the pruned prompt (step 1 of :mod:`vtprune.vllm.qwen_vl`).

An image (and a Qwen2.5-VL video) is one run of ``k = config.budget(n)`` placeholders (``n`` its visual tokens after
the 2x2 merge). A Qwen3-VL video is one run per frame between timestamp text, each sized to that frame's kept count
(:func:`frame_plan`), known before the vision tower runs only for methods whose kept tokens do not depend on the
pixels (``setting.frame_counts_ahead()``); other methods are refused (:func:`qwen3_video_refusal`).
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLMultiModalProcessor
from vllm.model_executor.models.qwen3_vl import Qwen3VLMultiModalProcessor
from vllm.multimodal.processing import PromptReplacement

from ..engine.units import refill_frames
from ..methods.base import ImageInputs, Selection
from . import setting

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


#: why a request with an image is refused under a method that prunes videos only
IMAGE_REFUSAL = (
    "vtprune.vllm: method {method!r} prunes videos only (its registry record's modalities: {modalities}), and this "
    "request has an image; the plugin sizes every image's placeholder run to a pruned count, so it refuses the image "
    "instead of keeping it whole (vtprune's Hugging Face path keeps it whole). Serve {method!r} for videos only: start "
    "vLLM with --limit-mm-per-prompt '{{\"image\": 0}}', or choose a method that prunes images"
)


def kept_count(config, method, modality: str, n: int, frames: int | None) -> int:
    """The kept count of an image / video of ``n`` tokens (a video: ``frames`` frames) as the prompt is sized:
    ``Method.grid_count``; a modality the method does not prune is refused (:data:`IMAGE_REFUSAL`)."""
    if modality not in method.modalities:
        raise ValueError(IMAGE_REFUSAL.format(method=config.method, modalities=sorted(method.modalities)))
    return method.grid_count(n, frames if modality == "video" else None)


def _pruned_replacement(config, update: PromptReplacement, out_mm_kwargs=None) -> PromptReplacement:
    method = setting.method(config)

    def pruned(item_idx: int):
        full = update.replacement(item_idx)
        frames = None
        if update.modality == "video" and out_mm_kwargs is not None:
            frames = int(out_mm_kwargs["video"][item_idx]["video_grid_thw"].data[0])
        return full[:1] * kept_count(config, method, update.modality, len(full), frames)

    return PromptReplacement(modality=update.modality, target=update.target, replacement=pruned)


class VTPruneQwen2_5_VLProcessor(Qwen2_5_VLMultiModalProcessor):
    """Placeholder runs sized to the kept count of the deployment's method and budget."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        config = setting.read(self.info.get_hf_config())
        if config is None:
            return updates
        return [_pruned_replacement(config, u, out_mm_kwargs) for u in updates]


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
