"""Positions of a pruned prompt: M-RoPE numbering as the unpruned prompt (steps 2 and 4 of
:mod:`vtprune.vllm.qwen_vl`), and the extra channels that carry each kept row's place from ``embed_multimodal`` to
``recompute_mrope_positions``.

Each kept row leaves ``embed_multimodal`` with :data:`EXTRA` extra channels holding :data:`VALUES` integers (its
frame, the item's number of frames, its rank in its placeholder run, its original (t, h, w) offset from the run's
first position); :meth:`Positions.recompute_mrope_positions` strips them and writes the kept tokens' original
positions into the request's M-RoPE positions. Pure torch / numpy: no vLLM import.
"""

from __future__ import annotations

import numpy as np
import torch

from ..adapters.qwen_grid import grid_positions

#: values carried by each kept row in extra channels: the frame of the item it belongs to and the item's number of
#: frames (placeholder runs: Qwen3-VL videos have one per frame, every other item one), its rank among the kept
#: tokens of that run, and its original (t, h, w) position offset from the run's first position
VALUES = 6
#: each value as two base-256 digits, exact in bf16 / fp16 (integers up to 256 are exact there) below 65536
_DIGITS = 2
EXTRA = VALUES * _DIGITS


def encode_values(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` ``[m, VALUES]`` int64 in [0, 65536) -> ``[m, EXTRA]`` channels (high, low digit per value)."""
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 256**_DIGITS):
        raise ValueError(
            f"vtprune.vllm: a position or rank of {int(values.max())} does not fit the extra channels "
            f"(allowed: 0 <= value < {256**_DIGITS})"
        )
    return torch.stack([values // 256, values % 256], dim=-1).reshape(values.shape[0], -1).to(dtype)


def decode_values(channels: torch.Tensor) -> torch.Tensor:
    pairs = channels.float().round().long().reshape(channels.shape[0], -1, _DIGITS)
    return pairs[..., 0] * 256 + pairs[..., 1]


class Positions:
    """The positions part of the pruning model classes (a mixin before vLLM's model class)."""

    def _frame_runs(self, modality: str) -> bool:
        """Whether an item of ``modality`` is one placeholder run per frame (Qwen3-VL videos)."""
        return False

    def _run_values(self, kept: torch.Tensor, modality: str, grid: tuple[int, int, int], t_factor: float):
        """``[k, VALUES]``: per kept token (ascending indices into the item's tokens) its frame, the item's number of
        frames, its rank in its frame's run and its (t, h, w) offset from the run's first position."""
        t, h, w = grid
        k = kept.numel()
        if self._frame_runs(modality):
            per = h * w
            frame = kept // per
            first = torch.searchsorted(frame, frame)  # index of the frame's first kept token (kept ascends)
            rank = torch.arange(k) - first
            pos = torch.from_numpy(grid_positions(1, h, w))[:, kept % per]
            head = torch.stack([frame, torch.full_like(frame, t), rank])
        else:
            pos = torch.from_numpy(grid_positions(t, h, w, t_factor))[:, kept]
            head = torch.stack([torch.zeros(k, dtype=torch.long), torch.ones(k, dtype=torch.long), torch.arange(k)])
        return torch.cat([head, pos.long()]).T

    def _grids(self, input_tokens, mm_features):
        """``(offset, t, h, w, t_factor, k)`` of each placeholder run, in prompt order (h, w in merged tokens; ``k``
        the run's kept count)."""
        raise NotImplementedError

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """The pruned prompt's positions: text as in the unpruned prompt; each run's ``k`` placeholders hold
        stand-ins until :meth:`recompute_mrope_positions` writes the kept tokens' original positions."""
        if self.vtprune_config is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        chunks, st, next_pos = [], 0, 0
        for offset, t, h, w, t_factor, k in self._grids(input_tokens, mm_features):
            text_len = offset - st
            chunks.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_pos)
            full = grid_positions(t, h, w, t_factor) + text_len + next_pos
            chunks.append(full[:, :k])
            next_pos = int(full.max()) + 1
            st = offset + k
        if st < len(input_tokens):
            text_len = len(input_tokens) - st
            chunks.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_pos)
            next_pos += text_len
        positions = np.concatenate(chunks, axis=1).reshape(3, -1)
        return torch.from_numpy(positions), next_pos - len(input_tokens)

    def _runs(self, ids: torch.Tensor) -> list[tuple[int, int]]:
        """``(start, end)`` of every placeholder run of the prompt ``ids``, in order: each maximal run of image /
        video tokens, and an empty run after each vision-start token followed directly by vision-end (a Qwen3-VL
        video frame that keeps no token)."""
        cfg = self.config
        visual = (ids == cfg.image_token_id) | (ids == cfg.video_token_id)
        where = visual.nonzero().squeeze(1)
        breaks = (where[1:] != where[:-1] + 1).nonzero().squeeze(1) + 1
        runs = [(int(r[0]), int(r[-1]) + 1) for r in torch.tensor_split(where, breaks.tolist()) if r.numel()]
        empty = ((ids[:-1] == cfg.vision_start_token_id) & (ids[1:] == cfg.vision_end_token_id)).nonzero()
        runs += [(int(i) + 1, int(i) + 1) for i in empty.squeeze(1)]
        return sorted(runs)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """Write the kept tokens' original positions (carried in the extra channels) into ``mrope_positions``
        ``[3, N]`` of the whole prompt; ``multimodal_embeddings`` are the slices of the items this step's chunk
        covers, in prompt order (a slice may be part of an item under chunked prefill). Returns the rows without
        the extra channels (Qwen3-VL: the projected feature and its DeepStack levels, as vLLM splits them)."""
        if self.vtprune_config is None:
            return super().recompute_mrope_positions(
                input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens
            )
        ids = torch.as_tensor(input_ids, dtype=torch.long).cpu()
        runs = self._runs(ids)
        positions = mrope_positions.clone()
        out = []
        item = None  # index of the current item's first run
        for emb in multimodal_embeddings:
            values = decode_values(emb[:, -EXTRA:]).to(positions.device)  # [m, VALUES]
            frame, frames, rank, offsets = values[:, 0], values[:, 1], values[:, 2], values[:, 3:]
            if item is None:  # the first slice may start inside its item: at the first kept token to compute
                here = next(i for i, (start, end) in enumerate(runs) if end > start and end > num_computed_tokens)
                item = here - int(frame[0])
            starts = torch.tensor([runs[item + f][0] for f in range(int(frames[0]))], device=positions.device)
            slots = starts[frame] + rank
            base = positions[0, starts[frame] - 1] + 1  # each run's first position: one past its vision-start token
            positions[:, slots] = base + offsets.T
            out.append(emb[:, :-EXTRA])
            item += int(frames[0])
        delta = int(positions.max()) + 1 - ids.numel()
        return out, positions, delta
