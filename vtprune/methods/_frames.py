"""What the video methods that read attention (``fastvid``, ``flashvid``) share: the refusal of a family whose
videos give no per-frame attention, and each frame's received attention from the engine's signals."""

from __future__ import annotations

import torch

from .base import ImageInputs


def check_frame_attention(method: str, adapter) -> None:
    """``ValueError`` naming ``method`` unless the model's adapter gives a video's per-frame attention
    (:attr:`vtprune.adapters.ModelAdapter.frame_attention`, then its ``check_frame_attention`` of the model's
    settings)."""
    if not adapter.frame_attention:
        from ..adapters import _ADAPTERS

        able = sorted(t for t, cls in _ADAPTERS.items() if cls.frame_attention)
        raise ValueError(
            f"{method} reads each video frame's attention in the last vision block, which vtprune does not map to "
            f"the frame's tokens on {adapter.config.model_type!r} models "
            "(e.g. bilinearly pooled or timestamped frames); "
            f"supported: {able}"
        )
    adapter.check_frame_attention()


def video_frames(method: str, image: ImageInputs) -> tuple[int, int]:
    """``(T, N)``: the video's frames and tokens per frame; ``ValueError`` for an image (or a unit that is not ``T``
    equal frames), which a video-only method is never given."""
    if image.frames is None:
        raise ValueError(
            f"{method} prunes videos only (modalities={{'video'}}); it was handed a unit of {image.n} tokens that "
            "is not a video of equal frames"
        )
    return image.frames, image.n // image.frames


def frame_attention(image: ImageInputs, frames: int) -> torch.Tensor:
    """``[T, N]`` float32: each video token's score in the method's one vision layer under ``importance="received"``
    (what the method's :meth:`~vtprune.methods.base.Method.received_attention` reduces that layer's q / k to: by
    default the attention each patch receives, the mean over heads and the queries of its frame), a token's the mean
    of its patches' (Qwen: the 2x2 merge unit, as official FlashVID averages it; ``pack_crop_scores``)."""
    scores = image.pack_crop_scores(image.received.float().sum(dim=1))  # [n]
    return scores.reshape(frames, -1)
