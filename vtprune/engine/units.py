"""Units: one image's (or one video's) visual tokens in one prompt row, and what each prune point kept of them.

Owns :class:`Unit` and :func:`find_units` (locating each image's placeholder run in ``input_ids`` and pairing it
with its features and vision-side record), the padding masks of padded-to-square images
(``vtprune.set_image_sizes``) and the check of what a method returns.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..adapters import ModelAdapter
from ..methods.base import Method, Selection
from .capture import ImageInfo, join_infos


@dataclass
class Unit:
    """One image's (or video's) visual tokens in the prompt. ``present`` indexes the unit's original visual tokens
    still in the sequence (every prune point narrows it); ``merged`` replaces the vectors of the last point's
    kept tokens (merging methods)."""

    row: int
    positions: torch.Tensor  # ascending columns of the unit's tokens in the (padded) prompt row
    features: torch.Tensor | None = None
    info: ImageInfo | None = None
    real_mask: torch.Tensor | None = None  # [n] bool, from the image's original size (set_image_sizes)
    present: torch.Tensor | None = None  # [n'] ascending indices into the unit's n original tokens
    merged: torch.Tensor | None = None  # [n', D] replacement vectors of a merging method, this point
    #: a merging method's selection at this point: (slots before it, kept indices into them, Selection.weights)
    merge_from: tuple | None = None
    #: a video's frame count as the LLM sees it (``ModelAdapter.video_frames``); None: an image, or a video the
    #: adapter cannot split into frames
    frames: int | None = None
    #: the unit is a video (its placeholder is the model's video token), else an image
    video: bool = False

    @property
    def modality(self) -> str:
        """``"video"`` or ``"image"``: what :attr:`vtprune.methods.base.Method.modalities` is matched against."""
        return "video" if self.video else "image"

    @functools.cached_property
    def frame_breaks(self) -> torch.Tensor:
        """Indices into the unit's tokens where a new placeholder run starts (a video frame after timestamp text)."""
        return ((self.positions[1:] - self.positions[:-1]) > 1).nonzero().squeeze(1) + 1

    @property
    def key(self) -> tuple[int, int]:
        return self.row, int(self.positions[0])


def find_units(input_ids: torch.Tensor, visual_ids, features: dict, info: Callable, tiled: bool = False) -> list[Unit]:
    """Every image / video of the prompt ``input_ids`` ``[B, S]``, in prompt order per row. ``features[token_id]``
    are the per-image feature tensors the vision tower produced (None: given by the caller, one unit per
    contiguous placeholder run); ``info(feat)`` their vision-side records. ``tiled``: the feature tensors are tiles
    (InternVL), and consecutive tiles whose tokens form one contiguous placeholder run are one image (one unit)."""
    units: list[Unit] = []
    for token_id in visual_ids:
        where = (input_ids == token_id).nonzero()  # row-major [(row, col)]
        if where.numel() == 0:
            continue
        feats = features.get(token_id)
        if feats is not None:
            lengths = [f.shape[0] for f in feats]
            if sum(lengths) != where.shape[0]:
                raise ValueError(
                    f"{where.shape[0]} visual placeholder tokens (id {token_id}) but the vision features "
                    f"have {sum(lengths)} tokens"
                )
            chunks = list(torch.split(where, lengths))
            groups = _join_tiles(chunks) if tiled else [[i] for i in range(len(chunks))]
            chunks = [torch.cat([chunks[i] for i in g]) for g in groups]
        else:
            chunks, groups = _runs(where), None
        for i, chunk in enumerate(chunks):
            rows = chunk[:, 0].unique()
            if rows.numel() != 1:
                raise ValueError("an image's visual tokens span several batch rows; check the prompt")
            unit = Unit(row=int(rows[0]), positions=chunk[:, 1])
            unit.present = torch.arange(chunk.shape[0], device=chunk.device)
            if feats is not None:
                parts = [feats[j] for j in groups[i]]
                unit.features = parts[0] if len(parts) == 1 else torch.cat(parts)
                unit.info = join_infos([info(f) for f in parts])
            units.append(unit)
    units.sort(key=lambda u: u.key)  # each sample's visual tokens in prompt order
    return units


def mark_videos(adapter: ModelAdapter, input_ids: torch.Tensor, units: list[Unit]) -> None:
    """Give each video unit its ``frames`` (:meth:`ModelAdapter.video_frames`). A video whose placeholder run ends
    in structure tokens after its frames (``ModelAdapter.video_structure_tokens``: LLaVA-OneVision's one newline)
    loses them from the unit: a method sees, and a budget / ``PruneStats`` counts, only the ``T`` frames' tokens;
    the structure tokens stay in the prompt like text (always kept)."""
    video_id = getattr(adapter.config, "video_token_id", None)
    extra = adapter.video_structure_tokens
    for unit in units:
        unit.video = video_id is not None and int(input_ids[unit.row, unit.positions[0]]) == video_id
        if unit.info is None or not unit.video:
            continue
        n = unit.positions.numel() - extra
        if extra:
            info, unit.info = unit.info, dataclasses.replace(unit.info)
            unit.positions, unit.present = unit.positions[:n], unit.present[:n]
            unit.features = unit.features[:n] if unit.features is not None else None
            if info.pack is not None:
                unit.info.pack = lambda scores, pack=info.pack, n=n: pack(scores)[:n]
            if info.token_patches is not None:
                unit.info.token_patches = lambda c, p, tp=info.token_patches, n=n: tp(c, p)[:n]
        unit.frames = adapter.video_frames(unit.info, n)


def attach_real_masks(
    adapter: ModelAdapter, input_ids, units: list[Unit], sizes, threshold: float, copies: int = 1
) -> None:
    """Padding masks of padded-to-square images from their original ``(w, h)`` sizes (one per image, in order).
    ``copies``: ``generate`` repeated each prompt row that many times in place (beams / return sequences), so
    ``sizes`` may also be given once per image of the original prompt rows."""
    images = [u for u in units if int(input_ids[u.row, u.positions[0]]) == adapter.config.image_token_id]
    if copies > 1 and len(sizes) * copies == len(images):
        per_row = [sum(1 for u in images if u.row == r) for r in range(input_ids.shape[0])]
        chunks, at = [], 0
        for r in range(0, input_ids.shape[0], copies):  # the first copy of each original row
            chunks.append(list(sizes[at : at + per_row[r]]))
            at += per_row[r]
        sizes = [s for r in range(input_ids.shape[0]) for s in chunks[r // copies]]
    if len(images) != len(sizes):
        raise ValueError(
            f"vtprune.set_image_sizes gave {len(sizes)} size(s) but the prompt has "
            f"{len(images)} image(s); give one (width, height) per image, in order"
        )
    for unit, size in zip(images, sizes):
        unit.real_mask = adapter.real_patch_mask(size, unit.positions.numel(), threshold).to(unit.positions.device)


def check_selection(method: Method, where: str, out, n: int, k: int, device) -> Selection:
    """What ``method.select`` returned for an image of ``n`` visual tokens and a budget of ``k`` at ``where`` (a prune
    point), as a :class:`Selection` on ``device`` (bare indices: ``merged`` None). A Python list / tuple of ints is
    taken as indices. Raises naming the method, the point and what was expected unless the kept indices are a 1-D
    int64 tensor, ascending, unique, in ``[0, n)``, as many as ``method.kept_count`` allows (``"budget"``: ``k``;
    ``"at_most"``: 1 to ``k``; ``"own"``: 1 to ``n``), and a Selection's ``merged`` / ``weights`` one row per kept
    index (``[k', D]`` / ``[k', n]``)."""
    name = f"method {method.name!r} at {where}"
    sel = out if isinstance(out, Selection) else Selection(out)
    kept = sel.kept
    if isinstance(kept, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in kept):
        kept = torch.tensor(kept, dtype=torch.long, device=device)
    if not isinstance(kept, torch.Tensor):
        raise TypeError(
            f"{name} returned {type(kept).__name__}; expected a 1-D int64 tensor of kept indices (or a "
            "list of ints), or a vtprune.methods.base.Selection"
        )
    if kept.dtype != torch.long or kept.ndim != 1:
        hint = " (a keep mask? return mask.nonzero().squeeze(1))" if kept.dtype == torch.bool else ""
        raise TypeError(
            f"{name} returned a tensor of shape {tuple(kept.shape)} and dtype {kept.dtype}{hint}; "
            "expected a 1-D int64 tensor of kept indices"
        )
    count = method.kept_count
    low, high = (k, k) if count == "budget" else (1, k if count == "at_most" else n)
    if not low <= kept.numel() <= high:
        expected = f"exactly {k}" if low == high else f"{low} to {high}"
        raise RuntimeError(
            f"{name} returned {kept.numel()} indices for an image of {n} visual tokens with a budget of {k}; "
            f"expected {expected} (kept_count={count!r}; a method whose count differs from the budget declares "
            "kept_count='at_most' or 'own')"
        )
    if int(kept.min()) < 0 or int(kept.max()) >= n:
        raise RuntimeError(
            f"{name} returned indices from {int(kept.min())} to {int(kept.max())}; expected indices "
            f"in [0, {n}) (the image's {n} visual tokens)"
        )
    if bool((kept[1:] <= kept[:-1]).any()):
        what = "duplicates" if kept.unique().numel() < kept.numel() else "indices out of order"
        raise RuntimeError(f"{name} returned {what}; expected ascending unique indices (e.g. kept.unique())")
    kept = kept.to(device)
    for field, rows in (("merged", sel.merged), ("weights", sel.weights)):
        if rows is None:
            continue
        if (
            not isinstance(rows, torch.Tensor)
            or rows.ndim != 2
            or rows.shape[0] != kept.numel()
            or (field == "weights" and rows.shape[1] != n)
        ):
            shape = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
            want = f"[{kept.numel()}, D]" if field == "merged" else f"[{kept.numel()}, {n}]"
            raise RuntimeError(
                f"{name} returned Selection.{field} of shape {shape}; expected {want} (one row per kept index)"
            )
    if sel.weights is not None and sel.merged is None:
        raise RuntimeError(f"{name} returned Selection.weights without merged vectors; give merged too")
    return Selection(kept, sel.merged, sel.weights)


def _join_tiles(chunks: list[torch.Tensor]) -> list[list[int]]:
    """Indices of ``chunks`` (each a tile's row-major (row, col) pairs, in order) grouped into images: a tile whose
    first token directly follows the previous tile's last token in the same row continues that image."""
    groups: list[list[int]] = []
    for i, chunk in enumerate(chunks):
        if groups and chunk.shape[0] and chunks[i - 1].shape[0]:
            (r0, c0), (r1, c1) = chunks[i - 1][-1].tolist(), chunk[0].tolist()
            if r0 == r1 and c1 == c0 + 1:
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups


def _runs(where: torch.Tensor) -> list[torch.Tensor]:
    """Split row-major (row, col) pairs into contiguous runs."""
    if where.shape[0] == 0:
        return []
    breaks = ((where[1:, 0] != where[:-1, 0]) | (where[1:, 1] != where[:-1, 1] + 1)).nonzero().squeeze(1) + 1
    return list(torch.tensor_split(where, breaks.tolist()))


def frame_sizes(unit: Unit) -> list[int] | None:
    """For a video unit whose frames are separate placeholder runs in the prompt (text between them: Qwen3-VL /
    Qwen3.5 timestamps), how many of each frame's tokens are still present, in order (0: an earlier point removed
    the whole frame); None for a unit that is one run (an image, or a video without text between frames)."""
    breaks = unit.frame_breaks
    if breaks.numel() == 0:
        return None
    frame = torch.bucketize(unit.present, breaks, right=True)
    return torch.bincount(frame, minlength=breaks.numel() + 1).tolist()


def refill_frames(kept: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``kept`` (ascending indices into the unit's tokens, frames of ``sizes`` tokens in order) with every empty
    frame given its centre token back, taken from the frame that keeps the most (ties: the later frame; its
    highest kept index goes). Keeps the count; a budget below the number of frames leaves the rest empty, and a frame
    of size 0 (already removed) stays so."""
    starts = torch.tensor([0, *sizes[:-1]], device=kept.device).cumsum(0)
    frame = torch.bucketize(kept, starts, right=True) - 1
    counts = torch.bincount(frame, minlength=len(sizes)).tolist()
    kept = kept.tolist()
    for f, size in enumerate(sizes):
        if counts[f] or not size or max(counts) < 2:
            continue
        donor = max(range(len(sizes)), key=lambda g: (counts[g], g))
        lo, hi = int(starts[donor]), int(starts[donor]) + sizes[donor]
        kept.remove(max(i for i in kept if lo <= i < hi))
        kept.append(int(starts[f]) + size // 2)
        counts[donor] -= 1
        counts[f] += 1
    return torch.tensor(sorted(kept), dtype=torch.long, device=starts.device)
