"""Which visual tokens a method kept, drawn over the image (Pillow only).

    kept = vtprune.stats(model).kept_indices[0]
    vtprune.viz.overlay(image, kept, grid=16)                     # one method
    vtprune.viz.compare(image, {"cls": kept_a, "dart": kept_b})   # side by side, titled

Indices are row-major over a ``grid x grid`` patch layout (LLaVA-1.5: CLS dropped, 24 x 24 at 336 px; the bundled
shapes model: 16 x 16 at 224 px). The image is shown the way a CLIP processor sees it (shortest side resized to
``size``, centre crop), so patches line up with what the model saw.
"""

from __future__ import annotations

from typing import Mapping, Sequence

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
        raise ValueError(f"kept indices must lie in [0, {grid * grid}) for a {grid}x{grid} grid, got "
                         f"min {int(kept.min())}, max {int(kept.max())}")
    mask = torch.zeros(grid * grid, dtype=torch.bool)
    mask[kept] = True
    return mask


def overlay(image: Image.Image, kept: Sequence[int] | torch.Tensor, grid: int, size: int | None = None,
            dim: float = 0.25, outline: tuple[int, int, int] = (255, 200, 0)) -> Image.Image:
    """The image with dropped patches darkened to ``dim`` of their brightness and kept patches outlined.
    ``size``: the processor's input side (default: the image's shorter side, no resize)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image, got {type(image).__name__}")
    if not 0.0 <= dim <= 1.0:
        raise ValueError(f"dim must be in [0, 1], got {dim!r}")
    view = processed_view(image, size or min(image.size))
    mask = _kept_mask(kept, grid)
    out = view.copy()
    dark = Image.eval(view, lambda v: int(v * dim))
    draw = ImageDraw.Draw(out)
    side = view.width / grid
    for index in range(grid * grid):
        r, c = divmod(index, grid)
        box = (round(c * side), round(r * side), round((c + 1) * side), round((r + 1) * side))
        if mask[index]:
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=outline)
        else:
            out.paste(dark.crop(box), box[:2])
    return out


def compare(image: Image.Image, kept_by_method: Mapping[str, Sequence[int] | torch.Tensor], grid: int,
            size: int | None = None, scale: int = 2) -> Image.Image:
    """One :func:`overlay` per method, side by side under a title line (``name: kept count``), enlarged ``scale``x."""
    if not kept_by_method:
        raise ValueError("kept_by_method is empty: give {method name: kept indices}")
    tiles = []
    for name, kept in kept_by_method.items():
        tile = overlay(image, kept, grid, size)
        tile = tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)
        tiles.append((f"{name}: {len(torch.as_tensor(kept).reshape(-1))}", tile))
    pad, title = 6, 16
    width = sum(t.width for _, t in tiles) + pad * (len(tiles) + 1)
    height = max(t.height for _, t in tiles) + title + 2 * pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    x = pad
    for text, tile in tiles:
        draw.text((x, pad // 2), text, fill="black")
        sheet.paste(tile, (x, pad + title))
        x += tile.width + pad
    return sheet
