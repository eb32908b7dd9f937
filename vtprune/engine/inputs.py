"""The one builder of method inputs: what a method's ``select`` reads about one unit (an image or video), as a
:class:`~vtprune.methods.base.VisionInputs` at the vision entry (:func:`vision_inputs`) or a
:class:`~vtprune.methods.base.DecoderInputs` at a decoder point (:func:`decoder_inputs`). Both stamp the point's
budget, layer and the unit's original count, and hide the fields of signals the method did not declare."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import functional as F
from ..methods.base import DecoderInputs, ImageInputs, VisionInputs
from ..signals import rows_attention
from .forward import Forward, PointSignals, Queries
from .plan import PrunePoint
from .units import Unit


def _finish(inputs: ImageInputs, point: PrunePoint, unit: Unit, k: int) -> ImageInputs:
    inputs.k, inputs.layer, inputs.n_original = k, point.layer, unit.positions.numel()
    return inputs.hide_undeclared(point.method)


def vision_inputs(
    fwd: Forward, point: PrunePoint, unit: Unit, k: int, embeds: torch.Tensor, projector: Callable
) -> VisionInputs:
    """What the vision entry's method reads about ``unit``: its projected features and the vision-side signals the
    capture recorded (``unit.info``); ``embeds`` ``[B, S, D]`` the LM's input embeddings (signal ``prompt_embeds``),
    ``projector()`` the float32 per-token projector (signal ``projector_inputs``)."""
    info = unit.info
    signals = point.method.signals
    extra = {"grid": info.grid if info else None}
    if "prompt_embeds" in signals:  # the row's real text tokens after the image (all of them if none follows)
        after = torch.zeros_like(fwd.mask2d[unit.row])
        after[int(unit.positions[-1]) + 1 :] = True
        visual = torch.isin(fwd.input_ids[unit.row], fwd.visual_ids.to(after.device))
        text = fwd.prompt_mask[unit.row] & ~visual
        extra["prompt_embeds"] = embeds[unit.row, after & text if bool((after & text).any()) else text]
    if "instruction" in signals:
        texts = fwd.instructions
        if texts is not None and len(texts) != fwd.input_ids.shape[0]:
            raise ValueError(
                f"vtprune.set_instructions gave {len(texts)} text(s) for a batch of "
                f"{fwd.input_ids.shape[0]} prompt(s); give one instruction per prompt row"
            )
        extra["instruction"] = texts[unit.row] if texts is not None else None
    inputs = VisionInputs(
        n=unit.positions.numel(),
        k=k,
        features=unit.features,
        cls_attention=info.cls_attention if info else None,
        vision_keys=info.vision_keys if info else None,
        vision_qk=info.vision_qk if info else None,
        received=info.received if info else None,
        pack_crop_scores=info.pack if info else None,
        token_patches=info.token_patches if info else None,
        projector_inputs=info.projector_inputs if info else None,
        projector=projector() if "projector_inputs" in signals else None,
        real_mask=unit.real_mask,
        image_start=int(unit.positions[0]),
        frames=unit.frames,
        extra=extra,
    )
    return _finish(inputs, point, unit, k)


def decoder_inputs(
    fwd: Forward, point: PrunePoint, unit: Unit, slots: torch.Tensor, k: int, hidden, signals: PointSignals, final_norm
) -> DecoderInputs:
    """What a decoder point's method reads about ``unit``: its present tokens at ``slots`` of the current sequence,
    ``hidden`` ``[B, L, D]`` the input of layer K, ``signals`` what the point computed (:mod:`.scoring`)."""
    n = slots.numel()
    start = int(slots[0])
    # the row's prompt: its slots up to the last prompt token (tokens generate appended to the prompt come after it)
    end = hidden.shape[1] if fwd.prompt_end is None else int(fwd.last[unit.row]) + 1
    order = None
    if int(slots[-1]) - start + 1 != n:  # a video whose frames are separated by timestamp text (Qwen3-VL)
        order = span_order(slots, end)

    def view(x, dim=0):  # the row as the method sees it: its prompt, the unit's tokens one span from ``start``
        x = x.narrow(dim, 0, end)
        return x if order is None else x.index_select(dim, order.to(x.device))

    inputs = DecoderInputs(
        n=n,
        k=k,
        features=unit.features[unit.present] if unit.features is not None else None,
        hidden=view(hidden[unit.row]),
        keys=view(signals.keys[unit.row]) if signals.keys is not None else None,
        text_attention=view(signals.text_attention[unit.row], 1) if signals.text_attention is not None else None,
        image_start=start,
        final_norm=final_norm,
        real_mask=unit.real_mask[unit.present] if unit.real_mask is not None else None,
    )
    if signals.queries is not None:
        rows = _attention_rows(fwd, unit.row, signals.queries)
        inputs.attention_rows = lambda columns: view(rows(columns), 2)
    if signals.rope_gravity is not None:
        gravity = _gravity_rows(fwd, unit.row, signals.rope_gravity)
        inputs.rope_gravity = lambda columns: view(gravity(columns), 1)
    if "prompt_embeds" in point.method.signals:
        row = fwd.input_ids[unit.row]
        cols = torch.arange(row.numel(), device=row.device)
        text = fwd.prompt_mask[unit.row] & (cols > unit.positions[-1]) & ~torch.isin(row, fwd.visual_ids.to(row.device))
        inputs.prompt_embeds = fwd.prompt_embeds[unit.row]
        inputs.image_columns = unit.positions
        inputs.text_columns = text.nonzero().squeeze(1)
    return _finish(inputs, point, unit, k)


def _slots(fwd: Forward, row: int, columns: torch.Tensor, what: str) -> torch.Tensor:
    """The current slots of the tokens at original prompt ``columns`` of ``row`` (all must be present)."""
    real, cols = fwd.real[row], fwd.cols[row]
    slot_of = torch.full((int(fwd.mask2d.shape[1]),), -1, dtype=torch.long, device=cols.device)
    slot_of[cols[real]] = torch.arange(cols.numel(), device=cols.device)[real]
    slots = slot_of[columns.to(cols.device)]
    if bool((slots < 0).any()):
        raise ValueError(f"{what}: some query columns are not in the current sequence")
    return slots


def _gravity_rows(fwd: Forward, row: int, rope_ones: torch.Tensor):
    """``fn(columns [R]) -> [R, S]``: the RoPE-only logit (:func:`vtprune.functional.rope_gravity`) between the tokens
    at original prompt ``columns`` of ``row`` and its current slots; ``rope_ones`` ``[B, S, Dh]`` all-ones vectors
    rotated to each slot's position."""

    def fn(columns: torch.Tensor) -> torch.Tensor:
        slots = _slots(fwd, row, columns, "rope_gravity")
        return F.rope_gravity(rope_ones[row][slots], rope_ones[row])

    return fn


def _attention_rows(fwd: Forward, row: int, queries: Queries):
    """``fn(columns [R]) -> [H, R, S]``: layer K-1's attention of the tokens at original prompt ``columns`` (present
    in the current sequence) of ``row`` over its current slots (causal, padding masked; a sliding layer's window,
    in slots)."""

    def fn(columns: torch.Tensor) -> torch.Tensor:
        real, cols = fwd.real[row], fwd.cols[row]
        slots = _slots(fwd, row, columns, "attention_rows")
        key_slots = torch.arange(cols.numel(), device=cols.device)
        visible = real[None, :] & (key_slots[None, :] <= slots[:, None])
        if queries.window is not None:
            visible = visible & (key_slots[None, :] > slots[:, None] - queries.window)
        return rows_attention(queries.queries[row][:, slots], queries.keys[row], queries.scaling, visible)

    return fn


def span_order(slots: torch.Tensor, length: int) -> torch.Tensor:
    """``[length]`` permutation of a row's slots that makes ``slots`` (ascending, not contiguous) one contiguous span
    starting at ``slots[0]``: the slots before it, the unit's slots, then every other slot after ``slots[0]`` in order
    (so the text between a video's frames counts as text after the video)."""
    inside = torch.zeros(length, dtype=torch.bool, device=slots.device)
    inside[slots] = True
    cols = torch.arange(length, device=slots.device)
    rest = cols[(cols > slots[0]) & ~inside]
    return torch.cat([cols[: int(slots[0])], slots, rest])
