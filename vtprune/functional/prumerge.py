"""PruMerge / PruMerge+: adaptive token count from CLS-attention outliers, key-similarity merging."""

from __future__ import annotations

import torch

from ._common import check_int, check_tensor, compute_dtype, topk_lowtie, unit_rows

__all__ = ["prumerge_attention", "prumerge_count", "prumerge_merge", "prumerge_select"]

#: tokens each kept token merges (the official ``torch.topk(cos_sim_matrix, k=int(32))``)
NEIGHBOURS = 32


def _check_qk(query: torch.Tensor, keys: torch.Tensor) -> None:
    check_tensor("query", query, ndim=1, shape_hint="[C] (the CLS token's q_proj output)", finite=True)
    check_tensor("keys", keys, ndim=2, shape_hint="[N+1, C] (k_proj outputs, CLS first)", finite=True)
    if keys.shape[1] != query.shape[0] or keys.shape[0] < 2:
        raise ValueError(
            f"query [C] and keys [N+1, C] (CLS key first, N >= 1 patches) must agree on C, got "
            f"{tuple(query.shape)} and {tuple(keys.shape)}"
        )


def prumerge_attention(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The CLS query's attention over the patches, ``[N]``: ``softmax(query . keys^T * C^-1/2)[1:]`` over all
    ``N + 1`` keys (CLS key included in the softmax, then dropped), one head over the full width ``C`` (the official
    ``attn = (desired_layer_q @ desired_layer_k.T) * C ** -0.5``, ``cls_attn = attn[:, 0, 1:]``; clip_encoder.py
    lines 109-112 of 42Shawn/LLaVA-PruMerge 097c0411). float32 (float64 for float64 inputs)."""
    _check_qk(query, keys)
    dt = compute_dtype(query, keys)
    logits = keys.to(dt) @ query.to(dt) * query.shape[0] ** -0.5
    return logits.softmax(dim=0)[1:]


def prumerge_count(cls_attn: torch.Tensor) -> int:
    """PruMerge's adaptive count of an ``[N]`` attention row: ``int(N * (c / N))`` with ``c`` the number of
    interquartile-range outliers, entries strictly above ``Q3 + 1.5 (Q3 - Q1)`` (linear-interpolated quartiles,
    numpy's ``percentile`` default; quartiles in float64 of the row). The official ``outlier_dectection`` returns
    the ratio ``c / N`` and the caller takes ``int(N * ratio)`` tokens (clip_encoder.py lines 34-47 and 114-116,
    097c0411), reproduced literally: for ``N = 576`` it is always ``c``, for some ``N`` one less (``N = 49, c = 1``
    gives 0)."""
    check_tensor("cls_attn", cls_attn, ndim=1, shape_hint="[N]", finite=True)
    n = cls_attn.shape[0]
    if n == 0:
        raise ValueError("cls_attn must hold at least one patch, got shape (0,)")
    row = cls_attn.double()
    q1, q3 = (float(torch.quantile(row, q)) for q in (0.25, 0.75))
    outliers = int((row > q3 + 1.5 * (q3 - q1)).sum())
    return int(n * (outliers / n))


def _spatial(n: int, step: int, taken: torch.Tensor) -> torch.Tensor:
    """PruMerge+'s spatially uniform tokens: ``arange(0, N - 1, step)`` without those in ``taken``, ascending (the
    official ``torch.arange(0, 575, int(step_length / 3))`` filtered of ``idx``; ``575`` is ``N - 1`` there)."""
    grid = torch.arange(0, n - 1, step, device=taken.device)
    return grid[~torch.isin(grid, taken)]


def prumerge_select(
    query: torch.Tensor,
    keys: torch.Tensor,
    features: torch.Tensor,
    plus: bool = False,
    *,
    keep: int | None = None,
    return_weights: bool = False,
):
    """PruMerge (``plus=False``) / PruMerge+ (``plus=True``) of one image (42Shawn/LLaVA-PruMerge 097c0411,
    ``llava/model/multimodal_encoder/clip_encoder.py``: ``token_prune_merge_advanced`` lines 85-171 and
    ``token_prune_merge_advanced_plus`` lines 174-281, the latter the repo's default path, line 300).

    Inputs: ``query`` ``[C]`` and ``keys`` ``[N+1, C]`` the ``q_proj`` / ``k_proj`` outputs (full width, heads
    concatenated, bias included) of the CLS token and of every token (CLS first) of the vision layer the official
    code hooks (``layers[23]`` of CLIP ViT-L/336, whose input is ``hidden_states[-2]``, the projector's features);
    ``features`` ``[N, D]`` the patch features the projector reads (``hidden_states[-2][:, 1:]``).

    1. ``a = softmax(query . keys^T / sqrt(C))[1:]`` (:func:`prumerge_attention`).
    2. Kept tokens, in the official emission order: the ``m = int(N * c / N)`` tokens of largest attention,
       descending (:func:`prumerge_count`: ``c`` IQR outliers; ties -> lower index). PruMerge+ appends
       ``arange(0, N - 1, s)`` with ``s = int(int(1 / r) / 3)``, ``r = c / N``, minus the tokens already kept, ascending
       (the official ``575`` is ``N - 1``; with ``c = 0`` the official code divides by zero: here no token is
       appended).
    3. Each kept token ``i``: the ``min(32, N - 1)`` other tokens whose keys (patch keys, L2-normalised) are most
       cosine-similar, searched over the other kept tokens (emission order) then the pruned ones (ascending), ties to
       the earlier there; ``merged_i = x_i + sum_j a_j x_j`` (weights not renormalised, the official
       ``#/ torch.sum(weights)`` is commented out); every kept token reads the original vectors.
    4. The extra row: ``sum_j a_j x_j`` over the pruned tokens (the official ``extra_one_token``; zeros if none).

    ``keep`` (not the paper's; None: the adaptive count above): emit exactly ``keep`` vectors, ``keep - 1`` kept
    tokens plus the extra row, ``1 <= keep <= N``: the IQR outliers (at most ``keep - 1``) by attention; PruMerge+
    then the spatial tokens of the smallest step ``>= s`` (``>= 1`` with ``c = 0``) whose count fits what is left;
    the rest filled by attention rank.

    Returns ``(kept, merged)``: ``kept`` ``[m]`` int64 patch indices in emission order (attention-ranked, then
    PruMerge+'s spatial ones, then the fill), ``merged`` ``[m + 1, D]`` (float32; float64 for float64 inputs) the
    merged vectors in that order plus the extra row last. ``return_weights=True`` adds ``weights`` ``[m + 1, N]``
    with ``merged = weights @ features``. Raises ``ValueError`` / ``TypeError`` on bad shapes or values.
    """
    _check_qk(query, keys)
    return prumerge_merge(
        prumerge_attention(query, keys), keys[1:], features, plus, keep=keep, return_weights=return_weights
    )


def prumerge_merge(
    attn: torch.Tensor,
    keys: torch.Tensor,
    features: torch.Tensor,
    plus: bool = False,
    *,
    keep: int | None = None,
    return_weights: bool = False,
):
    """Steps 2-4 of :func:`prumerge_select` on given scores: ``attn`` ``[N]`` the attention of each patch (the CLS
    row of :func:`prumerge_attention`; on towers without a CLS token, the attention each patch receives, not the
    paper's), ``keys`` ``[N, C]`` the patch keys whose cosine similarity picks each kept token's neighbours (no CLS
    row), ``features`` ``[N, D]`` the vectors merged. ``plus``, ``keep``, ``return_weights`` and the returns as
    :func:`prumerge_select`, whose result this is for ``attn = prumerge_attention(query, keys)``,
    ``keys = keys[1:]``. Raises ``ValueError`` / ``TypeError`` on bad shapes or values."""
    check_tensor("attn", attn, ndim=1, shape_hint="[N] (the attention of each patch)", finite=True)
    check_tensor("keys", keys, ndim=2, shape_hint="[N, C] (the patch keys, no CLS row)", finite=True)
    check_tensor("features", features, ndim=2, shape_hint="[N, D] (the patch features the projector reads)")
    n = attn.shape[0]
    if n == 0 or keys.shape[0] != n:
        raise ValueError(
            f"attn [N] and keys [N, C] must hold the same N >= 1 patches, got {tuple(attn.shape)} and "
            f"{tuple(keys.shape)}"
        )
    if features.shape[0] != n:
        raise ValueError(f"features [N, D] must have one row per patch, got {tuple(features.shape)} for {n} patches")
    if not isinstance(plus, bool):
        raise TypeError(f"plus must be a bool (True: PruMerge+), got {plus!r}")
    if keep is not None:
        keep = check_int("keep", keep, 1, n)
    dt = compute_dtype(attn, keys, features)
    order = topk_lowtie(attn, n)  # every patch by attention, descending, ties -> lower index
    c = prumerge_count(attn)
    if keep is None:
        picked = order[:c]
        if plus and c > 0:
            ratio = c / n
            picked = torch.cat([picked, _spatial(n, int(int(1 / ratio) / 3), picked)])
    else:
        slots = keep - 1
        picked = order[: min(c, slots)]
        if plus and slots > picked.numel():
            step = max(int(int(1 / (c / n)) / 3), 1) if c > 0 else 1
            spatial = _spatial(n, step, picked)
            while spatial.numel() > slots - picked.numel():
                step += 1
                spatial = _spatial(n, step, picked)
            picked = torch.cat([picked, spatial])
        taken = torch.zeros(n, dtype=torch.bool, device=attn.device)
        taken[picked] = True
        fill = order[~taken[order]][: slots - picked.numel()]
        picked = torch.cat([picked, fill])
    m = picked.numel()
    is_kept = torch.zeros(n, dtype=torch.bool, device=attn.device)
    is_kept[picked] = True
    pruned = (~is_kept).nonzero().squeeze(1)  # ascending: the official complement_idx
    weights = torch.zeros(m + 1, n, dtype=dt, device=attn.device)
    if m:
        columns = torch.cat([picked, pruned])  # the search order of each kept token's "rest" (itself excluded)
        units = unit_rows(keys, dt)[columns]
        sim = units[:m] @ units.T  # [m, N] in search order
        rows = torch.arange(m, device=attn.device)
        sim[rows, rows] = float("-inf")  # not itself
        near = columns[topk_lowtie(sim, min(NEIGHBOURS, n - 1))]  # [m, <=32] patch indices
        weights[rows.unsqueeze(1).expand_as(near), near] = attn[near].to(dt)
        weights[rows, picked] += 1.0  # x_i + sum_j a_j x_j
    weights[m, pruned] = attn[pruned].to(dt)
    merged = weights @ features.to(dt)
    return (picked, merged, weights) if return_weights else (picked, merged)
