"""VisionZip (dvlab-research/VisionZip, CVPR 2025): dominant tokens by CLS attention, contextual tokens merged by key
similarity."""

from __future__ import annotations

import torch

from ._common import check_int, check_rows, unit_rows
from .scores import topk_indices

__all__ = ["visionzip_select"]


def visionzip_select(
    scores: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip token selection and merging (dvlab-research/VisionZip, ``visionzip/clip_encoder.py``).

    1. Dominant: the ``dominant`` tokens with the highest ``scores`` (the CLS attention of the penultimate vision
       layer; ties -> lower index).
    2. The other ``R`` tokens, in order, are split into ``contextual`` targets, evenly spaced
       (``arange(0, R, max(1, R // contextual))[:contextual]``), and the rest, each assigned to the target whose
       key is most cosine-similar (ties -> the first target).
    3. A target's merged vector is its own vector **plus** the mean of the vectors assigned to it (the official
       ``target_hidden + aggregated_hidden``; a target with nothing assigned stays as it is).

    Returns ``(kept, merge)``: the ascending indices of the ``dominant + contextual`` kept tokens (dominant and
    targets) and ``merge`` ``[len(kept), N]`` (float32) such that ``merge @ x`` gives the kept tokens' vectors for
    per-token vectors ``x`` ``[N, D]`` (one-hot rows for dominant tokens).
    """
    n = check_rows(("scores", scores, "[N]"), ("keys", keys, "[N, Dk]"))
    dominant = check_int("dominant", dominant, 0, n)
    contextual = check_int("contextual", contextual, 0, n - dominant)
    if dominant + contextual < 1:
        raise ValueError("dominant + contextual must be >= 1 (tokens kept)")
    device = scores.device
    is_dominant = torch.zeros(n, dtype=torch.bool, device=device)
    if dominant:
        is_dominant[topk_indices(scores, dominant)] = True
    rest = (~is_dominant).nonzero().squeeze(1)  # the other tokens, in order
    targets = torch.zeros(0, dtype=torch.long, device=device)
    assign_from = assign_to = targets
    if contextual:
        slots = torch.arange(0, rest.numel(), max(1, rest.numel() // contextual), device=device)[:contextual]
        is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=device)
        is_target[slots] = True
        targets, others = rest[is_target], rest[~is_target]
        units = unit_rows(keys)
        if others.numel():
            assign_from = others
            assign_to = torch.argmax(units[others] @ units[targets].T, dim=1)  # slot of the most similar target
    kept = (is_dominant.clone().index_fill_(0, targets, True)).nonzero().squeeze(1)
    row_of = torch.full((n,), -1, dtype=torch.long, device=device)
    row_of[kept] = torch.arange(kept.numel(), device=device)
    merge = torch.zeros(kept.numel(), n, dtype=torch.float32, device=device)
    merge[row_of[kept], kept] = 1.0
    if assign_from.numel():
        target_rows = row_of[targets[assign_to]]
        counts = torch.bincount(assign_to, minlength=targets.numel()).clamp(min=1).float()
        merge[target_rows, assign_from] += 1.0 / counts[assign_to]
    return kept, merge
