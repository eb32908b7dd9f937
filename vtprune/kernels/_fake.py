"""Fake (meta) kernels of the native ops: output shapes for torch.compile / FakeTensor, with the same argument
checks as the C++ code where they depend only on shapes and dtypes."""

from __future__ import annotations

import torch

_registered = False


def _check_features(x: torch.Tensor, name: str) -> None:
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64 (the compute dtype: upcast bf16/fp16 first), got {x.dtype}")
    if x.dim() != 2 or x.shape[1] < 1:
        raise ValueError(f"{name} must be 2-D [tokens, D] with D >= 1, got shape {tuple(x.shape)}")


def _check_offsets(x, offsets, k, first) -> None:
    _check_features(x, "x")
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != x.shape[0]:
        raise ValueError(f"offsets must start at 0 and end at x.size(0) = {x.shape[0]}, got {list(offsets)}")
    if len(first) != len(offsets) - 1:
        raise ValueError(f"first must have one entry per image ({len(offsets) - 1}), got {len(first)}")
    smallest = min(b - a for a, b in zip(offsets[:-1], offsets[1:]))
    if smallest < 1:
        raise ValueError(f"every image needs at least one token: offsets must increase, got {list(offsets)}")
    if not 1 <= k <= smallest:
        raise ValueError(f"k must be in [1, {smallest}] (the number of tokens of the smallest image), got {k}")


def _kcenter(x, offsets, k, first, metric):
    _check_offsets(x, offsets, k, first)
    if metric not in ("cosine", "l2"):
        raise ValueError(f"metric must be 'cosine' or 'l2', got '{metric}'")
    return x.new_empty((len(offsets) - 1, k), dtype=torch.long)


def _maxsum(x, offsets, k, first):
    _check_offsets(x, offsets, k, first)
    return x.new_empty((len(offsets) - 1, k), dtype=torch.long)


def _dart_pick(units, pivots, excluded, counts):
    _check_features(units, "units")
    _check_features(pivots, "pivots")
    if not (units.device == pivots.device == excluded.device):
        raise ValueError(
            f"units, pivots and excluded must be on one device, got {units.device}, "
            f"{pivots.device} and {excluded.device}"
        )
    if len(counts) != pivots.shape[0]:
        raise ValueError(f"counts must have one entry per pivot ({pivots.shape[0]}), got {len(counts)}")
    total = min(sum(counts), units.shape[0] - excluded.shape[0])
    return units.new_empty((total,), dtype=torch.long)


def _dbdpc(dist, rank, cutoff):
    if dist.dim() != 2 or dist.shape[0] != dist.shape[1]:
        raise ValueError(f"dist must be a square [N, N] distance matrix, got shape {tuple(dist.shape)}")
    if dist.device != rank.device:
        raise ValueError(f"dist and rank must be on one device, got {dist.device} and {rank.device}")
    return rank.new_empty((dist.shape[0],))


def register() -> None:
    """Register the fake kernels (once the ops are defined by the loaded library)."""
    global _registered
    if _registered:
        return
    for name, fn in (("kcenter", _kcenter), ("maxsum", _maxsum), ("dart_pick", _dart_pick), ("dbdpc", _dbdpc)):
        torch.library.register_fake(f"vtprune::{name}")(fn)
    _registered = True
