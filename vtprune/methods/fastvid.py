"""``fastvid`` (LunarShen/FastVID): DySeg segments, salient tokens by the attention each frame's tokens receive in the
last vision block, context tokens by DPC-KNN density peaks on anchor frames, every other token of the segment merged
into its most similar context token (``vtprune.functional.fastvid_select``). A video method: it prunes video units.

Budget: ``ratio=r`` is FastVID's ``retention_ratio`` (each frame's share ``int(N * r)`` of its ``N`` tokens);
``keep=K`` gives each of the video's ``T`` frames ``K // T`` (``keep >= T`` is needed). FastVID keeps at most that
many (segments of near-duplicate frames keep fewer), so a video keeps 1 to ``budget`` tokens (``kept_count =
"at_most"``). A merged context token keeps the position of the token it is merged into (its anchor).

Official: ``fastvid_qwen25vl/lmms-eval/lmms_eval/models/qwenvlutils/modeling_qwen2_5_vl.py`` lines 1889-2095 and
``fastvid_qwen25vl/scripts/eval.sh`` (defaults), commit a40a109cb8df20e8c2c17c6850f8269717369990. The signal: the
official ``frame_attn`` (lines 195-203, 590-596), per frame the softmax of the frame's mean query over its 2x2 merge
units' mean keys in the last vision block, averaged over heads (``attention="mean_query"``, default; the engine calls
:meth:`received_attention` with that block's q / k, no eager attention); ``attention="received"`` reads the attention
each token receives instead (the mean over the frame's queries of their softmax rows), normalised per frame.

LLaVA-NeXT-Video: each frame is one CLIP crop, the last layer's block. ``"mean_query"`` takes the softmax of the
crop's mean query over every key of the crop (merge unit 1: the model pools patches only after the tower), the CLS
key's share dropped; each token then gets the mean of its pooled patches' scores, as the model pools them
(``pack_crop_scores``: the model's own ``vision_resampler``). The official LLaVA-Video fork
(``fastvid_llavavideo/LLaVA-NeXT/llava/model/llava_arch.py`` lines 188-223, same commit) pools its frame attention
with the same 2x2 ``avg_pool2d``; its attention is the SigLIP head's probe query over the patches, which a CLIP
tower lacks: the frame's mean query stands in for it (as on Qwen).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .. import functional as F
from ..config import PruneConfig, check_int_option
from ..functional.video import check_fraction
from ..registry import register_method
from ._frames import check_frame_attention, frame_attention, video_frames
from .base import ImageInputs, Method, Selection

#: how each frame's token scores are read from the last vision block (``FastVIDConfig.attention``)
FASTVID_ATTENTION = ("mean_query", "received")


@dataclass
class FastVIDConfig(PruneConfig):
    """FastVID options (names and defaults of the official ``scripts/eval.sh``): ``c`` (DySeg: at least ``c``
    segments), ``tau`` (DySeg: cut where consecutive frames' similarity is below it), ``tau_ignore`` (frames above it
    collapse into the last of their run), ``d`` (context share of a segment's budget), ``p`` (one context anchor
    frame in ``p`` runs), ``beta`` (merge weight floor of an anchor's own vector).

    ``attention``: each frame's token scores from the last vision block, ``"mean_query"`` (official: the softmax of
    the frame's mean query over its merge units' mean keys, :func:`vtprune.functional.fastvid_frame_attention`) or
    ``"received"`` (the attention each token receives, averaged over the frame's queries).

    Raises ``ValueError`` for an unknown ``attention``, ``c`` or ``p`` not an int >= 1, ``tau`` not a finite float,
    ``tau_ignore`` outside ``[-1, 1]``, ``d`` or ``beta`` outside ``[0, 1]``."""

    attention: str = "mean_query"
    c: int = 8
    tau: float = 0.84
    tau_ignore: float = 0.95
    d: float = 0.4
    p: int = 4
    beta: float = 0.6

    def __post_init__(self):
        super().__post_init__()
        if self.attention not in FASTVID_ATTENTION:
            raise ValueError(f"attention must be one of {FASTVID_ATTENTION}, got {self.attention!r}")
        check_int_option("c", self.c, 1)
        check_int_option("p", self.p, 1)
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not math.isfinite(self.tau):
            raise ValueError(f"tau must be a finite float, got {self.tau!r}")
        self.tau_ignore = check_fraction("tau_ignore", self.tau_ignore, False, False, low=-1.0)
        self.d = check_fraction("d", self.d, False, False)
        self.beta = check_fraction("beta", self.beta, False, False)


@register_method("fastvid", FastVIDConfig)
class FastVID(Method):
    stage = "vision"
    signals = frozenset({"features", "cls_attention"})  # the attention received, as importance="received"
    merges = True
    modalities = frozenset({"video"})
    kept_count = "at_most"

    #: tokens per merge unit of the tower's order that ``attention="mean_query"`` averages keys over (official: the
    #: hard-coded 2x2 unit of Qwen2.5-VL); :meth:`bind` reads the model's (``ModelAdapter.vision_merge_unit``)
    unit = 4

    def bind(self, adapter) -> None:
        check_frame_attention("fastvid", adapter)
        self.unit = adapter.vision_merge_unit()

    def importance(self) -> str:
        return "received"

    def vision_layers(self, num_layers: int) -> list[int]:
        return [num_layers - 1]  # official: the last vision block

    def received_attention(self, q, k, cu_seqlens, scaling):
        if self.config.attention == "mean_query":  # official: over the merge units' mean keys (Qwen: 2x2)
            return F.fastvid_frame_attention(q, k, cu_seqlens, scaling, unit=self.unit)
        return super().received_attention(q, k, cu_seqlens, scaling)

    def retention(self, n: int, frames: int) -> float:
        """FastVID's ``retention_ratio`` for a video of ``frames`` frames of ``n`` tokens each: ``ratio``, or with
        ``keep=K`` the float whose ``int(n * r)`` is ``K // frames`` (``ValueError`` when that is 0)."""
        if self.config.ratio is not None:
            return self.config.ratio
        per_frame = self.config.keep // frames
        if per_frame < 1:
            raise ValueError(
                f"fastvid keeps int(N * retention_ratio) tokens in every frame; keep={self.config.keep} gives none to "
                f"each of this video's {frames} frames: give keep >= {frames} (or ratio=)"
            )
        return min(1.0, (per_frame + 0.5) / n)

    def select(self, image: ImageInputs) -> Selection:
        frames, n = video_frames("fastvid", image)
        attn = frame_attention(image, frames)
        attn = attn / attn.sum(dim=1, keepdim=True).clamp_min(1e-30)  # each frame's row sums to 1, as officially
        c = self.config
        kept, tokens = F.fastvid_select(
            image.features.reshape(frames, n, -1),
            attn,
            retention_ratio=self.retention(n, frames),
            c=c.c,
            tau=c.tau,
            tau_ignore=c.tau_ignore,
            d=c.d,
            p=c.p,
            beta=c.beta,
        )
        return Selection(kept, tokens)
