"""Grid pooling: the "downsample" baseline of UniPruneBench / VTC-Bench, 2-D average pooling of a token grid (no
official code: the windows are those of ``torch.nn.functional.adaptive_avg_pool2d``).
"""

from __future__ import annotations

import math

import torch

from ._common import check_int

__all__ = ["pool_windows"]


def pool_windows(height: int, width: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of 2-D average pooling of a row-major ``height x width`` token grid to exactly ``k`` tokens.

    The grid is cut into ``h`` bands of rows, ``h = clamp(round(height * sqrt(k / (height * width))), ceil(k / width),
    min(height, k))`` (the pooled grid keeps the grid's aspect ratio); band ``i`` holds ``c_i`` windows, ``k`` split as
    evenly as possible over the bands (``k // h`` each, the ``k % h`` extra windows spread evenly, later bands first
    within each stride). Band and window edges are those of ``adaptive_avg_pool2d``: ``n`` parts of a length ``L`` are
    ``floor(i L / n) .. ceil((i + 1) L / n) - 1``. When ``k = h * w`` this is exactly ``adaptive_avg_pool2d`` to
    ``h x w`` (e.g. 24 x 24 -> 8 x 8 for 64); otherwise the bands differ by one window (13 of 4 x 4: bands of 3, 3, 3,
    4).

    Returns ``(first, weights)``: ``first`` ``[k]`` int64, the row-major grid index of each window's first (top-left)
    token, ascending; ``weights`` ``[k, height * width]`` float32 with ``weights @ x`` the window means of per-token
    vectors ``x`` ``[height * width, D]``.
    """
    height, width = check_int("height", height, 1), check_int("width", width, 1)
    k = check_int("k", k, 1, height * width)
    h = round(height * math.sqrt(k / (height * width)))
    h = min(height, k, max(h, -(-k // width), 1))
    counts = [k // h + ((i + 1) * (k % h) // h - i * (k % h) // h) for i in range(h)]

    def bounds(size, parts):
        return [(i * size // parts, -((-(i + 1) * size) // parts)) for i in range(parts)]

    weights = torch.zeros(k, height * width)
    first = torch.empty(k, dtype=torch.long)
    grid = torch.arange(height * width).view(height, width)
    out = 0
    for (r0, r1), count in zip(bounds(height, h), counts):
        for c0, c1 in bounds(width, count):
            cell = grid[r0:r1, c0:c1].reshape(-1)
            weights[out, cell] = 1.0 / cell.numel()
            first[out] = int(cell[0])
            out += 1
    return first, weights
