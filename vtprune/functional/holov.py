"""HoloV (obananas/HoloV, NeurIPS 2025): crop-wise budget allocation, then top-attention tokens in each crop.

Official code: ``llava/model/utils.py`` function ``HoloV`` (lines 22-151), called from ``llava/model/llava_arch.py``
(``prepare_inputs_labels_for_multimodal``, ``HoloV(image_features, image_attns, num_patches=16,
new_image_token_num=64)``); the Qwen2.5-VL port ``qwen-model-HoloV/utils.py`` (lines 43-198, the same math with
``alpha=1, beta=0.09, power=1``) derives the crop count from the budget in ``modeling_qwen2_5_vl.py`` (line 1916:
``num_patches = max(1, int(((1024/576) * N) / keep))``). Commit 1d2e65e961e698ff0e7d5bb4625489177dd9deba.
"""

from __future__ import annotations

import torch

from ._common import as_int, check_k, check_rows, compute_dtype, topk_lowtie

__all__ = ["holov_crop_count", "holov_select"]

#: HoloV's weight of the similarity-variance term (official ``alpha = 0.09``; the Qwen port's ``beta``)
HOLOV_ALPHA = 0.09
#: the official ``esp``: added to norms and denominators
HOLOV_EPS = 1e-6
#: the official attention scale (``patch_attn * 1e3``)
HOLOV_ATTN_SCALE = 1e3


def holov_crop_count(n: int, k: int) -> int:
    """The official crop count for ``n`` tokens and a budget of ``k`` (``modeling_qwen2_5_vl.py`` line 1916):
    ``max(1, int(((1024 / 576) * n) / k))`` -- 16 at LLaVA-1.5's 64 of 576, the value ``llava_arch.py`` hard-codes."""
    return max(1, int(((1024 / 576) * n) / k))


def holov_select(
    features: torch.Tensor,
    cls_attn: torch.Tensor,
    k: int,
    crops: int | None = None,
    alpha: float = HOLOV_ALPHA,
) -> torch.Tensor:
    """HoloV's kept tokens, in the official emission order.

    A "crop" (the official code's "patch") is a contiguous run of the token sequence, not a spatial tile: the ``N``
    tokens, in the order given (LLaVA: raster order; LLaVA-NeXT: the base image then the unpadded AnyRes grid), are
    cut into ``C = crops`` runs, the first ``N % C`` of ``N // C + 1`` tokens and the rest of ``N // C``
    (empty runs, when ``N < C``, are skipped).

    1. Score each crop. A crop of ``s >= 2`` tokens with features ``x`` and attention ``a``: ``u = x / (||x|| +
       eps)``, ``S = u u^T`` with its diagonal set to 0, ``m_i = sum_j S_ij / (s - 1)``, ``v_i = sum_j (S_ij -
       m_i)^2 / (s - 1)`` (the zeroed diagonal included), ``A = 1e3 a``, ``t = A + alpha * v * mean|A| / (mean|v| +
       eps)``; the crop's score is ``mean(t)``. A crop of one token scores its attention, unscaled. (For non-negative
       attention the score is ``1e3 mean(a) (1 + alpha mean(v) / (mean(v) + eps))``: nearly proportional to the
       crop's mean attention.)
    2. Allocate: ``w = score / (sum score + eps)``, ``alloc = floor(w k)``; the ``k - sum alloc`` tokens left go one
       each to the crops of largest ``w`` (ties -> lower crop).
    3. Emit, crop by crop: nothing where ``alloc = 0``; every token, in order, where ``alloc >= s``; else the
       ``alloc`` highest-attention tokens in descending attention (ties -> lower index).

    The official code then pads the output with zero vectors up to ``k`` tokens (a crop allotted more than it has
    leaves the rest unfilled); this function returns the real tokens only, so it may return fewer than ``k``.

    Args:
        features: ``[N, D]`` the projected visual tokens (the official code's ``image_features`` after the projector).
        cls_attn: ``[N]`` non-negative attention per token (LLaVA: the head-mean [CLS] row of the layer the projector
            reads, CLS column dropped).
        k: the budget, ``1 <= k <= N`` (official ``new_image_token_num``).
        crops: ``C``, an int >= 1, or None for :func:`holov_crop_count` ``(N, k)``.
        alpha: weight of the variance term (official 0.09), a finite number >= 0.

    Returns: ``[<= k]`` int64 indices in emission order. Scores in float32 (float64 for float64 input).
    Raises ``TypeError`` / ``ValueError`` on bad shapes or values.
    """
    n = check_rows(("features", features, "[N, D]"), ("cls_attn", cls_attn, "[N]"), at_least=1)
    if bool((cls_attn < 0).any()):
        raise ValueError("cls_attn must be non-negative (attention weights: HoloV allocates in proportion to them)")
    k = check_k(k, n)
    c = holov_crop_count(n, k) if crops is None else as_int(crops, "crops must be None or an int >= 1")
    if c < 1:
        raise ValueError(f"crops must be None or an int >= 1, got {crops!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) < float("inf"):
        raise ValueError(f"alpha must be a finite number >= 0 (official 0.09), got {alpha!r}")
    dt = compute_dtype(features, cls_attn)
    x, a = features.to(dt), cls_attn.to(dt)
    base, rem = divmod(n, c)
    # the crops come in (at most) two sizes: the first `rem` of base + 1 tokens, then c - rem of `base`
    groups = [(size, count) for size, count in ((base + 1, rem), (base, c - rem)) if size > 0 and count > 0]
    scores, orders, start = [], [], 0
    for size, count in groups:
        xs = x[start : start + size * count].view(count, size, -1)
        at = a[start : start + size * count].view(count, size)
        if size == 1:
            scores.append(at[:, 0])
        else:
            u = xs / (torch.linalg.vector_norm(xs, dim=-1, keepdim=True) + HOLOV_EPS)
            sim = torch.bmm(u, u.transpose(1, 2))
            sim = sim * (1 - torch.eye(size, dtype=dt, device=x.device))
            mean = sim.sum(-1) / (size - 1)
            var = (sim - mean.unsqueeze(-1)).square().sum(-1) / (size - 1)
            scaled = at * HOLOV_ATTN_SCALE
            factor = scaled.abs().mean(-1, keepdim=True) / (var.abs().mean(-1, keepdim=True) + HOLOV_EPS)
            scores.append((scaled + float(alpha) * var * factor).mean(-1))
        orders.append(topk_lowtie(at, size))  # [count, size]: each crop's tokens by descending attention
        start += size * count
    score = torch.cat(scores)
    weights = score / (score.sum() + HOLOV_EPS)
    alloc = torch.floor(weights * k).long()
    remaining = k - int(alloc.sum())
    if remaining > 0:
        alloc[topk_lowtie(weights, min(remaining, weights.numel()))] += 1
    out, first, offset = [], 0, 0
    for (size, count), order in zip(groups, orders):
        take = alloc[first : first + count].unsqueeze(1)  # [count, 1]
        whole = take >= size  # crops kept whole, in index order
        local = torch.where(whole, torch.arange(size, device=x.device).expand(count, size), order)
        mask = torch.arange(size, device=x.device) < take  # the first `alloc` of each crop's order
        index = local + offset + size * torch.arange(count, device=x.device).unsqueeze(1)
        out.append(index[mask])  # row-major: crop by crop, each in its emission order
        first, offset = first + count, offset + size * count
    return torch.cat(out).to(torch.long)
