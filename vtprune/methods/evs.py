"""``evs``: NVIDIA's Efficient Video Sampling, as vLLM runs it: keep the video tokens that changed most since the
same position of the previous frame (the first frame whole), one global ranking over the video.

Official: vllm-project/vllm ``vllm/multimodal/evs.py``, ``compute_retained_tokens_count`` (lines 17-36) and
``compute_retention_mask`` (lines 39-92), commit 094f117823287790739d3022162a3f30f13d758b; vLLM applies it to
Qwen2.5-VL / Qwen3-VL / Qwen3.5 video embeddings after the merger and keeps the kept tokens' original ``(t, h, w)``
M-RoPE positions (``recompute_mrope_positions``), as vtprune does. The math is
:func:`vtprune.functional.evs_select`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import functional as F
from ..config import PruneConfig
from ..functional.evs import evs_count
from ..registry import register_method
from .base import Method, VisionInputs, video_tokens


@dataclass
class EVSConfig(PruneConfig):
    """EVS options. The budget is exactly one of:

    * ``q``: vLLM's pruning rate (``--video-pruning-rate``), in ``[0, 1)``: a video of ``T`` frames of ``N`` tokens
      keeps ``max(N, int(T * N * (1 - q)))`` tokens (vLLM's count, Python float arithmetic), so never fewer than a
      frame's worth; ``q=0`` keeps everything.
    * ``keep`` / ``ratio``: the usual budget of the video (``keep=N`` tokens, ``ratio=r`` -> ``max(1, round(r * n))``
      of its ``n`` tokens), the same ranking cut at that count (it may then cut into the first frame, lowest index
      first).
    """

    q: float | None = None

    def check_budget_fields(self) -> None:
        if self.q is None:
            super().check_budget_fields()
            return
        if self.keep is not None or self.ratio is not None:
            raise ValueError(
                "evs: give exactly one budget: q= (pruning rate), keep= or ratio=; got "
                f"q={self.q!r}, keep={self.keep!r}, ratio={self.ratio!r}"
            )
        if isinstance(self.q, bool) or not isinstance(self.q, (int, float)):
            raise TypeError(
                f"evs: q must be a float in [0, 1) (pruning rate), got {self.q!r} ({type(self.q).__name__})"
            )
        if not (0.0 <= float(self.q) < 1.0) or math.isnan(self.q):
            raise ValueError(
                f"evs: q must be in [0, 1) (pruning rate: the share of video tokens dropped), got {self.q}"
            )
        self.q = float(self.q)

    def budget(self, n: int) -> int:
        """``q``: ``max(1, int(n * (1 - q)))`` (the nominal count; the video keeps at least one frame's tokens, see
        :class:`EVS`); else the usual budget."""
        if self.q is None or n <= 0:
            return super().budget(n)
        return max(1, int(n * (1 - self.q)))


@register_method("evs", EVSConfig)
class EVS(Method):
    """Keep the video tokens of largest ``1 - cos(x[t, i], x[t - 1, i])`` (first frame: maximal), ranked over the
    whole video (stable: ties -> lower flat index). Videos only: an image in the prompt is kept whole, with a warning
    (``vtprune.engine.points``). With ``q`` the count is vLLM's, ``max(N, int(T * N * (1 - q)))`` (``kept_count``
    ``"own"``); with ``keep`` / ``ratio`` exactly the budget."""

    stage = "vision"
    signals = frozenset({"features"})
    modalities = frozenset({"video"})

    def __init__(self, config: EVSConfig):
        super().__init__(config)
        if config.q is not None:
            self.kept_count = "own"

    def grid_count(self, n: int, frames: int | None = None) -> int | None:
        """``q``: vLLM's count ``max(N, int(T * N * (1 - q)))`` of a video of ``frames`` frames (None without them);
        else the budget."""
        if self.config.q is None:
            return super().grid_count(n, frames)
        return evs_count(n // frames, frames, self.config.q) if frames else None

    def select(self, image: VisionInputs) -> torch.Tensor:
        video = video_tokens(image, self.name)
        if self.config.q is None:
            return F.evs_select(video, k=image.k)
        frames, per_frame = video.shape[:2]
        return F.evs_select(video, k=evs_count(per_frame, frames, self.config.q))
