"""Sequence layout: how prune points compact a prompt, and the bookkeeping a pruned prompt leaves on its KV cache.

Owns :class:`Layout` (one compaction: which columns of a sequence each row keeps, rows re-left-padded) and
:class:`PrunedPrompt` (the chain of compactions of one prompt, one per prune point, stored on the cache it
filled). The cache then reports the *unpruned* length to its consumers (generate's new-token slicing, default
and M-RoPE decode positions) while the mask functions see what each layer stores
(:func:`vtprune.compat.report_lengths`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .. import compat


@dataclass
class Layout:
    """One compaction: slot j of row b holds column ``gather[b, j]`` of the sequence before it (valid slots);
    rows are left-padded to a common length."""

    gather: torch.Tensor  # [B, L'] long
    valid: torch.Tensor  # [B, L'] bool
    seq_len: int  # length of the sequence before this compaction
    shift: torch.Tensor | None = None  # [B] real tokens dropped per row (positions="compact")

    @property
    def dropped(self) -> int:
        """Columns the compaction removed: ``seq_len - L'``."""
        return self.seq_len - self.gather.shape[1]

    def compact_positions(self) -> torch.Tensor:
        """``[B, L']`` position ids numbering each row's kept tokens 0, 1, ... (padding slots get 0)."""
        return (self.valid.long().cumsum(1) - 1).clamp(min=0)

    @staticmethod
    def from_keep(keep: torch.Tensor) -> Layout:
        """The compaction keeping the True columns of ``keep`` ``[B, S]`` (bool)."""
        b, s = keep.shape
        counts = keep.sum(1)
        width = int(counts.max())
        gather = torch.zeros(b, width, dtype=torch.long, device=keep.device)
        valid = torch.zeros(b, width, dtype=torch.bool, device=keep.device)
        for row in range(b):
            cols = keep[row].nonzero().squeeze(1)
            gather[row, width - cols.numel() :] = cols
            valid[row, width - cols.numel() :] = True
        return Layout(gather, valid, s)

    def take(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Gather the kept columns of ``x`` along its sequence dim ``dim`` (batch dim is ``dim - 1``)."""
        dim = dim % x.ndim
        b, w = self.gather.shape
        shape = list(x.shape)
        shape[dim - 1] = b
        x = x.expand(*shape)
        idx_shape = [1] * x.ndim
        idx_shape[dim - 1], idx_shape[dim] = b, w
        idx = self.gather.view(idx_shape).expand(*shape[:dim], w, *shape[dim + 1 :])
        return x.gather(dim, idx)

    def compress_mask(self, mask: torch.Tensor | None, total: int) -> torch.Tensor | None:
        """A 2-D mask over ``seq_len + t`` columns (this compaction's input and ``t`` later tokens) -> over the
        ``L' + t`` kept ones. ``mask=None`` means all ones (``total`` columns)."""
        if mask is None:
            if bool(self.valid.all()):
                return None
            mask = torch.ones(self.gather.shape[0], total, dtype=torch.long, device=self.gather.device)
        if mask.ndim != 2:
            raise ValueError(f"pruned models need a 2-D attention_mask, got shape {tuple(mask.shape)}")
        head = self.take(mask[:, : self.seq_len], 1) * self.valid.to(mask.dtype)
        return torch.cat([head, mask[:, self.seq_len :]], dim=1)


@dataclass
class PrunedPrompt:
    """The bookkeeping of a pruned prompt, stored on the KV cache it filled (one source of truth: whoever holds
    the cache holds its layout, whichever call, loop or turn continues it).

    ``stages`` are the prompt's compactions in the order they act, each ``(start, layout)``: from decoder layer
    ``start`` on (0: the vision entry) each layer's cache holds that layout's kept columns of the previous one.
    ``owner`` is the patch (session) that pruned it: only that patch can continue the cache.
    """

    stages: list[tuple[int, Layout]] = field(default_factory=list)
    owner: Any = None

    def __deepcopy__(self, memo):  # a copied cache shares the (immutable) layouts and the owner
        return PrunedPrompt(list(self.stages), self.owner)

    def hidden(self, layer_idx: int) -> int:
        """Prompt columns that layer ``layer_idx``'s cache does not hold."""
        return sum(layout.dropped for start, layout in self.stages if layer_idx >= start)

    def masks(self, mask: torch.Tensor | None, total: int) -> dict[int, torch.Tensor | None]:
        """A continuation's 2-D mask over the unpruned columns (``total`` of them) -> the mask of each stage's
        sequence, keyed by the stage's start layer."""
        out = {}
        for start, layout in self.stages:
            mask = layout.compress_mask(mask, total)
            total = layout.gather.shape[1] + (total - layout.seq_len)
            out[start] = mask
        return out


_PROMPT_ATTR = "_vtprune_pruned_prompt"

STATIC_CACHE = (
    "a static KV cache (StaticCache, cache_implementation='static' or any pre-allocated, compileable cache) is not "
    "supported on a pruned model: its pre-built masks assume the unpruned length. Use the default dynamic cache "
    "(DynamicCache, or no cache argument)"
)


def pruned_prompt(cache) -> PrunedPrompt | None:
    """The :class:`PrunedPrompt` a cache was filled by (None: not a cache vtprune pruned)."""
    return None if cache is None else getattr(cache, _PROMPT_ATTR, None)


def attach_prompt(cache, prompt: PrunedPrompt) -> None:
    """Store ``prompt`` on ``cache``; the cache reports the unpruned length from then on."""
    if compat.is_static(cache):
        raise ValueError(STATIC_CACHE)
    cache.__dict__[_PROMPT_ATTR] = prompt
    compat.report_lengths(cache, _hidden)


def _hidden(cache, layer_idx: int) -> int:
    prompt = pruned_prompt(cache)
    if prompt.owner is not None and not prompt.owner.installed:
        raise ValueError(ORPHANED_CACHE)
    return prompt.hidden(layer_idx)


ORPHANED_CACHE = (
    "this KV cache holds a prompt that a vtprune patch pruned, and that patch is no longer installed (unpatch, or "
    "another patch since): only the patch that pruned a prompt can continue its cache. Start a new prompt (no "
    "cache), or keep the patch while you continue the conversation"
)


def detach_prompt(cache) -> None:
    cache.__dict__.pop(_PROMPT_ATTR, None)
    compat.restore_lengths(cache)
