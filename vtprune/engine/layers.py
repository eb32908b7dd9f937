"""What the decoder layers after a prune point receive: masks sized for the shortened sequence (by layer type) and
rotary tables of the kept tokens' positions, in prefill (:meth:`LayerInputs.shorten`) and in every step that
continues a pruned cache (:meth:`LayerInputs.continue_at`); recorded as :class:`~.forward.LayerOverrides` on the
forward for the layers that follow."""

from __future__ import annotations

import torch

from .. import compat
from .forward import Forward, LayerOverrides
from .layout import Layout


class LayerInputs:
    """The masks and rotary tables of layers ``>= start`` of ``adapter``'s language model (``num_layers`` decoder
    layers); ``compact``: ``positions="compact"`` (kept tokens renumbered 0, 1, ...)."""

    def __init__(self, adapter, num_layers: int, compact: bool):
        self.adapter, self.num_layers, self.compact = adapter, num_layers, compact

    def first_layers(self, start: int) -> dict[str, int]:
        """Each layer type of layers >= ``start`` -> its first layer (whose cache sizes that type's mask)."""
        first = {}
        for i in range(start, self.num_layers):
            first.setdefault(self.adapter.layer_type(i), i)
        return first

    def masks(self, hidden, mask2d, cache, start: int, token_types=None) -> dict:
        """The masks of layers >= ``start`` for their sequence, by layer type; ``token_types`` ``[B, L]`` (families
        with bidirectional image blocks: the slots' types) make each run of image tokens one block."""
        blocks = self.adapter.block_ids(token_types) if token_types is not None else None
        return compat.causal_masks(
            self.adapter.language_model.config, hidden, mask2d, cache, self.first_layers(start), blocks
        )

    def _rope_by_type(self, hidden, positions, start: int):
        """Rotary per layer type (Gemma 3): each type's tables at ``positions``, and those of layer ``start``."""
        types = self.first_layers(start)
        by_type = {kind: self.adapter.rotary(hidden, positions, layer) for kind, layer in types.items()}
        return by_type, next(r for kind, r in by_type.items() if types[kind] == start)

    def shorten(self, fwd: Forward, layout: Layout, start: int, hidden, kwargs: dict, cache):
        """The cut layer's inputs (hidden states, rotary tables, masks) for the compacted sequence, set in
        ``kwargs``; the layers after it get the same (``fwd.overrides``). Returns ``(hidden, masks)``."""
        hidden = layout.take(hidden, 1)
        if self.compact:
            fwd.positions = layout.compact_positions() if fwd.positions is not None else None
        rope_by_type = None
        if self.adapter.rotary_per_layer_type:  # each type's tables at the slots' positions
            rope_by_type, rope = self._rope_by_type(hidden, fwd.positions, start)
        elif self.compact:
            rope = self.adapter.rotary(hidden, layout.compact_positions(), start)
        else:
            cos, sin = kwargs["position_embeddings"]
            rope = (layout.take(cos, 1), layout.take(sin, 1))
        masks = self.masks(hidden, fwd.real.long(), cache, start, fwd.current_types())
        fwd.overrides = LayerOverrides(start, masks, rope, rope_by_type)
        kwargs.update(position_embeddings=rope, position_ids=None)
        return hidden, masks

    def continue_at(self, fwd: Forward, start: int, hidden, kwargs: dict, cache) -> dict:
        """A continuation step at a stage's start layer: that layer and the ones after it get masks sized for their
        shorter cache (and, positions="compact", rotary tables of the renumbered positions, per layer type where the
        model has them, as in :meth:`shorten`). Sets ``kwargs`` and ``fwd.overrides``; returns the masks."""
        masks = self.masks(hidden, fwd.decode_masks[start], cache, start)
        rope = rope_by_type = None
        if start in fwd.decode_positions and start > 0:
            pos = fwd.decode_positions[start]
            if self.adapter.rotary_per_layer_type:
                rope_by_type, rope = self._rope_by_type(hidden, pos, start)
            else:
                rope = self.adapter.rotary(hidden, pos, start)
        fwd.overrides = LayerOverrides(start, masks, rope, rope_by_type)
        kwargs["position_ids"] = None
        if rope is not None:
            kwargs["position_embeddings"] = rope
        return masks

    def continue_prompt(self, fwd: Forward, kwargs: dict, embeds, mask):
        """The language model's inputs in a forward that continues a pruned prompt's cache (a decode step, or a later
        text turn of ``q`` tokens): ``mask`` covers the unpruned columns (``S + t``, as the unpatched model's would);
        the cache reports the unpruned length, so the host numbers positions as for the unpruned prompt. Fills
        ``fwd.decode_masks`` (per stage) and, ``positions="compact"``, ``fwd.decode_positions``; returns the LM's
        ``(args, kwargs)``, or None where the vision entry dropped nothing (the LM's input is as unpatched)."""
        cache = compat.get_cache(kwargs)
        q = embeds.shape[1]
        rows = fwd.prompt.stages[0][1].gather.shape[0]
        if embeds.shape[0] != rows:
            raise ValueError(
                f"a forward continues a pruned KV cache with {embeds.shape[0]} rows, but its prompt was pruned with "
                f"{rows}: a decoding loop that expands the batch after the prompt's forward (a cache passed to "
                "generate with num_beams / num_return_sequences > 1, which transformers does not expand either; "
                "contrastive search, a custom_generate loop) cannot continue it. Expand the inputs before the "
                "prompt's forward (as beam search does; a second turn: greedy / sampling with one sequence per "
                "row, or a new prompt with the images), or unpatch"
            )
        past = cache.get_seq_length()  # unpruned length (PrunedPrompt)
        fwd.decode_masks = fwd.prompt.masks(mask, past + q)
        if self.compact:  # kept tokens renumbered from each row's first real token, dropped ones not counted
            pos = kwargs.get("position_ids")
            if pos is None and mask is not None:  # number from the mask, as the compacted prompt was
                pos = (mask.long().cumsum(1) - 1).clamp(min=0)[:, -q:]
            elif pos is None:
                pos = self.adapter.default_position_ids(embeds.shape[0], q, past, embeds.device)
            shift = torch.zeros_like(pos[:, 0])
            for start, layout in fwd.prompt.stages:  # each stage's tokens are renumbered after its compaction
                shift = shift + layout.shift.to(pos.device)
                fwd.decode_positions[start] = pos - shift[:, None]
        if 0 not in fwd.decode_masks:
            return None
        kwargs["attention_mask"] = fwd.decode_masks[0]
        if self.compact:
            kwargs["position_ids"] = fwd.decode_positions[0]
        return (), kwargs
