"""SparseVLM (Gumpest/SparseVLMs, ICML 2025): text raters, rater-scored selection at each pruning layer, recycling of
pruned tokens by DPC-KNN clustering; SparseVLM+'s gravity correction and priority heads. Each layer's selection is a
pure function here; the layers are run by ``vtprune.methods.sparsevlm``.

Official code read: SparseVLM v1.5 branch at 26a5f488 (``llava/model/language_model/modelling_sparse_llama.py``,
``score.py``, ``utils.py: cluster_and_merge``), the first release 91fb6d98 (``score.py: attn_postprocess_rank``) and
SparseVLM+ on the v2.0 branch at 9e1f649e (``modelling_sparse_llama.py`` with ``USE_VERSION=2_0``; ``score.py:
select_attn_head_by_sum``). The RoPE-only gravity term SparseVLM+ divides by is :func:`vtprune.functional.rope_gravity`
(``rope.py``: the engine offers it to every method).
"""

from __future__ import annotations

import math

import torch

from ._common import check_int, check_k, check_tensor, compute_dtype, topk_lowtie

__all__ = [
    "sparsevlm_raters",
    "sparsevlm_select",
    "sparsevlm_rank_count",
    "dpc_knn_merge",
    "sparsevlm_plus_attention",
]


def sparsevlm_raters(vis_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """SparseVLM's text raters, chosen once from the language model's input embeddings.

    ``m = mean_v softmax_t(V T^T)`` (softmax over the text tokens, then the mean over image tokens); the raters are
    the text tokens with ``m_t > mean(m)`` (official ``torch.where(m_v_t > m_v_t.mean())``, Section 3.2.2).
    Computed in float32 (the official code multiplies in the model dtype). When every ``m_t`` is equal (e.g. one
    text token) no token is strictly above the mean: then every text token is a rater (the official code would
    average an empty set and keep arbitrary tokens).

    Args:
        vis_embeds: ``[V, D]`` the image's token embeddings (the projector's output, as the LLM receives it).
        text_embeds: ``[T, D]`` the embeddings of the text after the image (official: every token after it).

    Returns:
        int64 ascending indices into ``text_embeds``.
    """
    check_tensor("vis_embeds", vis_embeds, ndim=2, shape_hint="[V, D]", finite=True)
    check_tensor("text_embeds", text_embeds, ndim=2, shape_hint="[T, D]", finite=True)
    if vis_embeds.shape[0] < 1 or text_embeds.shape[0] < 1:
        raise ValueError(
            f"sparsevlm_raters needs at least one image and one text token, got V={vis_embeds.shape[0]}"
            f", T={text_embeds.shape[0]}"
        )
    if vis_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(
            f"vis_embeds [V, D] and text_embeds [T, D] must share D, got {vis_embeds.shape[1]} and "
            f"{text_embeds.shape[1]}"
        )
    dt = compute_dtype(vis_embeds, text_embeds)
    m = (vis_embeds.to(dt) @ text_embeds.to(dt).T).softmax(dim=1).mean(dim=0)
    raters = (m > m.mean()).nonzero().squeeze(1)
    if raters.numel() == 0:
        raters = torch.arange(m.numel(), device=m.device)
    return raters


def _rater_scores(attn: torch.Tensor) -> torch.Tensor:
    check_tensor("attn", attn, ndim=3, shape_hint="[H, R, V]", finite=True)
    if min(attn.shape) < 1:
        raise ValueError(f"attn [H, R, V] must have at least one head, rater and image token, got {list(attn.shape)}")
    return attn.to(compute_dtype(attn)).mean(dim=0)  # [R, V]


def sparsevlm_plus_attention(attn: torch.Tensor, gravity: torch.Tensor, heads: int = 14) -> torch.Tensor:
    """SparseVLM+ (v2.0 9e1f649e): the rater->image attention after its two corrections, ready for
    :func:`sparsevlm_select` (with ``recycle=False``: SparseVLM+ merges nothing).

    1. Gravity correction (paper section 4.2): every head's attention probabilities divided elementwise by the
       RoPE-only term (:func:`vtprune.functional.rope_gravity`) of the same query / key positions, as the official
       code divides the whole ``[H, L, L]`` map (no clamping: a term near zero or negative is used as it is).
    2. Priority heads (section 4.3, ``select_attn_head_by_sum``): the ``heads`` heads with the largest corrected
       rater->image mass (sum over raters and image tokens) are kept, in descending mass (``torch.topk``; ties ->
       lower head index here); the official count is 14 (of LLaVA-1.5-7B's 32 heads, Qwen2.5-VL-7B's 28). A model
       with at most ``heads`` heads keeps all of them (the official ``topk(14)`` would fail there).

    Args:
        attn: ``[H, R, V]`` attention probabilities of the ``R`` rater rows over the ``V`` image tokens, per head.
        gravity: ``[R, V]`` the RoPE-only term of the same rows and columns.
        heads: heads to keep, ``>= 1``.

    Returns:
        ``[min(heads, H), R, V]`` corrected attention of the kept heads (float32; float64 for float64 input).
    """
    check_tensor("attn", attn, ndim=3, shape_hint="[H, R, V]", finite=True)
    check_tensor("gravity", gravity, ndim=2, shape_hint="[R, V]", finite=True)
    if tuple(gravity.shape) != tuple(attn.shape[1:]):
        raise ValueError(
            f"gravity must be [R, V] = {list(attn.shape[1:])} to match attn [H, R, V], got {list(gravity.shape)}"
        )
    heads = check_int("heads", heads, 1)
    dt = compute_dtype(attn, gravity)
    corrected = attn.to(dt) / gravity.to(dt)[None]
    if heads >= corrected.shape[0]:
        return corrected
    mass = corrected.sum(dim=(1, 2))
    return corrected[topk_lowtie(mass, heads)]


def sparsevlm_rank_count(attn: torch.Tensor, scale: float, bias: float) -> int:
    """SparseVLM's first-release token count (91fb6d98 ``attn_postprocess_rank``): ``min(int(rank(P) * scale +
    bias), V - 1)`` with ``P`` the head-mean rater x image attention ``[R, V]`` and ``rank`` from
    ``torch.linalg.matrix_rank`` (default tolerance) in float32. When ``rank(P) == V`` the official layer prunes
    nothing: then ``V`` is returned. The count is at least 1.

    Args:
        attn: ``[H, R, V]`` rater rows' attention probabilities over the image tokens, per head.
        scale, bias: the per-budget constants (official 192 -> (13.5, 0), 128 -> (9, 6), 64 -> (0.8, 0)).
    """
    p = _rater_scores(attn)
    for name, v in (("scale", scale), ("bias", bias)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    v = p.shape[1]
    rank = int(torch.linalg.matrix_rank(p.float()))
    if rank == v:
        return v
    return max(1, min(int(rank * scale + bias), v - 1))


def dpc_knn_merge(x: torch.Tensor, clusters: int, return_weights: bool = False):
    """SparseVLM's recycling clusterer (official ``cluster_and_merge``, DPC-KNN), deterministic.

    Distances ``d_ij = ||x_i - x_j|| / sqrt(D)``; density ``rho_i = exp(-mean of d^2 over the `clusters` nearest
    tokens, itself included)``; ``delta_i`` = distance to the nearest token of strictly higher density (the largest
    distance of the matrix for the densest); centres = the ``clusters`` largest ``rho * delta`` (ties -> lower
    index); every token joins its nearest centre (ties -> the earlier centre), a centre itself; each cluster becomes
    ``sum(members) / (count + 1e-6)`` (the official weighting). The official code adds ``1e-6 * rand`` to the
    densities; here there is no noise and every tie goes to the lower index.

    Args:
        x: ``[N, D]`` the tokens to cluster (SparseVLM: the best-scored pruned tokens, in descending score order).
        clusters: ``1 <= clusters <= N``.

    Returns:
        ``(merged [clusters, D] in x's dtype, centres [clusters] int64 indices into x)``, in centre order (the
        ``rho * delta`` ranking), plus with ``return_weights`` the ``[clusters, N]`` float32 weights with
        ``merged = weights @ x`` (``1 / (count + 1e-6)`` on each cluster's members).
    """
    check_tensor("x", x, ndim=2, shape_hint="[N, D]", finite=True)
    n, d = x.shape
    c = check_k(clusters, n, "tokens to cluster")
    dt = compute_dtype(x)
    xf = x.to(dt)
    dist = torch.cdist(xf, xf, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(d)
    nearest = torch.sort(dist, dim=1, stable=True).values[:, :c]
    density = (-(nearest**2).mean(dim=1)).exp()
    denser = density[None, :] > density[:, None]  # [i, j]: j denser than i
    delta = torch.where(denser, dist, dist.max()).min(dim=1).values
    centres = topk_lowtie(delta * density, c)
    assign = dist[:, centres].argmin(dim=1)  # first minimum: the earlier centre
    assign[centres] = torch.arange(c, device=x.device)
    counts = torch.zeros(c, dtype=dt, device=x.device).index_add_(0, assign, torch.ones(n, dtype=dt, device=x.device))
    sums = torch.zeros(c, d, dtype=dt, device=x.device).index_add_(0, assign, xf)
    merged = (sums / (counts[:, None] + 1e-6)).to(x.dtype)
    if not return_weights:
        return merged, centres
    weights = torch.zeros(c, n, dtype=torch.float32, device=x.device)
    weights[assign, torch.arange(n, device=x.device)] = (1.0 / (counts[assign] + 1e-6)).float()
    return merged, centres, weights


def sparsevlm_select(
    attn: torch.Tensor,
    hidden: torch.Tensor,
    k: int,
    recycle: bool = True,
    return_centres: bool = False,
    return_weights: bool = False,
):
    """SparseVLM's selection at one pruning layer (v1.5 and first release), with token recycling.

    Score of image token v = mean over heads, then over rater rows, of the rater->image attention; the ``k`` best
    are kept (ties -> lower index). Recycling (``recycle=True``, official v1.5 and first release): of the ``P``
    pruned tokens, the ``int(0.3 P) + 1`` best-scored (descending score, ties -> lower index) are clustered by
    :func:`dpc_knn_merge` into ``int(that / 10) + 1`` clusters, each merged into one token; the official code places
    the merged tokens right after the kept image tokens, in centre order.

    Args:
        attn: ``[H, R, V]`` attention probabilities of the ``R`` rater rows over the ``V`` image tokens, per head
            (the pruning layer's own attention).
        hidden: ``[V, D]`` the image tokens' output states of the pruning layer (what is merged).
        k: tokens to keep, ``1 <= k <= V`` (the official count is ``min(count, V - 1)``: at least one pruned).
        recycle: merge part of the pruned tokens (no merged tokens when ``False`` or when nothing is pruned).
        return_centres: also return the cluster centres as indices into the ``V`` image tokens.
        return_weights: also return (after the centres) ``[C, V]`` float32 weights with ``merged = weights @ hidden``.

    Returns:
        ``(kept [k] int64 ascending, merged [C, D] in hidden's dtype)`` (``C = 0`` without recycling), plus
        ``centres [C]`` (image-relative, in the order of ``merged``) when ``return_centres``.
    """
    scores = _rater_scores(attn).mean(dim=0)  # [V]
    check_tensor("hidden", hidden, ndim=2, shape_hint="[V, D]", finite=True)
    v = scores.numel()
    if hidden.shape[0] != v:
        raise ValueError(
            f"hidden must have one row per image token (V={v} from attn [H, R, V]), got {hidden.shape[0]} rows"
        )
    if not isinstance(recycle, bool):
        raise TypeError(f"recycle must be True or False, got {recycle!r}")
    k = check_k(k, v, "image tokens")
    order = topk_lowtie(scores, v)  # descending score, ties -> lower index
    kept = order[:k].sort().values
    pruned = order[k:]  # descending score
    merged = hidden.new_zeros(0, hidden.shape[1])
    centres = torch.zeros(0, dtype=torch.long, device=hidden.device)
    weights = torch.zeros(0, v, dtype=torch.float32, device=hidden.device)
    if recycle and pruned.numel() > 0:
        best = pruned[: int(pruned.numel() * 0.3) + 1]
        merged, local, local_weights = dpc_knn_merge(hidden[best], int(best.numel() / 10) + 1, return_weights=True)
        centres = best[local]
        weights = torch.zeros(local.numel(), v, dtype=torch.float32, device=hidden.device)
        weights[:, best] = local_weights
    out = (kept, merged) + ((centres,) if return_centres or return_weights else ())
    return out + ((weights,) if return_weights else ())
