"""``flashvid`` (Fanziyang-v/FlashVID, ICLR 2026), its vision-side stage: DySeg segments, ADTS (per frame, max-min
diversity on cosine distances scaled by the attention each token receives in the last vision block), TSTM (tokens
linked to their most similar previous-frame token at any position, trees merged into their roots), then DPC-KNN
clusters of the remaining roots (``vtprune.functional.flashvid_select``). A video method: it prunes video units.
The official optional in-LLM stage (a FastV-style drop at layer 20) is not part of it.

Budget: each frame's ``B`` tokens, ``ceil(N * r * expansion)`` with ``ratio=r`` (official), or
``ceil((K // T) * expansion)`` with ``keep=K`` over ``T`` frames (``keep >= T`` is needed). The per-frame cluster
counts are rounded up, so a video may keep a few tokens more than ``B * T`` (``kept_count = "own"``). ``expansion``
defaults to 1.0: the official 1.25 makes room for its in-LLM stage, which prunes further at layer 20. A merged token
keeps the position of the token it is merged into (a TSTM root, a cluster centre).

Signal: the official Qwen2.5-VL code (``flashvid/modeling_qwen2_5_vl.py`` lines 245-265, 573-585) averages, per
frame, every query's softmax row of the last vision block over heads and queries, then over each 2x2 merge unit: the
engine's ``importance="received"`` on that block, averaged over the unit. Official: commit
1d37422c5afcaa15ee46b5355f5ba798fa93290a, ``flashvid/utils.py``, ``token_selection.py``, ``__init__.py`` lines
70-86 (defaults).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .. import functional as F
from ..config import PruneConfig, check_int_option
from ..functional.flashvid import FLASHVID_SELECTIONS
from ..functional.video import check_fraction
from ..registry import register_method
from ._frames import check_frame_attention, frame_attention, video_frames
from .base import ImageInputs, Method, Selection


@dataclass
class FlashVIDConfig(PruneConfig):
    """FlashVID options (defaults of the official ``flashvid()`` wrapper): ``alpha`` (ADTS share of each frame's
    tokens), ``temporal_threshold`` (TSTM merges links above it), ``segment_threshold`` and ``min_segments`` (DySeg),
    ``selection`` (``"attn_div_v2"``: distances scaled by attention and event relevance; ``"attn_div"``: by attention
    only), ``expansion`` (per-frame budget factor; official 1.25 with its in-LLM stage, 1.0 here without it).

    Raises ``ValueError`` for ``alpha`` outside ``[0, 1]``, ``temporal_threshold`` outside ``[-1, 1]``,
    ``alpha=0`` with ``temporal_threshold=1`` (nothing kept), ``segment_threshold`` not a finite float,
    ``min_segments`` not an int >= 1, an unknown ``selection``, or ``expansion`` not a float > 0."""

    alpha: float = 0.7
    temporal_threshold: float = 0.8
    segment_threshold: float = 0.9
    min_segments: int = 8
    selection: str = "attn_div_v2"
    expansion: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        self.alpha = check_fraction("alpha", self.alpha, False, False)
        self.temporal_threshold = check_fraction("temporal_threshold", self.temporal_threshold, False, False, low=-1.0)
        st = self.segment_threshold
        if isinstance(st, bool) or not isinstance(st, (int, float)) or not math.isfinite(st):
            raise ValueError(f"segment_threshold must be a finite float, got {st!r}")
        check_int_option("min_segments", self.min_segments, 1)
        if self.selection not in FLASHVID_SELECTIONS:
            raise ValueError(f"selection must be one of {FLASHVID_SELECTIONS}, got {self.selection!r}")
        if self.alpha == 0 and self.temporal_threshold >= 1:
            raise ValueError(
                f"alpha=0 (no ADTS token) with temporal_threshold={self.temporal_threshold!r} (no TSTM token) keeps no "
                "token; allowed: alpha > 0 or temporal_threshold < 1"
            )
        ex = self.expansion
        if isinstance(ex, bool) or not isinstance(ex, (int, float)) or not (math.isfinite(ex) and ex > 0):
            raise ValueError(f"expansion must be a float > 0, got {ex!r}")


@register_method("flashvid", FlashVIDConfig)
class FlashVID(Method):
    stage = "vision"
    signals = frozenset({"features", "cls_attention"})  # the attention received, as importance="received"
    merges = True
    modalities = frozenset({"video"})
    kept_count = "own"

    def bind(self, adapter) -> None:
        check_frame_attention("flashvid", adapter)

    def importance(self) -> str:
        return "received"

    def vision_layers(self, num_layers: int) -> list[int]:
        return [num_layers - 1]  # official: the last vision block

    def frame_tokens(self, n: int, frames: int) -> int:
        """Each frame's ``B`` of its ``n`` tokens (``ValueError`` when ``keep`` gives a frame none)."""
        c = self.config
        if c.ratio is not None:
            return max(1, F.flashvid_frame_tokens(n, c.ratio, c.expansion))
        if c.keep < frames:
            raise ValueError(
                f"flashvid keeps the same number of tokens in every frame; keep={c.keep} gives none to each of this "
                f"video's {frames} frames: give keep >= {frames} (or ratio=)"
            )
        return min(n, math.ceil(c.keep // frames * c.expansion))

    def select(self, image: ImageInputs) -> Selection:
        frames, n = video_frames("flashvid", image)
        c = self.config
        kept, tokens = F.flashvid_select(
            image.features.reshape(frames, n, -1),
            frame_attention(image, frames),
            self.frame_tokens(n, frames),
            alpha=c.alpha,
            temporal_threshold=c.temporal_threshold,
            segment_threshold=c.segment_threshold,
            min_segments=c.min_segments,
            selection=c.selection,
        )
        return Selection(kept, tokens)
