"""Per-frame selection of a video unit (``PruneConfig.frame_budget``): the allocator x selector split.

With ``frame_budget="video"`` (default) a vision-stage method selects over a whole video unit. With ``"uniform"``,
``"uniqueness"`` (VidCom2) or ``"segments"`` (DySeg) the engine shares the unit's budget ``k`` among its ``T``
frames (:func:`vtprune.functional.frame_budgets` on the unit's features ``[T, n // T, D]``) and calls the method's
``select`` once per frame with a budget > 0, on a :class:`~vtprune.methods.base.VisionInputs` restricted to that
frame (:func:`frame_inputs`); the frames' indices (and a merging method's merged vectors / weights) are joined back
into one :class:`~vtprune.methods.base.Selection` over the unit. A frame whose budget covers it keeps every token
without a call. Images (``frames`` None) and decoder points are not split.

Restricting the vision-side signals to frame ``t``: the video's tower patches, flattened crop by crop
(``c * P + p``), are ``T`` equal blocks, one per frame, because the tower's crops are the frames (LLaVA-NeXT-Video,
LLaVA-OneVision: ``C = T``, block ``t`` = crop ``t``) or the tower holds the whole video as one crop in frame order
(Qwen-VL: ``C = 1``, block ``t`` = patches ``[t * P / T, (t + 1) * P / T)``; its projector inputs are one row per
token). Any other layout (e.g. a CLS row over a multi-frame crop) raises ``ValueError`` naming the method and the
option that works (``frame_budget="video"``).
"""

from __future__ import annotations

import torch

from .. import functional as F
from ..methods.base import Method, Selection, VisionInputs, _Extra
from .units import check_selection

#: VisionInputs fields laid out per tower crop (dim 0: crops); ``projector_inputs`` is [C, P or tokens, D_in]
_CROP_FIELDS = ("cls_attention", "vision_keys", "vision_qk", "received", "projector_inputs")
#: the dim of each field that holds the crop's patches (with a leading CLS row where the tower has one)
_PATCH_DIM = {"cls_attention": 3, "vision_keys": 2, "vision_qk": 3, "received": 2, "projector_inputs": 1}


def splits(method: Method, inputs: VisionInputs) -> bool:
    """Whether ``method``'s selection on ``inputs`` runs per frame: a video at the vision entry whose method's
    ``frame_budget`` is not ``"video"`` (and that has more than one frame)."""
    rule = getattr(method.config, "frame_budget", "video")
    return rule != "video" and inputs.layer == 0 and inputs.frames is not None and inputs.frames > 1


def select_per_frame(
    method: Method, inputs: VisionInputs, feats: torch.Tensor, positions: torch.Tensor, where: str
) -> Selection:
    """``method``'s selection on a video unit (``feats`` ``[n, D]`` its projected features, which the allocator reads
    whatever the method's signals; ``positions`` its prompt columns), run once per frame with the frame
    budgets of the method's ``frame_budget`` rule; ``where`` names the prune point in errors. Returns a Selection
    over the unit's ``n`` tokens (ascending: frames in order; merged vectors and ``[k', n]`` weights when any frame's
    selection merged)."""
    t, n, k = inputs.frames, inputs.n, inputs.k
    m = n // t
    budgets = F.frame_budgets(feats.reshape(t, m, -1), k, method.config.frame_budget)
    pieces = []  # (first token of the frame, its Selection)
    for frame, budget in enumerate(budgets):
        lo = frame * m
        if budget >= m:  # the whole frame: no call (as for a unit whose budget covers it)
            pieces.append((lo, Selection(torch.arange(m, device=feats.device))))
        elif budget > 0:
            out = method.select(frame_inputs(method, inputs, frame, budget, int(positions[lo])))
            pieces.append((lo, check_selection(method, f"{where}, frame {frame}", out, m, budget, feats.device)))
    kept = torch.cat([sel.kept + lo for lo, sel in pieces])
    if all(sel.merged is None for _, sel in pieces):
        return Selection(kept)
    merged, weights = [], torch.zeros(kept.numel(), n, device=feats.device)
    row = 0
    for lo, sel in pieces:
        rows = torch.arange(row, row + sel.kept.numel(), device=feats.device)
        merged.append(sel.merged if sel.merged is not None else feats[sel.kept + lo])
        if sel.weights is not None:
            weights[rows, lo : lo + m] = sel.weights.float().to(feats.device)
        else:  # a kept token carries itself
            weights[rows, sel.kept + lo] = 1.0
        row += sel.kept.numel()
    return Selection(kept, torch.cat([x.to(feats.dtype) for x in merged]), weights)


def frame_inputs(method: Method, inputs: VisionInputs, frame: int, k: int, start: int) -> VisionInputs:
    """``inputs`` (a video unit of ``T`` frames) restricted to ``frame``: its ``n // T`` tokens, budget ``k``,
    ``frames=1``, ``image_start`` the frame's first prompt column ``start``, and the vision-side signals of its
    block of tower patches."""
    raw = dict(vars(inputs))
    raw.pop("_undeclared", None)
    t, n = inputs.frames, inputs.n
    m = n // t
    lo, hi = frame * m, (frame + 1) * m
    crops = _crops(raw)
    out = dict(raw, n=m, k=k, n_original=m, frames=1, image_start=start)
    for name in ("features", "real_mask"):
        if isinstance(raw[name], torch.Tensor):
            out[name] = raw[name][lo:hi]
    for name in _CROP_FIELDS:
        if isinstance(raw[name], torch.Tensor):
            out[name] = _frame_block(raw[name], name, frame, t, crops, method)
    if callable(raw["pack_crop_scores"]):
        out["pack_crop_scores"] = _frame_pack(raw["pack_crop_scores"], frame, t, crops, lo, hi)
    if callable(raw["token_patches"]):
        out["token_patches"] = _frame_patches(raw["token_patches"], frame, t, crops, lo, hi)
    extra = dict(dict.items(raw["extra"]))
    if isinstance(extra.get("grid"), torch.Tensor):
        grid = extra["grid"].clone().reshape(-1, 3)
        grid[:, 0] = 1
        extra["grid"] = grid
    out["extra"] = _Extra(extra)
    return VisionInputs(**out).hide_undeclared(method)


def _crops(raw: dict) -> int | None:
    for name in _CROP_FIELDS:
        if isinstance(raw[name], torch.Tensor):
            return int(raw[name].shape[0])
    return None


def _frame_block(x: torch.Tensor, name: str, frame: int, t: int, crops: int, method: Method) -> torch.Tensor:
    """Frame ``frame``'s part of a per-crop signal: crop ``frame`` (crops = frames) or its block of the one crop's
    patches (a single crop in frame order, no CLS row)."""
    if crops == t:
        return x[frame : frame + 1]
    dim = _PATCH_DIM[name]
    if crops == 1 and x.shape[dim] % t == 0:
        size = x.shape[dim] // t
        return x.narrow(dim, frame * size, size)
    raise ValueError(
        f"frame_budget={method.config.frame_budget!r}: method {method.name!r} reads {name!r} of shape "
        f"{tuple(x.shape)} for a video of {t} frames, which cannot be restricted to one frame (the tower's crops "
        "are neither the frames nor one crop in frame order); use frame_budget='video', or a method that reads only "
        "the features (e.g. 'divprune', 'random')"
    )


def _frame_pack(pack, frame: int, t: int, crops: int | None, lo: int, hi: int):
    """The video's ``pack_crop_scores`` restricted to one frame: the frame's scores placed in its block of the
    video's (zero elsewhere), packed by the video's own map, the frame's tokens taken."""

    def fn(scores: torch.Tensor) -> torch.Tensor:
        c = crops if crops is not None else t
        if c == t:
            full = scores.new_zeros(t, *scores.shape[1:])
            full[frame] = scores.reshape(scores.shape[1:]) if scores.shape[0] == 1 else scores
        else:
            flat = scores.reshape(1, -1)
            full = scores.new_zeros(1, flat.shape[1] * t)
            full[:, frame * flat.shape[1] : (frame + 1) * flat.shape[1]] = flat
        return pack(full)[lo:hi]

    return fn


def _frame_patches(token_patches, frame: int, t: int, crops: int | None, lo: int, hi: int):
    """The video's ``token_patches`` restricted to one frame, in the frame's own patch numbering."""

    def fn(c: int, p: int) -> torch.Tensor:
        full_c, full_p = (t, p) if (crops or t) == t else (1, p * t)
        ids = token_patches(full_c, full_p)[lo:hi]
        block = full_c * full_p // t
        return torch.where(ids >= 0, ids - frame * block, ids)

    return fn
