"""Which crop patch each of an image's visual tokens carries, from the model's own packing (``pack_crop_scores``)."""

from __future__ import annotations

import torch

from .base import ImageInputs


def packed_patches(image: ImageInputs) -> tuple[torch.Tensor, int, int]:
    """``(ids, C, P)``: ``ids`` ``[n]`` int64, for each of the image's ``n`` visual tokens the flat index ``c * P + p``
        of the crop patch it carries (crop ``c`` of ``C``, patch ``p`` of ``P``, as in ``projector_inputs`` ``[C, P,
        .]``),
        or -1 for a token that carries no patch (a LLaVA-NeXT row separator: the packing gives it the image's lowest
        score, i.e. it repeats the id of a patch packed before it). A single crop with one projector row per visual
        token
    (LLaVA-1.5; Qwen, whose projector rows are merge units) maps token ``j`` to row ``j``. Needs the
    ``projector_inputs`` signal."""
    c, p = image.projector_inputs.shape[:2]
    device = image.projector_inputs.device
    if c == 1 and p == image.n:  # one projector row per visual token (LLaVA-1.5; Qwen's merge units, concatenated)
        return torch.arange(p, device=device), c, p
    flat = torch.arange(c * p, dtype=torch.float64, device=device).view(c, p)
    packed = image.pack_crop_scores(flat)
    n = packed.numel()
    if n == image.n and packed.dtype == torch.float64 and not bool((packed == packed.round()).all()):
        raise ValueError(
            "this method needs each visual token to carry one vision patch, but this image's (or video's) visual "
            "tokens blend several patches: the model interpolates its features (LLaVA-OneVision's anyres_max "
            "downscale of a large image, LLaVA-OneVision's bilinear video pooling). Use a method that scores tokens "
            "(e.g. 'random', 'divprune', 'zoo', 'fastv', 'dart') on such inputs"
        )
    if n != image.n or packed.dtype != torch.float64 or not bool((packed == packed.round()).all()):
        raise RuntimeError(
            f"the model's packing did not map patch ids exactly ({n} tokens of dtype {packed.dtype} for "
            f"an image of {image.n} visual tokens)"
        )
    packed = packed.long()
    order = torch.arange(n, device=device)
    first = torch.full((c * p,), n, dtype=torch.long, device=device).scatter_reduce_(0, packed, order, "amin")
    return torch.where(first[packed] == order, packed, -1), c, p


def crop_tokens(image: ImageInputs) -> tuple[torch.Tensor, int, list[torch.Tensor]]:
    """``(ids, P, parts)``: ``ids`` and ``P`` as :func:`packed_patches` (one crop's projector rows), and per crop that
    has visual tokens, ascending, the visual tokens carrying its patches (``[t]`` int64, ascending). Row separators
    (``ids == -1``) belong to no part. Needs the ``projector_inputs`` signal."""
    ids, _, p = packed_patches(image)
    crop_of = torch.where(ids >= 0, ids // p, -1)
    crops = crop_of[crop_of >= 0].unique()
    return ids, p, [(crop_of == c).nonzero().squeeze(1) for c in crops.tolist()]
