"""The records of one forward pass of a patched model: :class:`Forward` (the current sequence after the points so
far), what the signal hooks on a point's layer K-1 captured (:class:`LayerCapture`), the scores a decoder point
computes from them (:class:`PointSignals`), what the layers after a point receive (:class:`LayerOverrides`), and
what each point did (:class:`PointRecord`, for :mod:`.stats`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .deepstack import DeepStack
from .layout import PrunedPrompt
from .plan import PrunePoint
from .units import Unit


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
class LayerCapture:
    """What the signal hooks on a decoder point's layer K-1 captured in prefill (cleared after the point runs).
    ``B``: rows, ``L``: slots of the current sequence."""

    #: ``(cos, sin)`` the layer's rotary tables (its attention's ``position_embeddings``)
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    #: ``[B, L, Hkv * Dh]`` the ``k_proj`` output (before its norm / RoPE)
    keys: torch.Tensor | None = None
    #: ``[B, H * Dh]`` the ``q_proj`` output at each row's last prompt token (``text_attention``, late drops)
    last_query: torch.Tensor | None = None
    #: ``[B, L, H * Dh]`` the ``q_proj`` output of every slot (signal ``queries``)
    queries: torch.Tensor | None = None


@dataclass
class Queries:
    """Signal ``queries`` of one decoder point: layer K-1's post-RoPE ``queries`` ``[B, H, L, Dh]`` and ``keys``
    ``[B, Hkv, L, Dh]``, its logit ``scaling`` and sliding ``window`` (slots; None: full attention)."""

    queries: torch.Tensor
    keys: torch.Tensor
    scaling: float
    window: int | None = None


@dataclass
class PointSignals:
    """The scores a decoder point computed on the current sequence (``B`` rows, ``L`` slots) for its method."""

    #: ``[B, H, L]`` attention of each row's last prompt token (layer K-1's; ``layer_attention``: layer K's own)
    text_attention: torch.Tensor | None = None
    #: ``[B, L, Hkv * Dh]`` layer K-1's post-RoPE keys (signal ``keys``)
    keys: torch.Tensor | None = None
    #: signal ``queries``
    queries: Queries | None = None
    #: ``[B, Hkv, L, Dh]`` all-ones vectors rotated to each slot's position (signal ``rope_gravity``)
    rope_gravity: torch.Tensor | None = None


@dataclass
class LayerOverrides:
    """What the decoder layers after ``start`` (a point's layer) receive instead of the host's inputs: position ids
    removed (kept tokens' ids have gaps), ``masks`` by layer type for their sequence, and rotary tables
    (``position_embeddings`` for every layer, or ``rope_by_type`` per layer type, Gemma 3) where they change."""

    start: int
    masks: dict
    position_embeddings: tuple | None = None
    rope_by_type: dict | None = None

    def apply(self, kwargs: dict, layer_type: str) -> None:
        """Give one layer (of ``layer_type``) after ``start`` its inputs, in place."""
        kwargs["position_ids"] = None
        if self.position_embeddings is not None:
            kwargs["position_embeddings"] = self.position_embeddings
        kwargs["attention_mask"] = self.masks[layer_type]
        if self.rope_by_type is not None:
            kwargs["position_embeddings"] = self.rope_by_type[layer_type]


@dataclass
class Forward:
    """Per-forward state of a patched model. In prefill, ``cols`` / ``real`` describe the current sequence: slot j of
    row b holds prompt column ``cols[b, j]``, a real token where ``real[b, j]``."""

    input_ids: torch.Tensor | None
    prefill: bool
    prompt: PrunedPrompt | None = None  # prefill: being built; continuation: the one the cache holds
    image_sizes: list | None = None
    #: prefill: one text per prompt row from ``vtprune.set_instructions`` (signal ``instruction``), or None
    instructions: list | None = None
    row_copies: int = 1  # generate's in-place copies of each prompt row (beams / return sequences)
    features: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # token id -> per-image features
    units: list[Unit] = field(default_factory=list)
    mask2d: torch.Tensor | None = None  # bool [B, S]: the prompt's real tokens
    cols: torch.Tensor | None = None  # [B, L] long
    real: torch.Tensor | None = None  # [B, L] bool
    #: prefill: what the signal hooks of the next decoder point's layer K-1 captured
    capture: LayerCapture = field(default_factory=LayerCapture)
    #: what the layers after the last point so far receive (None: no point changed the sequence inside the LM)
    overrides: LayerOverrides | None = None
    scrub_position_ids: bool = False
    records: list[PointRecord] = field(default_factory=list)
    decode_masks: dict = field(default_factory=dict)  # continuation: per stage start, its 2-D mask
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

    def ran(self, method) -> bool:
        """Whether ``method`` pruned at some point of this prefill."""
        return any(r.point.method is method and r.pruned for r in self.records)
