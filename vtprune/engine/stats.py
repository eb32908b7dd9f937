"""Stats: :class:`vtprune.stats.PruneStats` of one prefill, from what each prune point recorded.

Owns the per-point entries (``PruneStats.stages``), the top-level counts (what reaches the last decoder layer,
kept indices relative to each image's original visual tokens) and the analytic FLOPs, which count every point:
each decoder layer is charged for the sequence it actually ran on.
"""

from __future__ import annotations

import torch

from .. import flops
from ..stats import PruneStats, StageStats, layer_lengths
from .forward import Forward
from .plan import LATE_DROP


def make_stats(fwd: Forward, adapter, num_layers: int, points) -> PruneStats:
    b = fwd.mask2d.shape[0]
    n_in, n_kept = [0] * b, [0] * b
    kept_indices: list[list[torch.Tensor]] = [[] for _ in range(b)]
    per_frame: list[list[list[int] | None]] = [[] for _ in range(b)]
    for unit in fwd.units:
        per_frame[unit.row].append(_frame_counts(unit))
        kept_indices[unit.row].append(unit.present.cpu() + n_in[unit.row])
        n_in[unit.row] += unit.positions.numel()
        n_kept[unit.row] += unit.present.numel()
    stages = [
        StageStats(
            method=r.point.method.name,
            stage=r.point.stage,
            layer=r.point.layer if r.point.layer else None,
            visual_tokens_kept=list(r.kept),
            select_ms=r.select_ms,
            late_drop=r.point.kind == LATE_DROP,
            visual_tokens_nominal=list(r.nominal) if r.nominal is not None else None,
        )
        for r in fwd.records
    ]
    merged_into = _merged_into(fwd, b, n_in)
    real = fwd.prompt_mask.sum(1).tolist()  # the prompt's (not tokens generate appended to its forward)
    text_cfg = adapter.text_config
    full = pruned = 0
    for row in range(b):
        full += flops.decoder_prefill_flops(text_cfg, real[row])
        lengths = layer_lengths(stages, row, n_in[row], real[row], num_layers)
        pruned += flops.decoder_prefill_flops(text_cfg, lengths)
    vision = _vision_flops(fwd, adapter)
    selecting = [r for r in fwd.records if r.point.kind != LATE_DROP]
    late = next((r for r in fwd.records if r.point.kind == LATE_DROP), None)
    main = selecting[-1].point if selecting else fwd.records[0].point
    return PruneStats(
        visual_tokens_in=n_in,
        visual_tokens_kept=n_kept,
        visual_tokens_nominal=list(selecting[-1].nominal) if selecting else list(n_kept),
        stage=main.stage,
        layer=main.layer if main.stage == "llm" else None,
        select_ms=sum(r.select_ms for r in fwd.records),
        prefill_flops=pruned + vision,
        prefill_flops_full=full + vision,
        kept_indices=[torch.cat(k) if k else torch.zeros(0, dtype=torch.long) for k in kept_indices],
        late_drop_layer=next((p.layer for p in points if p.kind == LATE_DROP), None),
        late_dropped=late.late_dropped if late is not None else None,
        stages=stages,
        merged_into=merged_into,
        prompt_lengths=[int(n) for n in real],
        num_layers=num_layers,
        frame_tokens_kept=per_frame,
    )


def _frame_counts(unit) -> list[int] | None:
    """A video unit's kept tokens per frame (its ``frames`` equal runs), None for an image."""
    if unit.frames is None:
        return None
    size = unit.positions.numel() // unit.frames
    return torch.bincount(unit.present.cpu() // size, minlength=unit.frames).tolist()


def _merged_into(fwd: Forward, b: int, n_in: list[int]) -> list[torch.Tensor | None]:
    """Per sample, for a merging method's forward: each original visual token's carrier (the index, in the sample's
    visual-token numbering, of the kept token whose vector it was merged into; a kept token carries itself; -1 for a
    dropped token). None for a sample without merges, or merges over an already narrowed set (a later point)."""
    out: list[torch.Tensor | None] = [None] * b
    offset = [0] * b
    for unit in fwd.units:
        n = unit.positions.numel()
        start, offset[unit.row] = offset[unit.row], offset[unit.row] + n
        weights = unit.merge_from[2] if unit.merge_from is not None else None
        if weights is None or weights.shape[1] != n:
            continue
        if out[unit.row] is None:
            out[unit.row] = torch.full((n_in[unit.row],), -1, dtype=torch.long)
        weights = weights.detach().float().cpu()
        carrier = unit.present.cpu()[weights.argmax(0)] + start  # present: the kept tokens, in weights' row order
        out[unit.row][start : start + n] = torch.where(weights.abs().sum(0) > 0, carrier, -1)
        out[unit.row][unit.present.cpu() + start] = unit.present.cpu() + start
    return out


def _vision_flops(fwd: Forward, adapter) -> int:
    units = [u for u in fwd.units if u.info is not None]
    if not units:
        return 0  # features computed elsewhere: the vision tower did not run here
    video_id = getattr(adapter.config, "video_token_id", None)
    video = [int(fwd.input_ids[u.row, u.positions[0]]) == video_id for u in units]
    frames = sum(u.info.crops for u, v in zip(units, video) if v)  # a video's crops are its frames
    crops = sum(u.info.crops for u, v in zip(units, video) if not v)
    return adapter.vision_flops(crops, frames, [u.info.grid for u in units])
