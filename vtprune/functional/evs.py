"""EVS (NVIDIA Efficient Video Sampling): keep the tokens that changed most since the previous frame."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import as_int, compute_dtype
from .video import check_fraction, check_video

__all__ = ["evs_select", "evs_count"]


def evs_count(tokens_per_frame: int, frames: int, q: float) -> int:
    """Tokens EVS keeps: ``max(N, int(T * N * (1 - q)))`` (vLLM ``compute_retained_tokens_count``)."""
    return max(tokens_per_frame, int(tokens_per_frame * frames * (1 - q)))


def evs_select(video_embeds: torch.Tensor, q: float | None = None, *, k: int | None = None) -> torch.Tensor:
    """EVS token selection for one video (vLLM ``compute_retention_mask``).

    ``d[t, i] = 1 - cos(x[t, i], x[t - 1, i])`` for ``t >= 1`` and ``d[0, i] = 255`` (the first frame is always
    kept); the ``max(N, int(T * N * (1 - q)))`` largest ``d`` are kept, ranked by a stable descending sort of the
    flat ``[T * N]`` scores (ties -> lower flat index ``t * N + i``).

    Official: vllm-project/vllm ``vllm/multimodal/evs.py`` lines 17-36 (``compute_retained_tokens_count``) and
    39-92 (``compute_retention_mask``), commit 094f117823287790739d3022162a3f30f13d758b. Deviations: scores are
    computed in float32 (vLLM: in the embeddings' dtype, e.g. bf16); ``k`` (an option) fixes the count instead of
    ``q`` (``k >= T * N`` keeps everything; ``k < N`` is allowed and then the first frame is cut too, lowest index
    first).

    Args:
        video_embeds: ``[T, N, D]`` post-merger embeddings of one video (N tokens per frame, raster order).
        q: pruning rate in ``[0, 1)``.
        k: tokens to keep (``>= 1``), instead of ``q``; exactly one of ``q`` and ``k``.

    Returns:
        ``kept`` ``[K]`` int64 flat indices ``t * N + i``, ascending.
    """
    check_video("video_embeds", video_embeds)
    t, n, _ = video_embeds.shape
    if (q is None) == (k is None):
        raise ValueError(f"give exactly one of q (pruning rate) and k (tokens to keep), got q={q!r}, k={k!r}")
    if q is not None:
        count = evs_count(n, t, check_fraction("q", q, low_open=False, high_open=True))
    else:
        count = as_int(k, "k must be an int")
        if count < 1:
            raise ValueError(f"k must be >= 1 (tokens to keep), got {count}")
    x = video_embeds.to(compute_dtype(video_embeds))
    d = torch.full((t, n), 255.0, dtype=x.dtype, device=x.device)
    d[1:] = 1 - F.cosine_similarity(x[1:], x[:-1], dim=-1)
    order = torch.sort(d.reshape(-1), descending=True, stable=True).indices
    return order[:count].sort().values
