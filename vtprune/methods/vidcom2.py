"""``vidcom2``: VidCom2's frame-uniqueness budgets, then per frame the tokens least like the video and the frame.

Official: xuyang-liu16/VidCom2 ``token_compressor/vidcom2/vidcom2.py``: ``vidcom2_compression`` (lines 15-36),
``select_low_var_channels``, ``compute_gaussian_scores``, ``compute_scales`` and ``select_outlier_indices`` (lines
38-78), commit d31b1560e4ddcd0e7bbceb48dd933a9f634d8905 (the same file as branch ``qwen`` a85d485c, whose
``models/qwen2_5_vl.py`` calls it once per video with ``base_scale = R_RATIO``). The math is
:func:`vtprune.functional.vidcom2_select`. Deviations from the official Qwen patches: compression also runs at batch
size > 1 (they turn it off), and kept tokens keep their original M-RoPE positions (they reuse offsets computed
before pruning, which the unpruned prompt's later text then no longer matches).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import functional as F
from ..config import PruneConfig
from ..functional.video import check_fraction
from ..registry import register_method
from .base import Method, VisionInputs, video_tokens


@dataclass
class VidCom2Config(PruneConfig):
    """VidCom2 options (budget: ``ratio``, the official ``R_RATIO``; ``keep=K`` runs the same rule at
    ``ratio = K / n`` of the video's ``n`` tokens). The kept count is VidCom2's own, about ``ratio * n``: per frame
    ``max(1, round(N * min(1, ratio * (1 + p_t - mean p))))``.

    * ``temperature`` (0.01): softmax temperature of the frame uniqueness (official ``temp``).
    * ``channel_ratio`` (0.5): share of lowest-variance channels scored (official ``ratio`` of
      ``select_low_var_channels``).
    """

    temperature: float = 0.01
    channel_ratio: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        check_fraction("temperature", self.temperature, low_open=True, high_open=True, high=float("inf"))
        check_fraction("channel_ratio", self.channel_ratio, low_open=True, high_open=False)


@register_method("vidcom2", VidCom2Config)
class VidCom2(Method):
    """Per frame ``t``, VidCom2's budget from the frame's uniqueness, filled with the tokens of lowest
    ``G(x, video centre) + G(x, frame centre)`` (:func:`vtprune.functional.vidcom2_select`). Videos only: an image in
    the prompt is kept whole, with a warning (``vtprune.engine.points``). A budget that keeps every token (``ratio=1``)
    leaves the video whole (the official rule would still cut frames of below-mean uniqueness)."""

    stage = "vision"
    signals = frozenset({"features"})
    modalities = frozenset({"video"})
    kept_count = "own"  # about ratio * n: the per-frame counts are rounded separately

    def select(self, image: VisionInputs) -> torch.Tensor:
        video = video_tokens(image, self.name)
        ratio = self.config.ratio if self.config.ratio is not None else image.k / image.n
        cfg = self.config
        return F.vidcom2_select(video, ratio, temperature=cfg.temperature, channel_ratio=cfg.channel_ratio)
