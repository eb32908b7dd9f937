"""VidCom2: per-frame budgets from frame uniqueness, then per frame the tokens least like the video and frame."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import compute_dtype, topk_lowtie
from .video import check_fraction, check_video

__all__ = ["vidcom2_select", "vidcom2_scores"]

_ALPHAS = (0.125, 0.25, 0.5, 1.0, 2.0)  # official ``[2**k for k in range(-3, 2)]``


def _gaussian(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    dist_sq = ((x - centre) ** 2).sum(dim=-1)
    return sum(torch.exp(-dist_sq / (2 * a)) for a in _ALPHAS)


def vidcom2_scores(features: torch.Tensor, channel_ratio: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """VidCom2's token scores and frame uniqueness.

    The ``int(D * channel_ratio)`` channels of lowest variance over all ``T * N`` tokens (population variance;
    ties -> lower channel) are kept, each token is L2-normalised over them, and with the video centre ``c`` (mean
    of all tokens) and frame centres ``c_t`` (mean of frame ``t``), ``G(x, c) = sum_a exp(-||x - c||^2 / (2a))``
    for ``a in {1/8, 1/4, 1/2, 1, 2}``.

    Returns ``(token_score [T, N], uniqueness [T])``: ``token_score = G(x, c) + G(x, c_t)`` (low = distinct),
    ``uniqueness_t = -mean_i G(x[t, i], c)``. Float32 (float64 for float64 input).
    """
    check_video("features", features)
    t, n, d = features.shape
    channels = int(d * check_fraction("channel_ratio", channel_ratio, low_open=True, high_open=False))
    if channels < 1:
        raise ValueError(f"int(D * channel_ratio) must be >= 1 channel, got D={d}, channel_ratio={channel_ratio!r}")
    x = features.to(compute_dtype(features)).reshape(t * n, d)
    x = x[:, topk_lowtie(x.var(dim=0, unbiased=False), channels, largest=False)]
    frames = F.normalize(x.reshape(t, n, channels), dim=-1)
    video_score = _gaussian(frames, frames.mean(dim=(0, 1), keepdim=True))
    frame_score = _gaussian(frames, frames.mean(dim=1, keepdim=True))
    return video_score + frame_score, -video_score.mean(dim=-1)


def vidcom2_scales(uniqueness: torch.Tensor, ratio: float, temperature: float = 0.01) -> torch.Tensor:
    """Per-frame retention rates ``min(1, ratio * (1 + p_t - mean(p)))``, ``p = softmax((u - max u) / temperature)``."""
    p = torch.softmax((uniqueness - uniqueness.max()) / temperature, dim=0)
    return (ratio * (1 + p - p.mean())).clamp(max=1.0)


def vidcom2_select(
    features: torch.Tensor, ratio: float = 0.25, temperature: float = 0.01, channel_ratio: float = 0.5
) -> torch.Tensor:
    """VidCom2 token selection for one video (the ``qwen`` branch, which calls it once per video).

    1. :func:`vidcom2_scores` gives ``token_score [T, N]`` and ``uniqueness [T]``.
    2. Frame budgets ``k_t = max(1, round(N * min(1, ratio * (1 + p_t - mean p))))`` with
       ``p = softmax((uniqueness - max) / temperature)`` (``round``: half to even, as ``torch.round``); the total
       is about ``ratio * T * N``, not exactly.
    3. Per frame, the ``k_t`` tokens of lowest ``token_score`` (least like the video and the frame centre; ties ->
       lower index).

    Official: xuyang-liu16/VidCom2 ``token_compressor/vidcom2/vidcom2.py`` lines 26-33 and 38-78, branch ``qwen``
    commit a85d485cc2205e92705b32e618b3bc7a492836f9 (called per video by ``models/qwen2_5_vl.py`` lines 20-33).
    Deviations: scores in float32 (official: the features' dtype); ties broken by lower index (official:
    ``torch.topk``, unspecified).

    Args:
        features: ``[T, N, D]`` one video's post-merger tokens.
        ratio: base retention ratio in ``(0, 1]`` (official ``R_RATIO``, default 0.25).
        temperature: softmax temperature ``> 0`` of the frame uniqueness (official 0.01).
        channel_ratio: share of lowest-variance channels scored, in ``(0, 1]`` (official 0.5).

    Returns:
        ``kept`` ``[K]`` int64 flat indices ``t * N + i``, ascending.
    """
    check_video("features", features)
    ratio = check_fraction("ratio", ratio, low_open=True, high_open=False)
    temperature = check_fraction("temperature", temperature, low_open=True, high_open=True, high=float("inf"))
    score, uniqueness = vidcom2_scores(features, channel_ratio)
    t, n = score.shape
    ks = (vidcom2_scales(uniqueness, ratio, temperature) * n).round().long().clamp(min=1).tolist()
    kept = [topk_lowtie(score[i], k, largest=False) + i * n for i, k in enumerate(ks)]
    return torch.cat(kept).sort().values
