"""``pool``: 2-D average pooling of each image's token grid down to the budget — the "downsample" baseline that
benchmark studies (UniPruneBench, VTC-Bench) found hard to beat.

Vision stage, on the projected tokens. Each grid is pooled on its own: the one grid of a LLaVA-1.5 image, every crop
of a LLaVA-NeXT (AnyRes) image (the part of the crop that survives the model's unpadding), every temporal step of a
Qwen-VL image or video (its ``h/2 x w/2`` merged-token grid). The image's budget ``k`` is shared among its grids in
proportion to their token counts (largest remainders, at least one token each; a budget below the number of grids
gives one token to each of the largest grids and none to the others); a grid with a share of ``k_g`` is
pooled to exactly ``k_g`` windows (``vtprune.functional.pool_windows``: ``adaptive_avg_pool2d``'s windows to an
``h x w`` grid of the grid's aspect ratio when ``k_g = h * w``, rows of ``w`` or ``w + 1`` windows otherwise). Each
pooled token is the mean of its window's tokens and sits at the position of the window's first (top-left) token,
keeping that token's position id.
LLaVA-NeXT row-separator tokens carry no patch and are dropped (kept only when the budget exceeds the patches).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import functional as F
from ..config import PruneConfig
from ..registry import register_method
from ._packing import packed_patches
from .base import ImageInputs, Method, Selection


@dataclass
class PoolConfig(PruneConfig):
    """Grid pooling has no options beyond the budget."""


def split_budget(k: int, sizes: list[int]) -> list[int]:
    """``k`` split over parts of ``sizes`` tokens in proportion to their sizes (largest remainders, ties to the earlier
    part), each share between 1 and its size; when ``k < len(sizes)`` the ``k`` largest parts (ties: earlier) get one
    token each and the others none."""
    if k < len(sizes):
        top = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))[:k]
        return [1 if i in top else 0 for i in range(len(sizes))]
    total = sum(sizes)
    raw = [k * s / total for s in sizes]
    shares = [max(1, min(s, int(r))) for s, r in zip(sizes, raw)]
    order = sorted(range(len(sizes)), key=lambda i: (-(raw[i] - int(raw[i])), i))
    left = k - sum(shares)
    while left > 0 and any(shares[i] < sizes[i] for i in order):
        for i in order:
            if left and shares[i] < sizes[i]:
                shares[i] += 1
                left -= 1
    while left < 0:  # the one-token floors overshot: take back from the largest shares
        i = max(range(len(sizes)), key=lambda j: (shares[j], -j))
        shares[i] -= 1
        left += 1
    return shares


@register_method("pool", PoolConfig)
class Pool(Method):
    stage = "vision"
    signals = frozenset({"features", "projector_inputs"})
    merges = True
    kept_from_grid = True  # each kept token stands for a fixed window of the grid

    def bind(self, adapter) -> None:
        """Refuse a model whose visual tokens include the vision tower's CLS token (no square patch grid to pool)."""
        if adapter.cls_is_visual_token:
            raise ValueError(
                f"pool averages windows of each crop's square patch grid, but this {adapter.config.model_type!r} "
                "model also feeds the vision tower's CLS token to the LLM (vision_feature_select_strategy='full'); "
                "use vision_feature_select_strategy='default' or a method that does not read the grid (e.g. "
                "'divprune', 'random', 'zoo')"
            )

    def grids(self, image: ImageInputs) -> list[tuple[torch.Tensor, int, int]]:
        """The image's token grids: ``(tokens, H, W)`` with ``tokens`` ``[H * W]`` its visual-token indices,
        row-major."""
        grid = image.extra.get("grid")
        if grid is not None:  # Qwen-VL: t temporal steps of (h / m) x (w / m) merged tokens, in order
            t, h, w = (int(v) for v in grid.reshape(-1))
            m = round((t * h * w / image.n) ** 0.5)
            if t * (h // m) * (w // m) != image.n:
                raise RuntimeError(f"pool: grid (t, h, w)={(t, h, w)} does not tile the image's {image.n} tokens")
            per = (h // m) * (w // m)
            return [(torch.arange(i * per, (i + 1) * per), h // m, w // m) for i in range(t)]
        ids, crops, patches = packed_patches(image)
        side = round(patches**0.5)
        if side * side != patches:
            raise ValueError(f"pool: a crop of {patches} patches is not a square grid")
        out = []
        for c in range(crops):
            tokens = ((ids >= c * patches) & (ids < (c + 1) * patches)).nonzero().squeeze(1)
            if tokens.numel() == 0:
                continue
            local = ids[tokens] - c * patches
            rows, cols = local // side, local % side
            h, w = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
            raster = (rows - rows.min()) * w + (cols - cols.min())
            if h * w != tokens.numel():
                raise RuntimeError(f"pool: crop {c}'s surviving patches do not form a rectangle")
            out.append((tokens[torch.argsort(raster)], h, w))
        return out

    def select(self, image: ImageInputs) -> Selection:
        grids = self.grids(image)
        sizes = [g[0].numel() for g in grids]
        k = min(image.k, sum(sizes))
        feats = image.features
        kept, merged, mix = [], [], []  # mix: each kept token's pooling weights over the image's n tokens
        for (tokens, h, w), share in zip(grids, split_budget(k, sizes)):
            if share == 0:
                continue
            first, weights = F.pool_windows(h, w, share)
            tokens = tokens.to(feats.device)
            weights = weights.to(feats.device)
            kept.append(tokens[first.to(feats.device)])
            merged.append((weights @ feats[tokens].float()).to(feats.dtype))
            mix.append(torch.zeros(share, image.n, device=feats.device).index_copy_(1, tokens, weights.float()))
        kept, merged, mix = torch.cat(kept), torch.cat(merged), torch.cat(mix)
        if image.k > k:  # budget beyond the patches: add row separators as they are
            ids, _, _ = packed_patches(image)
            extra = (ids < 0).nonzero().squeeze(1)[: image.k - k].to(feats.device)
            kept, merged = torch.cat([kept, extra]), torch.cat([merged, feats[extra]])
            mix = torch.cat([mix, torch.nn.functional.one_hot(extra, image.n).float()])
        order = torch.argsort(kept)
        return Selection(kept[order], merged[order], weights=mix[order])
