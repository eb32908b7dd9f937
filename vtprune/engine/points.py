"""Prune points: where a method acts, and what acting there does to the sequence.

Owns :class:`PrunePoint` (a method at the vision entry, before decoder layer K, or a late drop at K) and
:class:`Forward` (the state of one forward pass: the current sequence after the points so far), and the three
things a point does in prefill: read its signals (layer K-1's q/k, recomputed attention rows), select per unit
(:func:`select`), and compact the sequence it acts on (:func:`compact`); plus the masks and positions
of the layers after it, in prefill and in every step that continues a pruned cache (:func:`decode_at`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import compat
from .. import functional as F
from ..methods.base import ImageInputs, Method
from ..signals import query_attention, rope_keys, rope_ones, rope_queries, rope_query, rows_attention
from .deepstack import DeepStack
from .layout import Layout, PrunedPrompt
from .units import Unit, check_selection, frame_sizes, refill_frames

VISION, LLM, LATE_DROP = "vision", "llm", "late_drop"


@dataclass
class PrunePoint:
    """``method`` acting at ``layer`` (0: the vision entry, after the projector; K: before decoder layer K).
    ``kind``: ``"vision"``, ``"llm"`` or ``"late_drop"`` (every visual token of a row, or none: ToDRE stage 2).
    A multi-point llm method (``Method.layers`` returns several layers: pdrop, sparsevlm) has one point per layer,
    each with its own budget (``Method.point_budget``)."""

    method: Method
    layer: int
    kind: str

    @property
    def stage(self) -> str:
        return VISION if self.kind == VISION else LLM

    @property
    def needs_text_attention(self) -> bool:
        return self.kind == LATE_DROP or "text_attention" in self.method.signals

    def describe(self) -> str:
        where = "the vision entry" if self.kind == VISION else f"decoder layer {self.layer}"
        return f"{self.method.name!r} ({'late drop' if self.kind == LATE_DROP else self.stage}) at {where}"


@dataclass
class PointRecord:
    """What one point did in one prefill (for :class:`vtprune.stats.PruneStats`)."""

    point: PrunePoint
    kept: list[int]  # visual tokens per row after the point
    pruned: bool  # the point removed tokens (compacted the sequence)
    select_ms: float
    late_dropped: list[bool] | None = None
    nominal: list[int] | None = None  # visual tokens per row that the method's budget names (not a late drop)


@dataclass
class Forward:
    """Per-forward state of a patched model. In prefill, ``cols`` / ``real`` describe the current sequence: slot j of
    row b holds prompt column ``cols[b, j]``, a real token where ``real[b, j]``."""

    input_ids: torch.Tensor | None
    prefill: bool
    prompt: PrunedPrompt | None = None  # prefill: being built; continuation: the one the cache holds
    image_sizes: list | None = None
    row_copies: int = 1  # generate's in-place copies of each prompt row (beams / return sequences)
    features: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # token id -> per-image features
    units: list[Unit] = field(default_factory=list)
    mask2d: torch.Tensor | None = None  # bool [B, S]: the prompt's real tokens
    cols: torch.Tensor | None = None  # [B, L] long
    real: torch.Tensor | None = None  # [B, L] bool
    signals: dict[str, Any] = field(default_factory=dict)
    layer_kwargs: dict[str, Any] = field(default_factory=dict)  # masks / overrides for layers after a point
    override_from: int | None = None  # layers > this one take layer_kwargs
    scrub_position_ids: bool = False
    records: list[PointRecord] = field(default_factory=list)
    decode_masks: dict[int, Any] = field(default_factory=dict)  # continuation: per stage start, its 2-D mask
    decode_positions: dict[int, torch.Tensor] = field(default_factory=dict)  # continuation, "compact": per stage
    prompt_embeds: torch.Tensor | None = None  # prefill: the LM's input embeddings (signal prompt_embeds)
    visual_ids: torch.Tensor | None = None  # the placeholder token ids of visual tokens
    deepstack: DeepStack | None = None  # prefill of a DeepStack model (Qwen3-VL): the levels' rows per slot
    mask_in: torch.Tensor | None = None  # the 2-D mask the inner model got (a host that builds the LM's masks itself)
    token_types: torch.Tensor | None = None  # prefill: [B, S] the prompt's token types (bidirectional image blocks)
    positions: torch.Tensor | None = None  # prefill, rotary per layer type: [B, L] 1-D position ids of the slots
    #: prefill: (id(method), unit key) -> the unit's count the method's budget names, from its tokens at its first point
    nominal: dict[tuple, int] = field(default_factory=dict)
    #: prefill: the prompt's columns are those < prompt_end (None: all); the columns after it are tokens generate
    #: appended to the prompt's first forward (assisted decoding's candidates), which no point selects with
    prompt_end: int | None = None

    def current_types(self) -> torch.Tensor | None:
        """``[B, L]`` token types of the current sequence's slots (padding: 0), or None."""
        if self.token_types is None:
            return None
        return self.token_types.gather(1, self.cols) * self.real

    @property
    def prompt_mask(self) -> torch.Tensor:
        """bool ``[B, S]``: the real tokens of the prompt (``mask2d`` without the columns from ``prompt_end`` on)."""
        if self.prompt_end is None:
            return self.mask2d
        return self.mask2d & (torch.arange(self.mask2d.shape[1], device=self.mask2d.device) < self.prompt_end)

    @property
    def last(self) -> torch.Tensor:
        """``[B]`` slot of each row's last real prompt token in the current sequence."""
        slots = torch.arange(self.real.shape[1], device=self.real.device)
        prompt = self.real if self.prompt_end is None else self.real & (self.cols < self.prompt_end)
        return torch.where(prompt, slots, -1).max(dim=1).values

    def slots(self, unit: Unit) -> torch.Tensor:
        """Slots of ``unit``'s present tokens in the current sequence (ascending)."""
        row_cols = torch.where(self.real[unit.row], self.cols[unit.row], -1)
        slot_of = torch.full((int(row_cols.max()) + 1,), -1, dtype=torch.long, device=row_cols.device)
        real = row_cols >= 0
        slot_of[row_cols[real]] = torch.arange(row_cols.numel(), device=row_cols.device)[real]
        return slot_of[unit.positions[unit.present]]


def select(
    point: PrunePoint, fwd: Forward, make_inputs: Callable[[Unit, torch.Tensor], ImageInputs], sticky: dict | None
) -> torch.Tensor | None:
    """Run ``point``'s method on every unit. Returns the keep mask ``[B, L]`` over the current sequence's real
    tokens, or None when no visual token is dropped; narrows each unit's ``present`` and sets its ``merged``."""
    keep = fwd.real.clone()
    dropped = False
    method = point.method
    for unit in fwd.units:
        unit.merged = unit.merge_from = None
        n = unit.present.numel()
        fwd.nominal.setdefault((id(method), unit.key), method.config.budget(n))
        k = method.point_budget(n, unit.positions.numel(), point.layer)
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
            inputs = make_inputs(unit, slots)
            inputs.k, inputs.layer, inputs.n_original = k, point.layer, unit.positions.numel()
            kept = check_selection(
                point.method,
                point.describe(),
                point.method.select(inputs.hide_undeclared(point.method)),
                n,
                k,
                slots.device,
            )
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


def llm_inputs(fwd: Forward, point: PrunePoint, unit: Unit, slots, hidden, final_norm) -> ImageInputs:
    """What a decoder point's method reads about one unit: its present tokens at ``slots`` of the current sequence."""
    n = slots.numel()
    start = int(slots[0])
    # the row's prompt: its slots up to the last prompt token (tokens generate appended to the prompt come after it)
    end = hidden.shape[1] if fwd.prompt_end is None else int(fwd.last[unit.row]) + 1
    order = None
    if int(slots[-1]) - start + 1 != n:  # a video whose frames are separated by timestamp text (Qwen3-VL)
        order = span_order(slots, end)
    signals = fwd.signals

    def view(x, dim=0):  # the row as the method sees it: its prompt, the unit's tokens one span from ``start``
        x = x.narrow(dim, 0, end)
        return x if order is None else x.index_select(dim, order.to(x.device))

    inputs = ImageInputs(
        n=n,
        k=0,  # set by select (the point's budget)
        features=unit.features[unit.present] if unit.features is not None else None,
        hidden=view(hidden[unit.row]),
        keys=view(signals["keys"][unit.row]) if "keys" in signals else None,
        text_attention=view(signals["text_attention"][unit.row], 1) if "text_attention" in signals else None,
        image_start=start,
        final_norm=final_norm,
        real_mask=unit.real_mask[unit.present] if unit.real_mask is not None else None,
    )
    if "queries" in signals:
        rows = _attention_rows(fwd, unit.row, *signals["queries"])
        inputs.attention_rows = lambda columns: view(rows(columns), 2)
    if "rope_gravity" in signals:
        gravity = _gravity_rows(fwd, unit.row, signals["rope_gravity"])
        inputs.rope_gravity = lambda columns: view(gravity(columns), 1)
    if "prompt_embeds" in point.method.signals:
        row = fwd.input_ids[unit.row]
        cols = torch.arange(row.numel(), device=row.device)
        text = fwd.prompt_mask[unit.row] & (cols > unit.positions[-1]) & ~torch.isin(row, fwd.visual_ids.to(row.device))
        inputs.prompt_embeds = fwd.prompt_embeds[unit.row]
        inputs.image_columns = unit.positions
        inputs.text_columns = text.nonzero().squeeze(1)
    return inputs


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


def _attention_rows(fwd: Forward, row: int, q_all, k, scaling, window=None):
    """``fn(columns [R]) -> [H, R, S]``: layer K-1's attention of the tokens at original prompt ``columns`` (present
    in the current sequence) of ``row`` over its current slots (causal, padding masked; ``window``: a sliding layer's,
    in slots)."""

    def fn(columns: torch.Tensor) -> torch.Tensor:
        real, cols = fwd.real[row], fwd.cols[row]
        slots = _slots(fwd, row, columns, "attention_rows")
        key_slots = torch.arange(cols.numel(), device=cols.device)
        visible = real[None, :] & (key_slots[None, :] <= slots[:, None])
        if window is not None:
            visible = visible & (key_slots[None, :] > slots[:, None] - window)
        return rows_attention(q_all[row][:, slots], k[row], scaling, visible)

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


def late_drop(fwd: Forward, point: PrunePoint, visual_ids, sticky: dict | None):
    """ToDRE stage 2: every visual token of a row whose last prompt token gives them too little (head-mean)
    attention at layer K2-1 leaves. Returns ``(keep [B, L] or None, dropped per row)``."""
    ids = fwd.input_ids.gather(1, fwd.cols)
    visual = torch.isin(ids, torch.tensor(visual_ids, device=ids.device)) & fwd.real
    share = (fwd.signals.pop("text_attention").mean(1) * visual).sum(1)
    dropped = [v and point.method.drop_all(x) for x, v in zip(share.tolist(), visual.any(1).tolist())]
    if sticky is not None:  # generate(use_cache=False): the prompt's decisions hold for every step
        dropped = sticky.setdefault(("late_drop", point.layer), dropped)
    if not any(dropped):
        return None, dropped
    rows = torch.tensor(dropped, device=visual.device)
    return fwd.real & ~(visual & rows[:, None]), dropped


def positions_1d(fwd: Forward, compact: bool) -> torch.Tensor:
    """1-D positions of the current sequence's slots: numbered from the attention mask (whatever the caller passed,
    so position-dependent signals do not depend on left padding), or, ``positions="compact"``, each row's present
    tokens counted 0, 1, ... (what every compaction renumbers them to)."""
    if compact:
        return (fwd.real.long().cumsum(1) - 1).clamp(min=0)
    numbered = (fwd.mask2d.long().cumsum(1) - 1).clamp(min=0)
    return numbered.gather(1, fwd.cols)


def reads_previous_layer(point: PrunePoint) -> bool:
    """Whether ``point`` reads layer K-1's q/k (captured by hooks on that layer)."""
    return point.kind == LATE_DROP or bool(point.method.signals & {"text_attention", "keys", "queries"})


def llm_signals(
    point: PrunePoint, fwd: Forward, adapter, rope_fn, rotary, hidden=None, layer_rope=None, compact: bool = False
) -> None:
    """The point's signals on the current sequence: from layer K-1's captured q_proj / k_proj outputs
    (``text_attention``, ``keys``, ``queries``), or recomputed on layer K's input ``hidden`` with layer K's input
    norm, q/k projections and rotary tables ``layer_rope`` (``layer_attention``)."""
    signals = point.method.signals
    last = fwd.last
    cols = torch.arange(fwd.real.shape[1], device=fwd.real.device)
    causal = fwd.real & (cols[None, :] <= last[:, None])

    def visible(layer):  # what the last token sees at ``layer``: causal, and a sliding layer's window
        window = adapter.sliding_window(layer)
        return causal if window is None else causal & (cols[None, :] > last[:, None] - window)

    if reads_previous_layer(point):
        signal_layer = point.layer - 1
        attn = adapter.decoder_layers[signal_layer].self_attn
        rope = fwd.signals.pop("_rope")
        k_out = fwd.signals.pop("_k")
        if not adapter.mrope:
            rope = rotary(k_out, positions_1d(fwd, compact), signal_layer)
        k = rope_keys(attn, k_out, rope, rope_fn)
        if point.needs_text_attention:
            q = rope_query(attn, fwd.signals.pop("_q"), rope, last, rope_fn, gated=adapter.gated_query)
            fwd.signals["text_attention"] = query_attention(q, k, attn.scaling, visible(signal_layer))
        if "keys" in signals:
            fwd.signals["keys"] = k.transpose(1, 2).reshape(k.shape[0], k.shape[2], -1)
        if "queries" in signals:
            fwd.signals["queries"] = (
                rope_queries(attn, fwd.signals.pop("_q_all"), rope, rope_fn, gated=adapter.gated_query),
                k,
                attn.scaling,
                adapter.sliding_window(signal_layer),
            )
        if "rope_gravity" in signals:
            fwd.signals["rope_gravity"] = rope_ones(k, rope, rope_fn)
    if "layer_attention" in signals:
        attn = adapter.decoder_layers[point.layer].self_attn
        # differentiable like the captured signals (the compression-aware attack reaches pdrop through it); under
        # inference (no_grad / inference_mode) it builds no graph
        x = adapter.input_norm(point.layer)(hidden)
        rope = layer_rope if adapter.mrope else rotary(hidden, positions_1d(fwd, compact), point.layer)
        k = rope_keys(attn, attn.k_proj(x), rope, rope_fn)
        q_rows = attn.q_proj(x[torch.arange(x.shape[0], device=x.device), last])
        q = rope_query(attn, q_rows, rope, last, rope_fn, gated=adapter.gated_query)
        fwd.signals["text_attention"] = query_attention(q, k, attn.scaling, visible(point.layer))


def shorten(
    fwd: Forward,
    layout: Layout,
    start: int,
    hidden,
    kwargs,
    cache,
    masks_fn,
    rotary,
    compact_positions,
    layer_types=None,
):
    """The cut layer's inputs (hidden states, rotary tables, masks) for the compacted sequence; the layers after it
    get the same overrides. ``layer_types`` (rotary per layer type): ``{type: first layer >= start of that type}``,
    each type's tables computed at the slots' positions (``fwd.positions``) and handed to its layers."""
    hidden = layout.take(hidden, 1)
    if compact_positions:
        fwd.positions = layout.compact_positions() if fwd.positions is not None else None
    rope_by_type = None
    if layer_types is not None:
        rope_by_type = {kind: rotary(hidden, fwd.positions, layer) for kind, layer in layer_types.items()}
        rope = next(r for kind, r in rope_by_type.items() if layer_types[kind] == start)
    elif compact_positions:
        rope = rotary(hidden, layout.compact_positions(), start)
    else:
        cos, sin = kwargs["position_embeddings"]
        rope = (layout.take(cos, 1), layout.take(sin, 1))
    override = {"position_embeddings": rope, "position_ids": None}
    masks = masks_fn(hidden, fwd.real.long(), cache, start, fwd.current_types())
    fwd.layer_kwargs.update(masks=masks, override=override, rope=rope_by_type)
    fwd.override_from = start
    kwargs.update(override)
    return hidden, masks


def decode_at(fwd: Forward, start: int, hidden, kwargs, cache, masks_fn, rotary, layer_types=None):
    """A continuation step at a stage's start layer: that layer and the ones after it get masks sized for their
    shorter cache (and, positions="compact", rotary tables of the renumbered positions: per layer type when
    ``layer_types``, as in :func:`shorten`)."""
    masks = masks_fn(hidden, fwd.decode_masks[start], cache, start)
    override = {"position_ids": None}
    rope_by_type = None
    if start in fwd.decode_positions and start > 0:
        pos = fwd.decode_positions[start]
        if layer_types is not None:
            rope_by_type = {kind: rotary(hidden, pos, layer) for kind, layer in layer_types.items()}
            override["position_embeddings"] = next(r for kind, r in rope_by_type.items() if layer_types[kind] == start)
        else:
            override["position_embeddings"] = rotary(hidden, pos, start)
    fwd.layer_kwargs.update(masks=masks, override=override, rope=rope_by_type)
    fwd.override_from = start
    kwargs.update(override)
    return masks


def first_layers(adapter, start: int, num_layers: int) -> dict[str, int]:
    """Each layer type of layers >= ``start`` -> its first layer (whose cache sizes that type's mask)."""
    first = {}
    for i in range(start, num_layers):
        first.setdefault(adapter.layer_type(i), i)
    return first


def layer_masks(adapter, num_layers: int):
    """``fn(hidden, mask2d, cache, start, token_types=None)``: the masks of layers >= ``start`` for their sequence, by
    layer type; ``token_types`` ``[B, L]`` (families with bidirectional image blocks: the slots' types) make each run
    of image tokens one block."""

    def fn(hidden, mask2d, cache, start, token_types=None):
        blocks = adapter.block_ids(token_types) if token_types is not None else None
        return compat.causal_masks(
            adapter.language_model.config, hidden, mask2d, cache, first_layers(adapter, start, num_layers), blocks
        )

    return fn
