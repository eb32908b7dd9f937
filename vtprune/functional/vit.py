"""Token reduction *inside* a vision transformer, between its blocks: ToMe, PiToMe and Zero-TPrune.

Every matcher returns a **plan** ``(dest, t_out)`` for a batch of token sequences ``[B, T, ...]``: ``dest``
``[B, T]`` int64 gives the output slot (``0 <= dest < t_out``) each input token goes to, or ``-1`` for a token that is
dropped (pruning); several tokens sharing a slot are merged. :func:`merge_tokens` applies a plan as the papers define
it: the size-weighted mean of the tokens in a slot, and the summed sizes (ToMe's ``merge_wavg``). Slots are numbered
in the official codes' output order, so a plan reproduces their token layout.

The first ``protected`` tokens of every sequence (CLS, distillation and register tokens: the "prefix" tokens) are
never merged or dropped; every plan puts them first, in their original order.

Ties go to the lower index (stable sorts), a rule the official codes leave to ``torch.argsort``'s unstable sort.
Similarities are computed in float32 (float64 for float64 input).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import as_int, check_int, check_tensor, compute_dtype

__all__ = [
    "tome_match",
    "tome_schedule",
    "pitome_match",
    "pitome_margins",
    "wpr_scores",
    "zerotprune_match",
    "merge_tokens",
    "reduction_schedule",
    "group_representatives",
    "packed_representatives",
]


def _check_metric(metric, protected: int) -> tuple[torch.Tensor, int]:
    check_tensor("metric", metric, ndim=3, shape_hint="[B, T, C]", finite=True)
    t = metric.shape[1]
    protected = check_int("protected", protected, 0, t)
    return metric, protected


def _units(metric: torch.Tensor) -> torch.Tensor:
    # ToMe / PiToMe: metric / metric.norm(dim=-1) (F.normalize's eps only guards an all-zero row)
    return F.normalize(metric.to(compute_dtype(metric)), p=2, dim=-1)


def tome_match(metric: torch.Tensor, r: int, protected: int = 1) -> tuple[torch.Tensor, int]:
    """ToMe bipartite soft matching (facebookresearch/ToMe ``tome/merge.py`` ``bipartite_soft_matching``, commit
    af95e4b; Bolya et al., ICLR 2023).

    ``metric`` ``[B, T, C]``: the per-token similarity features (ToMe: the block's keys averaged over heads).
    Tokens alternate into set A (even positions) and set B (odd positions); each A token's best match is its most
    cosine-similar B token; the ``r`` A tokens with the most similar best matches merge into them. ``r`` is capped at
    ``(T - protected) // 2`` as in the official code. Protected (prefix) tokens never merge: their rows (in A) and
    columns (in B) of the score matrix are ``-inf`` — the official ``class_token`` / ``distill_token`` handling,
    generalised to any number of prefix tokens.

    Returns the plan ``(dest [B, T] int64, t_out = T - r)``. Output layout (the official one): prefix tokens, then the
    unmerged A tokens (in index order when ``protected > 0``, as the official code sorts them; else in descending
    order of their best score), then the B tokens in order. Raises ``ValueError`` / ``TypeError`` on bad input.
    """
    metric, protected = _check_metric(metric, protected)
    r = check_int("r", r, 0)
    b, t, _ = metric.shape
    device = metric.device
    r = min(r, (t - protected) // 2)
    dest = torch.arange(t, device=device).expand(b, t).clone()
    if r <= 0:
        return dest, t
    with torch.no_grad():
        units = _units(metric)
        a, bb = units[:, ::2], units[:, 1::2]
        scores = a @ bb.transpose(-1, -2)  # [B, Ta, Tb]
        ta, tb = a.shape[1], bb.shape[1]
        a_pos = torch.arange(ta, device=device) * 2
        b_pos = torch.arange(tb, device=device) * 2 + 1
        scores[:, a_pos < protected, :] = -math.inf
        scores[:, :, b_pos < protected] = -math.inf
        node_max, node_idx = scores.max(dim=-1)  # [B, Ta]
        edge_idx = torch.argsort(node_max, dim=-1, descending=True, stable=True)
        unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
        if protected:
            unm_idx = unm_idx.sort(dim=-1).values
        dst_idx = node_idx.gather(1, src_idx)
        # output slots: prefix first (original order), then unmerged A, then B (official layout)
        n_unm = ta - r
        unm_pos = a_pos[unm_idx]  # [B, n_unm]
        prefix_b = int((b_pos < protected).sum())
        prefix_a = int((a_pos < protected).sum())
        # layout before moving prefix B tokens forward: [unm (prefix A first since sorted), B]
        order = torch.cat([unm_pos, b_pos.expand(b, tb)], dim=1)  # positions in output order
        if prefix_b:
            # move the prefix B tokens right after the prefix A tokens, then sort the prefix block by position
            head = torch.cat([order[:, :prefix_a], order[:, n_unm : n_unm + prefix_b]], dim=1).sort(dim=1).values
            order = torch.cat([head, order[:, prefix_a:n_unm], order[:, n_unm + prefix_b :]], dim=1)
        slot = torch.empty_like(dest)
        slot.scatter_(1, order, torch.arange(t - r, device=device).expand(b, t - r))
        dest = slot
        # merged A tokens go to their B token's slot
        src_pos = a_pos[src_idx]
        dst_pos = b_pos[dst_idx]
        dest.scatter_(1, src_pos, slot.gather(1, dst_pos))
    return dest, t - r


def tome_schedule(r, num_layers: int) -> list[int]:
    """ToMe's per-layer ``r`` (facebookresearch/ToMe ``tome/utils.py`` ``parse_r``): an int (constant ``r`` per
    layer), an ``(r, inflection)`` pair (``inflection`` in [-1, 1]: -1 = the paper's decreasing schedule), or a list
    of per-layer values (padded with zeros to ``num_layers``). Returns a list of ``num_layers`` ints."""
    num_layers = check_int("num_layers", num_layers, 1)
    if isinstance(r, (list, tuple)) and not (isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float)):
        values = [check_int(f"r[{i}]", v, 0) for i, v in enumerate(r)]
        if len(values) > num_layers:
            raise ValueError(f"r lists {len(values)} per-layer values for a {num_layers}-block model")
        return values + [0] * (num_layers - len(values))
    inflect = 0.0
    if isinstance(r, tuple):
        r, inflect = r
        if not -1.0 <= float(inflect) <= 1.0:
            raise ValueError(f"the inflection of an (r, inflection) schedule must be in [-1, 1], got {inflect}")
    r = check_int("r", r, 0)
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1) if num_layers > 1 else 0.0
    return [int(min_val + step * i) for i in range(num_layers)]


def reduction_schedule(num_patches: int, keep: int, num_layers: int, cap) -> list[int]:
    """Per-block reductions (tokens removed in block ``l``) that bring ``num_patches`` patch tokens down to exactly
    ``keep`` before the last block, spread as evenly as possible over blocks ``0 .. num_layers - 2`` (earlier blocks
    take the remainder) and never above ``cap(tokens_in)`` in one block (e.g. ToMe's half of the tokens).

    Raises ``ValueError`` if ``keep`` cannot be reached under the cap."""
    num_patches = check_int("num_patches", num_patches, 1)
    keep = check_int("keep", keep, 1, num_patches)
    num_layers = check_int("num_layers", num_layers, 1)
    blocks = num_layers - 1
    n_min = num_patches
    for _ in range(blocks):
        n_min -= cap(n_min)
    if keep < n_min:
        raise ValueError(
            f"cannot bring {num_patches} patch tokens down to keep={keep} before the last of {num_layers} blocks: "
            f"this method removes at most about half of a block's tokens, so keep must be >= {n_min} "
            f"(ratio >= {n_min / num_patches:.4g})"
        )

    def least(n: int, blocks_left: int) -> int:  # fewest tokens reachable from n with blocks_left blocks
        for _ in range(blocks_left):
            n -= cap(n)
        return n

    out = [0] * num_layers
    todo, n = num_patches - keep, num_patches
    for i in range(blocks):
        left = blocks - i
        r = min(-(-todo // left), cap(n))  # even split, earlier blocks take the remainder
        while r < cap(n) and least(n - r, left - 1) > keep:  # front-load where later blocks cannot keep up
            r += 1
        out[i] = r
        todo -= r
        n -= r
    return out


def pitome_margins(num_layers: int, start: float = 0.75) -> list[float]:
    """PiToMe's per-layer energy margin (hchautran/PiToMe ``algo/pitome/patch/deit.py``, commit 550b5de):
    ``start - start * l / L`` (0.75 for DeiT / timm ViTs; the CLIP patch uses 0.9)."""
    num_layers = check_int("num_layers", num_layers, 1)
    return [start - start * (i / num_layers) for i in range(num_layers)]


def pitome_match(
    metric: torch.Tensor, r: int, margin: float, protected: int = 1, alpha: float = 1.0, bipartite: bool = False
) -> tuple[torch.Tensor, int]:
    """PiToMe, spectrum-preserving token merging (hchautran/PiToMe ``algo/pitome/merge.py`` ``pitome_vision``,
    commit 550b5de; Tran et al., NeurIPS 2024).

    On the non-prefix tokens ``X`` (``metric`` ``[B, T, C]`` minus the first ``protected``): cosine similarities
    ``S = X̂ X̂ᵀ`` (the diagonal included), energy ``E_i = mean_j elu(S_ij - margin, alpha)``, tokens sorted by
    descending energy. Then either

    * ``bipartite=False`` (``pitome``): the ``2r`` highest-energy tokens alternate into A (even ranks) and B (odd
      ranks); every A token merges into its most similar B token; the other tokens are protected;
    * ``bipartite=True`` (``pitome_bsm``, the official first half of the layers): all tokens alternate into A and B
      by energy rank and ToMe's matching merges the ``r`` A tokens with the most similar best matches.

    ``r`` is capped at ``(T - protected) // 2``. Returns the plan ``(dest [B, T], t_out = T - r)``; layout (the
    official one): prefix tokens, then the protected (resp. unmerged A) tokens in energy (resp. edge-score) order,
    then B in energy order.
    """
    metric, protected = _check_metric(metric, protected)
    r = check_int("r", r, 0)
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not math.isfinite(margin):
        raise TypeError(f"margin must be a finite float, got {margin!r}")
    b, t, _ = metric.shape
    device = metric.device
    n = t - protected
    r = min(r, n // 2)
    dest = torch.arange(t, device=device).expand(b, t).clone()
    if r <= 0:
        return dest, t
    with torch.no_grad():
        units = _units(metric[:, protected:])
        sim = units @ units.transpose(-1, -2)  # [B, n, n]
        energy = F.elu(sim - margin, alpha=alpha).mean(dim=-1)
        indices = torch.argsort(energy, dim=-1, descending=True, stable=True)  # [B, n]
        if bipartite:
            a_idx, b_idx = indices[:, ::2], indices[:, 1::2]
            scores = sim.gather(2, b_idx[:, None, :].expand(b, n, b_idx.shape[1]))
            scores = scores.gather(1, a_idx[:, :, None].expand(b, a_idx.shape[1], b_idx.shape[1]))
            node_max, node_idx = scores.max(dim=-1)
            edge_idx = torch.argsort(node_max, dim=-1, descending=True, stable=True)
            keep_a = a_idx.gather(1, edge_idx[:, r:])  # unmerged A, edge order
            src = a_idx.gather(1, edge_idx[:, :r])
            dst_rank = node_idx.gather(1, edge_idx[:, :r])  # rank within B
        else:
            merge_idx, keep_a = indices[:, : 2 * r], indices[:, 2 * r :]
            src, b_idx = merge_idx[:, ::2], merge_idx[:, 1::2]
            scores = sim.gather(2, b_idx[:, None, :].expand(b, n, r)).gather(1, src[:, :, None].expand(b, r, r))
            dst_rank = scores.max(dim=-1).indices
        # slots: prefix 0..p-1, then kept (protected / unmerged A), then B
        order = torch.cat([keep_a, b_idx], dim=1) + protected  # [B, n - r] positions in output order
        slot = dest.clone()
        slot.scatter_(1, order, torch.arange(protected, t - r, device=device).expand(b, n - r))
        dest = slot
        dest.scatter_(1, src + protected, slot.gather(1, b_idx.gather(1, dst_rank) + protected))
    return dest, t - r


def wpr_scores(attn: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """Zero-TPrune's Weighted PageRank importance on the attention graph (Wang, Dedhia & Jha, CVPR 2024, Alg. 1).

    ``attn`` ``[B, H, T, T]``: row-stochastic attention probabilities (query rows, key columns). Each token starts
    with importance ``1/T`` and, at every iteration, hands its importance to the tokens it attends to, in proportion
    to its attention: ``s <- Aᵀ s`` (per head). Returns ``[B, T]``: the head-mean of the per-head scores after
    ``iterations`` steps (computed in float32, float64 for float64 input).
    """
    check_tensor("attn", attn, ndim=4, shape_hint="[B, H, T, T]", finite=True)
    if attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must be square in its last two dims [B, H, T, T], got {tuple(attn.shape)}")
    iterations = check_int("iterations", iterations, 1)
    a = attn.to(compute_dtype(attn))
    t = a.shape[-1]
    s = torch.full(a.shape[:-1], 1.0 / t, dtype=a.dtype, device=a.device)  # [B, H, T]
    at = a.transpose(-1, -2)
    for _ in range(iterations):
        s = (at @ s[..., None])[..., 0]
    return s.mean(dim=1)


def zerotprune_match(
    importance: torch.Tensor, metric: torch.Tensor, r_importance: int, r_similarity: int, protected: int = 1
) -> tuple[torch.Tensor, int]:
    """Zero-TPrune pruning of one block (Wang, Dedhia & Jha, CVPR 2024): the I-stage, then the S-stage.

    * I-stage: the ``r_importance`` non-prefix tokens with the lowest ``importance`` ``[B, T]`` (:func:`wpr_scores`)
      are dropped.
    * S-stage (importance-guided partition): the remaining non-prefix tokens, sorted by descending importance, split
      into the important half (targets; ``ceil(m/2)`` tokens) and the rest (sources); each source's similarity is
      its highest cosine similarity to a target (``metric`` ``[B, T, C]``, the head-mean keys); the
      ``r_similarity`` most similar sources are dropped (pruned, not merged).

    Returns the plan ``(dest [B, T], t_out)`` (``dest = -1`` for dropped tokens); kept tokens keep their order.
    ``r_similarity`` is capped at the number of sources, ``r_importance`` at the non-prefix tokens minus one.
    """
    metric, protected = _check_metric(metric, protected)
    check_tensor("importance", importance, ndim=2, shape_hint="[B, T]", finite=True)
    b, t, _ = metric.shape
    if tuple(importance.shape) != (b, t):
        raise ValueError(
            f"importance [B, T] and metric [B, T, C] disagree: {tuple(importance.shape)} vs {tuple(metric.shape)}"
        )
    r_i = check_int("r_importance", r_importance, 0)
    r_s = check_int("r_similarity", r_similarity, 0)
    device = metric.device
    n = t - protected
    r_i = min(r_i, max(n - 1, 0))
    m = n - r_i
    r_s = min(r_s, m // 2)
    keep = torch.ones(b, t, dtype=torch.bool, device=device)
    if r_i + r_s == 0:
        return torch.arange(t, device=device).expand(b, t).clone(), t
    with torch.no_grad():
        imp = importance[:, protected:].to(compute_dtype(importance))
        order = torch.argsort(imp, dim=-1, descending=True, stable=True)  # [B, n]
        survivors = order[:, :m]  # I-stage keeps the m most important
        if r_i:
            keep[:, protected:].scatter_(1, order[:, m:], False)
        if r_s:
            n_dst = m - m // 2
            dst, src = survivors[:, :n_dst], survivors[:, n_dst:]
            units = _units(metric[:, protected:])
            s_units = units.gather(1, src[..., None].expand(-1, -1, units.shape[-1]))
            d_units = units.gather(1, dst[..., None].expand(-1, -1, units.shape[-1]))
            best = (s_units @ d_units.transpose(-1, -2)).max(dim=-1).values  # [B, m // 2]
            drop = torch.argsort(best, dim=-1, descending=True, stable=True)[:, :r_s]
            keep[:, protected:].scatter_(1, src.gather(1, drop), False)
        slot = torch.cumsum(keep.long(), dim=1) - 1
        dest = torch.where(keep, slot, torch.full_like(slot, -1))
    return dest, t - r_i - r_s


def merge_tokens(
    x: torch.Tensor, dest: torch.Tensor, t_out: int, size: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a plan: the size-weighted mean of the tokens sharing a slot (ToMe ``merge_wavg``).

    ``x`` ``[B, T, C]``, ``dest`` ``[B, T]`` (slot or -1 = dropped), ``size`` ``[B, T, 1]`` (how many original
    patches each token stands for; None = all ones). Returns ``(x_out [B, t_out, C], size_out [B, t_out, 1])``
    in ``x``'s dtype; dropped tokens contribute to nothing.
    """
    check_tensor("x", x, ndim=3, shape_hint="[B, T, C]")
    check_tensor("dest", dest, ndim=2, shape_hint="[B, T]")
    b, t, c = x.shape
    if tuple(dest.shape) != (b, t):
        raise ValueError(f"dest [B, T] must match x [B, T, C], got {tuple(dest.shape)} and {tuple(x.shape)}")
    t_out = as_int(t_out, "t_out must be an int")
    if size is None:
        size = torch.ones(b, t, 1, dtype=x.dtype, device=x.device)
    elif tuple(size.shape) != (b, t, 1):
        raise ValueError(f"size must be [B, T, 1] = {(b, t, 1)}, got {tuple(size.shape)}")
    kept = (dest >= 0)[..., None].to(x.dtype)
    w = size.to(x.dtype) * kept
    idx = dest.clamp(min=0)[..., None]
    num = x.new_zeros(b, t_out, c).scatter_add_(1, idx.expand(b, t, c), x * w)
    den = x.new_zeros(b, t_out, 1).scatter_add_(1, idx, w)
    return num / den, den


def group_representatives(group: torch.Tensor, width: int, present: torch.Tensor | None = None) -> torch.Tensor:
    """One patch position per merged token: where a VLM places a token merged inside its vision tower.

    ``group`` ``[B, P]`` int64: for each of an image's ``P`` patches (row-major on a grid ``width`` patches wide),
    the merged token its content ended up in (any id ``>= 0``), or ``-1`` for a dropped patch. ``present``
    ``[B, P]`` bool (None: all): the patches that still have a place in the output (LLaVA-NeXT's unpadding removes
    some). Each token's representative is, among its present member patches, the one nearest (Euclidean, in patch
    units) to their centroid; ties go to the lower index. A token none of whose members is present gets none.

    Returns ``[B, P]`` bool, True at the representatives (one per token with a present member). A vtprune
    convention (the ToMe / PiToMe / Zero-TPrune codes classify from the CLS token and never place merged tokens).
    """
    check_tensor("group", group, ndim=2, shape_hint="[B, P]")
    if group.dtype != torch.long:
        raise TypeError(f"group must be int64, got {group.dtype}")
    width = check_int("width", width, 1)
    b, p = group.shape
    if p % width:
        raise ValueError(f"{p} patches do not fill rows of width={width}")
    member = group >= 0
    if present is not None:
        if tuple(present.shape) != (b, p) or present.dtype != torch.bool:
            raise ValueError(
                f"present must be a [B, P] = {(b, p)} bool tensor, got {tuple(present.shape)} {present.dtype}"
            )
        member = member & present
    if not bool(member.any()):
        return member
    ids = torch.where(member, group, 0)
    slots = int(ids.max()) + 1
    index = torch.arange(p, device=group.device)
    coords = torch.stack([index // width, index % width], -1).to(torch.float64).expand(b, p, 2)
    w = member.to(torch.float64)
    count = torch.zeros(b, slots, dtype=torch.float64, device=group.device).scatter_add_(1, ids, w)
    total = torch.zeros(b, slots, 2, dtype=torch.float64, device=group.device).scatter_add_(
        1, ids[..., None].expand(b, p, 2), coords * w[..., None]
    )
    centre = total / count.clamp(min=1.0)[..., None]
    dist = ((coords - centre.gather(1, ids[..., None].expand(b, p, 2))) ** 2).sum(-1)
    dist = torch.where(member, dist, torch.full_like(dist, float("inf")))
    best = torch.full((b, slots), float("inf"), dtype=torch.float64, device=group.device).scatter_reduce_(
        1, ids, dist, "amin"
    )
    nearest = member & (dist == best.gather(1, ids))
    first = torch.full((b, slots), p, dtype=torch.long, device=group.device).scatter_reduce_(
        1, ids, torch.where(nearest, index.expand(b, p), p), "amin"
    )
    return nearest & (index.expand(b, p) == first.gather(1, ids))


def packed_representatives(
    members: torch.Tensor, weight: torch.Tensor, pos: torch.Tensor, tol: float = 1e-9
) -> torch.Tensor:
    """One output token per merged token, when the output tokens are blends of patches (a VLM's packing that
    bilinearly downscales the patch grid, LLaVA-OneVision's ``anyres_max``) or plain patches.

    ``members`` ``[N, K]`` int64: for each of an image's ``N`` output tokens, the merged token (any id ``>= 0``)
    that each of its ``K`` source patches belongs to, or ``-1`` for a source with no merged token (a dropped patch,
    an empty tap, a newline token); ``weight`` ``[N, K]`` float, ``>= 0``: each source's weight in the token's blend;
    ``pos`` ``[N, 2]`` float: each token's position (row, column, in patch units) on the grid it was sampled from.

    The share of merged token ``m`` in output token ``n`` is the summed weight of ``n``'s sources in ``m``. Each
    merged token's representative is the output token with its largest share; among shares equal to ``tol``, the
    one nearest (Euclidean, to ``tol``) to the share-weighted centroid of the positions of all tokens holding a
    share of ``m``; then the lower index. When every token is one patch (weights 0 / 1, one source each) this is
    :func:`group_representatives` in the packing's order. A merged token with no share anywhere gets none.

    Returns ``[N]`` bool, True at the representatives (several merged tokens may share one). A vtprune convention,
    like :func:`group_representatives` (the ToMe / PiToMe / Zero-TPrune codes never place merged tokens).
    """
    check_tensor("members", members, ndim=2, shape_hint="[N, K]")
    if members.dtype != torch.long:
        raise TypeError(f"members must be int64, got {members.dtype}")
    n, k = members.shape
    if tuple(weight.shape) != (n, k) or not weight.is_floating_point():
        raise ValueError(f"weight must be a float [N, K] = {(n, k)} tensor, got {tuple(weight.shape)} {weight.dtype}")
    if tuple(pos.shape) != (n, 2) or not pos.is_floating_point():
        raise ValueError(f"pos must be a float [N, 2] = {(n, 2)} tensor, got {tuple(pos.shape)} {pos.dtype}")
    if bool((weight < 0).any()):
        raise ValueError("weight must be >= 0")
    dev = members.device
    keep = torch.zeros(n, dtype=torch.bool, device=dev)
    live = (members >= 0) & (weight > 0)
    if not bool(live.any()):
        return keep
    token = torch.arange(n, device=dev)[:, None].expand(n, k)[live]
    ids, m_index = torch.unique(members[live], return_inverse=True)
    slots = ids.numel()
    pair, pair_index = torch.unique(token * slots + m_index, return_inverse=True)  # (token, merged token) pairs
    share = torch.zeros(pair.numel(), dtype=torch.float64, device=dev).index_add_(
        0, pair_index, weight[live].to(torch.float64)
    )
    p_tok, p_m = pair // slots, pair % slots
    p_pos = pos.to(torch.float64)[p_tok]
    mass = torch.zeros(slots, dtype=torch.float64, device=dev).index_add_(0, p_m, share)
    centre = torch.zeros(slots, 2, dtype=torch.float64, device=dev).index_add_(0, p_m, p_pos * share[:, None])
    centre = centre / mass[:, None]
    best = torch.full((slots,), float("-inf"), dtype=torch.float64, device=dev).scatter_reduce_(0, p_m, share, "amax")
    top = share >= best[p_m] - tol
    dist = torch.where(top, ((p_pos - centre[p_m]) ** 2).sum(-1).sqrt(), torch.full_like(share, float("inf")))
    near = torch.full((slots,), float("inf"), dtype=torch.float64, device=dev).scatter_reduce_(0, p_m, dist, "amin")
    nearest = top & (dist <= near[p_m] + tol)
    first = torch.full((slots,), n, dtype=torch.long, device=dev).scatter_reduce_(
        0, p_m, torch.where(nearest, p_tok, n), "amin"
    )
    keep[first] = True
    return keep
