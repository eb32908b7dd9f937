"""DeepStack (Qwen3-VL): the extra feature levels that follow the kept visual tokens through every prune point.

Qwen3-VL's vision tower taps ``vision_config.deepstack_visual_indexes`` and merges each tap like the main features;
the text model adds level ``i`` to the visual rows (``visual_pos_masks``) after decoder layer ``i``. Owns
:class:`DeepStack`: which level row each slot of the current sequence holds (``index``), so that

* a compaction (vision entry or decoder point) slices every level with the same kept tokens;
* a merging method merges every level's rows with the weights it merged the main vectors with
  (:attr:`vtprune.methods.base.Selection.weights`);
* the injection after layer ``i`` adds level ``i``'s rows to exactly the slots that hold them (the engine wraps the
  adapter's ``deepstack_method``; the unpatched call runs when nothing was pruned).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DeepStack:
    """``index[b, j]``: the row of every level's row bank that slot ``j`` of row ``b`` holds (-1: none). The banks
    start as the levels the host passed (``[V, D]`` each, visual rows in row-major prompt order) and grow by the
    rows a merging point creates."""

    index: torch.Tensor  # [B, L] long
    originals: list[torch.Tensor]  # the host's level tensors (identity: which level an injection is)
    banks: list[torch.Tensor]
    changed: bool = False  # a point compacted or merged: the host's own injection no longer fits

    @staticmethod
    def from_host(visual_pos_masks: torch.Tensor, levels: list[torch.Tensor]) -> DeepStack:
        mask = visual_pos_masks.bool()
        index = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
        index[mask] = torch.arange(int(mask.sum()), device=mask.device)
        for level in levels:
            if level.shape[0] != int(mask.sum()):
                raise ValueError(f"a DeepStack level has {level.shape[0]} rows for {int(mask.sum())} visual tokens")
        return DeepStack(index, list(levels), list(levels))

    def compact(self, layout) -> None:
        """Follow a compaction (:class:`~.layout.Layout`) of the current sequence."""
        self.index = layout.take(self.index, 1).masked_fill(~layout.valid, -1)
        self.changed = True

    def merge(
        self, row: int, slots: torch.Tensor, kept: torch.Tensor, weights: torch.Tensor | None, name: str, layer: int = 0
    ) -> None:
        """A merging method at decoder layer ``layer`` (0: vision entry) replaced the vectors of ``slots[kept]`` (row
        ``row``) by ``weights [k, n] @`` the vectors of ``slots`` (the unit's tokens before it selected): every level
        still to be injected (level i joins after layer i, so those with ``i >= layer``) is merged the same way."""
        if layer >= len(self.banks):
            return  # every level was injected before this point: nothing left to merge
        if weights is None:
            raise ValueError(
                f"method {name!r} merges tokens without saying how (Selection.weights): the DeepStack "
                "levels of the merged tokens cannot be merged the same way; use a selecting method or "
                "prune after the last DeepStack layer"
            )
        rows = self.index[row, slots]
        if bool((rows < 0).any()):
            raise RuntimeError("a merged token holds no DeepStack row")
        new = []
        for i, bank in enumerate(self.banks):
            mixed = (weights.to(torch.float32) @ bank[rows].to(torch.float32)).to(bank.dtype)
            new.append(mixed)
            self.banks[i] = torch.cat([bank, mixed])
        start = self.banks[0].shape[0] - new[0].shape[0]
        self.index[row, slots[kept]] = torch.arange(start, start + kept.numel(), device=self.index.device)
        self.changed = True

    def inject(self, hidden: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[B, L, D]`` with ``level``'s rows (one of the host's levels) added to the slots holding them,
        with the host's arithmetic."""
        i = next((j for j, t in enumerate(self.originals) if t is level), None)
        if i is None:
            raise RuntimeError("a DeepStack level the engine was not given reached the decoder")
        mask = self.index >= 0
        rows = self.banks[i][self.index[mask]].to(hidden.device, hidden.dtype)
        hidden = hidden.clone()
        hidden[mask, :] = hidden[mask, :] + rows
        return hidden
