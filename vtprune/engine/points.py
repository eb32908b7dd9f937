"""Prune points in prefill: what acting at a point does to the current sequence.

A point selects per unit (:func:`select`: the method's ``select`` on the inputs :mod:`.inputs` builds, checked),
replaces a merging method's kept vectors (:func:`merge`), and compacts the sequence to the kept tokens
(:func:`compact`); a late drop (ToDRE stage 2) removes every visual token of a row or none (:func:`late_drop`).
Where points act and with what budget is the :class:`~.plan.Plan`'s; their signals come from :mod:`.scoring`;
the layers after a point get their inputs from :mod:`.layers`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from ..methods.base import ImageInputs
from ..timing import elapsed_ms
from . import frames
from .forward import Forward, PointRecord
from .layout import Layout, PrunedPrompt
from .plan import PrunePoint
from .units import Unit, check_selection, frame_sizes, refill_frames


def select(
    point: PrunePoint,
    fwd: Forward,
    make_inputs: Callable[[Unit, torch.Tensor, int], ImageInputs],
    sticky: dict | None,
    warned: set[str] | None = None,
) -> torch.Tensor | None:
    """Run ``point``'s method on every unit (``make_inputs(unit, slots, k)``: its inputs, from :mod:`.inputs`).
    Returns the keep mask ``[B, L]`` over the current sequence's real tokens, or None when no visual token is
    dropped; narrows each unit's ``present`` and sets its ``merged``. A unit whose modality (image / video) the
    method does not prune (:attr:`~vtprune.methods.base.Method.modalities`) is kept whole, with one warning per
    method of the patch (``warned``: the names already warned)."""
    keep = fwd.real.clone()
    dropped = False
    method = point.method
    for unit in fwd.units:
        unit.merged = unit.merge_from = None
        if unit.modality not in method.modalities:
            _warn_kept_whole(method, unit.modality, warned)
            continue
        n = unit.present.numel()
        fwd.nominal.setdefault((id(method), unit.key), method.config.budget(n))
        k = point.budget(n, unit.positions.numel())
        if k >= n:  # keeps everything: the method is not called (nor stored for reuse)
            if n < unit.positions.numel() and any(r.pruned and r.point.method is not method for r in fwd.records):
                warnings.warn(
                    f"schedule: {point.describe()} keeps every token that reaches it (its budget is at "
                    "least what the earlier step(s) left of an image) and does nothing there; give it a "
                    "smaller budget",
                    stacklevel=2,
                )
            continue
        slots = fwd.slots(unit)
        key = (point.layer, unit.key, n)
        if sticky is not None and key in sticky:  # generate(use_cache=False): reuse the prompt's selection
            kept = sticky[key]
        else:
            inputs = make_inputs(unit, slots, k)
            if frames.splits(method, inputs):  # frame_budget: the method runs once per frame
                chosen = frames.select_per_frame(method, inputs, unit.features, unit.positions, point.describe())
            else:
                chosen = method.select(inputs)
            kept = check_selection(point.method, point.describe(), chosen, n, k, slots.device)
            if sticky is not None:
                sticky[key] = kept
        if kept.merged is not None:
            unit.merged = kept.merged
            unit.merge_from = (slots, kept.kept, kept.weights)
        kept = kept.kept
        if point.method.config.empty_frames == "refill" and unit.merge_from is None and (sizes := frame_sizes(unit)):
            kept = refill_frames(kept, sizes)
        unit.present = unit.present[kept]
        keep[unit.row, slots] = False
        keep[unit.row, slots[kept]] = True
        dropped = True
    return keep if dropped else None


def _warn_kept_whole(method, modality: str, warned: set[str] | None) -> None:
    if warned is not None and method.name in warned:
        return
    if warned is not None:
        warned.add(method.name)
    prunes = " and ".join(sorted(method.modalities))
    warnings.warn(
        f"method {method.name!r} prunes {prunes} units only: every {modality} in the prompt is kept whole (all its "
        f"visual tokens reach the language model; this warning is given once per patch). To prune {modality}s too, "
        f"use a method that prunes them: vtprune.list_methods(modality={modality!r})",
        stacklevel=3,
    )


def merge(fwd: Forward, x: torch.Tensor, name: str, layer: int = 0) -> torch.Tensor:
    """``x`` ``[B, L, D]`` with each merging unit's kept rows replaced by its merged vectors (a copy if any)."""
    merging = [u for u in fwd.units if u.merged is not None]
    if not merging:
        return x
    x = x.clone()
    for unit in merging:
        slots = fwd.slots(unit)
        if tuple(unit.merged.shape) != (slots.numel(), x.shape[-1]):
            raise RuntimeError(
                f"method {name!r} returned merged vectors of shape {tuple(unit.merged.shape)}; "
                f"expected {(slots.numel(), x.shape[-1])} (one per kept token)"
            )
        x[unit.row, slots] = unit.merged.to(device=x.device, dtype=x.dtype)
        if fwd.deepstack is not None:
            fwd.deepstack.merge(unit.row, *unit.merge_from, name, layer)
    return x


def compact(fwd: Forward, keep: torch.Tensor, start: int) -> Layout:
    """Compact the current sequence to ``keep``'s columns from layer ``start`` on (the layout joins the prompt's)."""
    layout = Layout.from_keep(keep)
    layout.shift = fwd.real.sum(1) - keep.sum(1)
    fwd.cols = layout.take(fwd.cols, 1)
    fwd.real = layout.valid.clone()
    if fwd.positions is not None:
        fwd.positions = layout.take(fwd.positions, 1)
    if fwd.deepstack is not None:
        fwd.deepstack.compact(layout)
    if fwd.prompt is None:
        fwd.prompt = PrunedPrompt()
    fwd.prompt.stages.append((start, layout))
    return layout


def late_drop(fwd: Forward, point: PrunePoint, text_attention: torch.Tensor, sticky: dict | None):
    """ToDRE stage 2: every visual token of a row whose last prompt token gives them too little (head-mean)
    attention ``text_attention`` ``[B, H, L]`` at layer K2-1 leaves. Returns ``(keep [B, L] or None, dropped per
    row)``."""
    ids = fwd.input_ids.gather(1, fwd.cols)
    visual = torch.isin(ids, fwd.visual_ids.to(ids.device)) & fwd.real
    share = (text_attention.mean(1) * visual).sum(1)
    dropped = [v and point.method.drop_all(x) for x, v in zip(share.tolist(), visual.any(1).tolist())]
    if sticky is not None:  # generate(use_cache=False): the prompt's decisions hold for every step
        dropped = sticky.setdefault(("late_drop", point.layer), dropped)
    if not any(dropped):
        return None, dropped
    rows = torch.tensor(dropped, device=visual.device)
    return fwd.real & ~(visual & rows[:, None]), dropped


def record(fwd: Forward, point: PrunePoint, keep, t0: float, late_dropped=None) -> None:
    """Record what ``point`` did in this prefill (``keep``: its keep mask, None if it dropped nothing; ``t0``: when
    it started) for :mod:`.stats`."""
    b = fwd.real.shape[0]
    kept, nominal = [0] * b, [0] * b
    for unit in fwd.units:
        kept[unit.row] += unit.present.numel()
        nominal[unit.row] += fwd.nominal.get((id(point.method), unit.key), unit.present.numel())
    if late_dropped is not None:
        kept, nominal = [0 if d else k for k, d in zip(kept, late_dropped)], None
    fwd.records.append(PointRecord(point, kept, keep is not None, elapsed_ms(t0), late_dropped, nominal))
