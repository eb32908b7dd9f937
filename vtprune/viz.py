"""Which visual tokens a method kept, drawn over the image (Pillow only).

    kept = vtprune.stats(model).kept_indices[0]
    vtprune.viz.overlay(image, kept, grid=16)                     # one method
    vtprune.viz.compare(image, {"cls": kept_a, "dart": kept_b})   # side by side, titled
    vtprune.viz.compare(image, {"pool": vtprune.stats(model)}, grid=16, columns=4)  # merged regions, rows of 4

Indices are row-major over a ``grid x grid`` patch layout (LLaVA-1.5: CLS dropped, 24 x 24 at 336 px; the bundled
shapes model: 16 x 16 at 224 px). The image is shown the way a CLIP processor sees it (shortest side resized to
``size``, centre crop), so patches line up with what the model saw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from PIL import Image, ImageDraw

__all__ = ["processed_view", "overlay", "compare"]


def processed_view(image: Image.Image, size: int) -> Image.Image:
    """``image`` resized so its shorter side is ``size`` and centre-cropped to ``size x size`` (CLIP preprocessing)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image, got {type(image).__name__}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an int >= 1, got {size!r}")
    w, h = image.size
    scale = size / min(w, h)
    resized = image.convert("RGB").resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def _kept_mask(kept, grid: int) -> torch.Tensor:
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be an int >= 1 (patches per side), got {grid!r}")
    kept = torch.as_tensor(kept, dtype=torch.long).reshape(-1)
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= grid * grid):
        raise ValueError(
            f"kept indices must lie in [0, {grid * grid}) for a {grid}x{grid} grid, got "
            f"min {int(kept.min())}, max {int(kept.max())}"
        )
    mask = torch.zeros(grid * grid, dtype=torch.bool)
    mask[kept] = True
    return mask


def _groups(merged_into, grid: int) -> torch.Tensor:
    groups = torch.as_tensor(merged_into, dtype=torch.long).reshape(-1)
    if groups.numel() != grid * grid:
        raise ValueError(
            f"merged_into must have one entry per patch ({grid * grid} for a {grid}x{grid} grid), got {groups.numel()}"
        )
    if groups.numel() and (int(groups.min()) < -1 or int(groups.max()) >= grid * grid):
        raise ValueError(f"merged_into entries must be -1 (dropped) or a patch index in [0, {grid * grid})")
    return groups


def overlay(
    image: Image.Image,
    kept: Sequence[int] | torch.Tensor,
    grid: int,
    size: int | None = None,
    dim: float = 0.25,
    outline: tuple[int, int, int] = (255, 200, 0),
    merged_into: Sequence[int] | torch.Tensor | None = None,
) -> Image.Image:
    """The image with dropped patches darkened to ``dim`` of their brightness and kept patches outlined.
    ``size``: the processor's input side (default: the image's shorter side, no resize). ``merged_into`` (a merging
    method: ``PruneStats.merged_into[row]``, one entry per patch, the kept patch it was merged into or -1): the
    patches a merged token covers stay bright and each merged token's region is outlined as a whole."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image, got {type(image).__name__}")
    if not 0.0 <= dim <= 1.0:
        raise ValueError(f"dim must be in [0, 1], got {dim!r}")
    view = processed_view(image, size or min(image.size))
    mask = _kept_mask(kept, grid)
    groups = _groups(merged_into, grid) if merged_into is not None else torch.where(mask, torch.arange(grid * grid), -1)
    out = view.copy()
    dark = Image.eval(view, lambda v: int(v * dim))
    draw = ImageDraw.Draw(out)
    side = view.width / grid

    def box(index):
        r, c = divmod(index, grid)
        return round(c * side), round(r * side), round((c + 1) * side), round((r + 1) * side)

    for index in range(grid * grid):
        if groups[index] < 0 and not mask[index]:
            b = box(index)
            out.paste(dark.crop(b), b[:2])
    for index in range(grid * grid):  # the outline of each region: edges between patches of different regions
        g = int(groups[index])
        if g < 0:
            continue
        x0, y0, x1, y1 = box(index)
        r, c = divmod(index, grid)
        if c == 0 or int(groups[index - 1]) != g:
            draw.line((x0, y0, x0, y1 - 1), fill=outline)
        if c == grid - 1 or int(groups[index + 1]) != g:
            draw.line((x1 - 1, y0, x1 - 1, y1 - 1), fill=outline)
        if r == 0 or int(groups[index - grid]) != g:
            draw.line((x0, y0, x1 - 1, y0), fill=outline)
        if r == grid - 1 or int(groups[index + grid]) != g:
            draw.line((x0, y1 - 1, x1 - 1, y1 - 1), fill=outline)
    return out


def compare(
    image: Image.Image,
    kept_by_method: Mapping[str, object],
    grid: int,
    size: int | None = None,
    scale: int = 2,
    columns: int | None = None,
) -> Image.Image:
    """One :func:`overlay` per method under a title line (``name: kept count``), enlarged ``scale``x, in rows of
    ``columns`` panels (default: all in one row). A value is the kept indices, or a :class:`vtprune.PruneStats`
    (its first sample: ``kept_indices[0]`` and, for a merging method, the regions ``merged_into[0]`` covers)."""
    if not kept_by_method:
        raise ValueError("kept_by_method is empty: give {method name: kept indices or PruneStats}")
    if columns is not None and (isinstance(columns, bool) or not isinstance(columns, int) or columns < 1):
        raise ValueError(f"columns must be None or an int >= 1, got {columns!r}")
    tiles = []
    for name, value in kept_by_method.items():
        merged = None
        if hasattr(value, "kept_indices"):  # a PruneStats
            merged = value.merged_into[0] if getattr(value, "merged_into", None) else None
            value = value.kept_indices[0]
        tile = overlay(image, value, grid, size, merged_into=merged)
        tile = tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)
        tiles.append((f"{name}: {len(torch.as_tensor(value).reshape(-1))}", tile))
    columns = min(columns or len(tiles), len(tiles))
    rows = -(-len(tiles) // columns)
    pad, title = 6, 16
    cell_w = max(t.width for _, t in tiles) + pad
    cell_h = max(t.height for _, t in tiles) + title + pad
    sheet = Image.new("RGB", (columns * cell_w + pad, rows * cell_h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (text, tile) in enumerate(tiles):
        x, y = pad + (i % columns) * cell_w, pad + (i // columns) * cell_h
        draw.text((x, y - pad // 2), text, fill="black")
        sheet.paste(tile, (x, y + title))
    return sheet
