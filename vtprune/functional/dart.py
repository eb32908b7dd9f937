"""DART: duplication-aware token reduction with key-norm pivots."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import kernels
from ._common import check_int, check_tensor, compute_dtype, cosine_to_row, topk_lowtie, unit_rows

__all__ = ["dart_select"]


def _per_pivot_list(per_pivot, num_pivots: int) -> list:
    if isinstance(per_pivot, (str, bytes)) or isinstance(per_pivot, bool):
        raise TypeError(f"per_pivot must be an int or a sequence of ints, got {per_pivot!r}")
    try:
        items = list(per_pivot)
    except TypeError:  # a single int for every pivot
        return [check_int("per_pivot", per_pivot, 0)] * num_pivots
    if len(items) != num_pivots:
        raise ValueError(
            f"per_pivot has {len(items)} entries but there are {num_pivots} pivots "
            "(min(image_pivots, image_len) + min(text_pivots, number of text tokens "
            "after the image)); give one count per pivot, in ascending position order"
        )
    return [check_int(f"per_pivot[{i}]", v, 0) for i, v in enumerate(items)]


def dart_select(
    hidden: torch.Tensor,
    keys: torch.Tensor,
    image_start: int,
    image_len: int,
    per_pivot: int | Sequence[int],
    image_pivots: int = 4,
    text_pivots: int = 4,
) -> torch.Tensor:
    """DART token selection (ZichenWen1/DART): keep pivots plus the tokens least similar to them.

    1. Pivots: the ``image_pivots`` image tokens (positions ``image_start ..
       image_start + image_len - 1``) and the ``text_pivots`` text tokens (every position
       ``>= image_start + image_len``) with the largest L1 norm ``||keys[p]||_1`` (ties -> lower
       position). If fewer tokens exist than asked for, all of them are pivots.
    2. Pool = image tokens minus the image pivots.
    3. For each pivot ``p`` in ascending position order (our reading: the official code iterates
       a Python set): take the ``per_pivot`` pool tokens with the lowest
       ``cos(hidden[p], hidden[i])`` (ties -> lower position) and remove them from the pool.
       If the pool runs out, stop.
    4. Kept = image pivots + all picks (text pivots are not image tokens).

    Args:
        hidden: ``[S, D]`` output hidden states of decoder layer K-1 after the LLM's final norm
            (with its weight).
        keys: ``[S, Dk]`` post-RoPE keys of layer K-1, heads flattened.
        image_start: sequence position of the first image token.
        image_len: number of image tokens (>= 1).
        per_pivot: picks per pivot: one int for every pivot, or a sequence with one int per pivot
            in processing order (length ``min(image_pivots, image_len) + min(text_pivots,
            S - image_start - image_len)``), so a caller can split a budget exactly. The official
            LLaVA-1.5 setting is ``ceil(budget // 8)`` for every pivot.
        image_pivots: number of image pivots (official 4).
        text_pivots: number of text pivots (official 4).

    Returns:
        int64 ascending image-relative indices (``0 .. image_len - 1``) of the kept tokens, image
        pivots included, on ``hidden.device``. Cosine and norms are computed in float32 (float64
        for float64 input). Step 3 runs in one native call (``torch.ops.vtprune.dart_pick``) when
        ``vtprune.kernels`` has it for the device, with the same rules (see ``VTPRUNE_NO_EXT``).
    """
    check_tensor("hidden", hidden, ndim=2, shape_hint="[S, D]", finite=True)
    check_tensor("keys", keys, ndim=2, shape_hint="[S, Dk]", finite=True)
    seq = hidden.shape[0]
    if keys.shape[0] != seq:
        raise ValueError(
            f"hidden and keys must have the same sequence length, got hidden "
            f"{tuple(hidden.shape)} and keys {tuple(keys.shape)}"
        )
    image_start = check_int("image_start", image_start, 0, max(seq - 1, 0))
    image_len = check_int("image_len", image_len, 1, seq - image_start)
    image_pivots = check_int("image_pivots", image_pivots, 0)
    text_pivots = check_int("text_pivots", text_pivots, 0)
    image_end = image_start + image_len
    n_img_piv = min(image_pivots, image_len)
    n_txt_piv = min(text_pivots, seq - image_end)
    counts = _per_pivot_list(per_pivot, n_img_piv + n_txt_piv)

    device = hidden.device
    dtype = compute_dtype(hidden, keys)
    l1 = keys.to(dtype).abs().sum(dim=-1)  # [S]
    img_piv = topk_lowtie(l1[image_start:image_end], n_img_piv).sort().values  # image-relative
    txt_piv = topk_lowtie(l1[image_end:], n_txt_piv).sort().values + image_end  # absolute
    pivots = torch.cat([img_piv + image_start, txt_piv])  # ascending positions

    units = unit_rows(hidden, dtype)
    image_units = units[image_start:image_end]

    if kernels.native(device):  # the per-pivot loop in one native call (csrc/cpu/select.cpp, csrc/cuda)
        picks = torch.ops.vtprune.dart_pick(
            image_units.contiguous(), units[pivots].contiguous(), img_piv.contiguous(), counts
        )
        return torch.cat([img_piv, picks]).sort().values

    picks = dart_pick_torch(image_units, units[pivots], img_piv, counts)
    return torch.cat([img_piv, picks]).sort().values


def dart_pick_torch(units: torch.Tensor, pivots: torch.Tensor, excluded: torch.Tensor, counts) -> torch.Tensor:
    """Pure-torch reference of the native ``torch.ops.vtprune.dart_pick``: DART's per-pivot picks.

    ``units`` ``[N, D]`` unit-norm image rows, ``pivots`` ``[P, D]`` unit-norm pivot rows, ``excluded`` ``[E]`` image
    rows never picked (the image pivots), ``counts`` ``P`` ints. Pivot ``t`` in turn takes the ``counts[t]`` available
    rows least cosine-similar to it (ties to the lower index) and removes them from the pool; stops when the pool
    is empty. Returns the picks ``[<= sum(counts)]`` int64, in pick order."""
    available = torch.ones(units.shape[0], dtype=torch.bool, device=units.device)
    available[excluded] = False
    remaining = int(available.sum())
    picks = [torch.zeros(0, dtype=torch.long, device=units.device)]
    for t, count in enumerate(counts):
        if remaining == 0:
            break
        take = min(count, remaining)
        if take == 0:
            continue
        row = cosine_to_row(units, pivots[t].unsqueeze(0)).masked_fill_(~available, float("inf"))
        chosen = topk_lowtie(row, take, largest=False)
        available[chosen] = False
        remaining -= take
        picks.append(chosen)
    return torch.cat(picks)
