"""FastVID: DySeg segments, salient tokens by attention, context tokens by density peaks merged (pre-LLM)."""

from __future__ import annotations

import torch

from ._common import check_int, check_tensor, compute_dtype, topk_lowtie, unit_rows
from .video import check_fraction, check_video, dpc_knn_scores, dyseg_segments, frame_similarity

__all__ = ["fastvid_select", "fastvid_frame_counts", "fastvid_frame_attention"]


def fastvid_frame_attention(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scaling: float, unit: int = 4
) -> torch.Tensor:
    """FastVID's ``frame_attn`` of one vision attention layer, per token: in each block (a frame), the softmax of the
    block's mean query over its merge units' mean keys, averaged over heads; each token gets its unit's value.

    ``a[u] = mean_h softmax_u(scaling * mean_{i in block} q[i, h] . mean_{j in unit u} k[j, h])``; a unit is
    ``unit`` consecutive tokens (the tower's order holds a 2x2 merge unit's patches together; official hard-coded
    4). Each block's units sum to 1, so its tokens sum to ``unit``. Official: LunarShen/FastVID
    ``fastvid_qwen25vl/lmms-eval/lmms_eval/models/qwenvlutils/modeling_qwen2_5_vl.py`` lines 195-203 (the last
    vision block's frames; rotary applied to q and k), commit a40a109cb8df20e8c2c17c6850f8269717369990.

    Args:
        q: ``[N, H, Dh]`` queries, k: ``[N, Hkv, Dh]`` keys as the layer uses them (``H`` a multiple of ``Hkv``),
            cu_seqlens: ``[B + 1]`` block boundaries, scaling: the layer's logit scale (finite > 0), as
            :func:`vtprune.functional.received_attention` takes them.
        unit: tokens per merge unit (>= 1); every block's length must be a multiple of it.

    Returns:
        ``[N]`` float32 (float64 for float64 input).
    """
    check_tensor("q", q, ndim=3, shape_hint="[N, H, Dh]")
    check_tensor("k", k, ndim=3, shape_hint="[N, Hkv, Dh]")
    n, h, d = q.shape
    if k.shape[0] != n or k.shape[2] != d or k.shape[1] < 1 or h % k.shape[1]:
        raise ValueError(f"k must be [N, Hkv, Dh] = [{n}, Hkv, {d}] with H={h} a multiple of Hkv, got {tuple(k.shape)}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not 0 < float(scaling) < float("inf"):
        raise ValueError(f"scaling must be a finite number > 0, got {scaling!r}")
    unit = check_int("unit", unit, 1)
    bounds = [int(b) for b in cu_seqlens.tolist()]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != n or any(b > a for a, b in zip(bounds[1:], bounds)):
        raise ValueError(f"cu_seqlens must ascend from 0 to N={n} (block boundaries), got {bounds}")
    dt = compute_dtype(q, k)
    group = h // k.shape[1]
    out = torch.zeros(n, dtype=dt, device=q.device)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if (end - start) % unit:
            raise ValueError(f"a block of {end - start} tokens is not a whole number of {unit}-token merge units")
        if end == start:
            continue
        qm = q[start:end].to(dt).mean(dim=0)  # [H, Dh]
        ku = k[start:end].to(dt).reshape(-1, unit, k.shape[1], d).mean(dim=1).repeat_interleave(group, dim=1)
        share = torch.einsum("hd,uhd->hu", qm, ku).mul(float(scaling)).softmax(dim=-1).mean(dim=0)  # [U]
        out[start:end] = share.repeat_interleave(unit)
    return out


def _chunks(total: int, parts: int) -> list[int]:
    """``total`` split in ``parts``: ``total // parts`` each, one more for the first ``total % parts``."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def fastvid_frame_counts(
    sizes: list[int], sims: list[float], n: int, frame_retain: int, tau_ignore: float, d: float, p: int
) -> tuple[list[int], list[int]]:
    """FastVID's per-frame (salient, context) counts, official lines 1920-1989 (see :func:`fastvid_select`).

    Args:
        sizes: DySeg segment lengths (sum ``T``); sims: the ``T - 1`` consecutive-frame similarities;
        n: tokens per frame; frame_retain: ``int(n * retention_ratio)``.

    Returns:
        ``(salient [T], context [T])`` lists of ints.
    """
    salient, context = [], []
    start = 0
    for size in sizes:
        retain = frame_retain * size
        ctx = max(int(retain * d), 1)
        sal = retain - ctx
        if size == 1:
            salient.append(sal)
            context.append(ctx)
            start += 1
            continue
        # runs of near-duplicate frames (similarity >= tau_ignore); each run's last frame is its anchor
        ends = [i for i in range(size - 1) if sims[start + i] < tau_ignore] + [size - 1]
        runs = [e - b for b, e in zip([-1] + ends[:-1], ends)]
        anchor_sal = _chunks(sal, len(runs))
        groups = _chunks(ctx, (len(runs) + p - 1) // p)
        # one context anchor in p, counted from the first run, then the list is reversed (official order)
        anchor_ctx = [min(groups[i // p], n // 2) if i % p == 0 else 0 for i in range(len(runs))][::-1]
        for run, a_sal, a_ctx in zip(runs, anchor_sal, anchor_ctx):
            salient += [0] * (run - 1)
            context += [0] * (run - 1)
            a_ctx = min(a_ctx, n // 2)
            salient.append(min(a_sal, n - a_ctx))
            context.append(a_ctx)
        start += size
    return salient, context


def fastvid_select(
    features: torch.Tensor,
    frame_attn: torch.Tensor,
    retention_ratio: float = 0.27,
    c: int = 8,
    tau: float = 0.84,
    tau_ignore: float = 0.95,
    d: float = 0.4,
    p: int = 4,
    beta: float = 0.6,
    neighbours: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FastVID token selection and merging for one video (the Qwen2.5-VL fork), defaults of ``scripts/eval.sh``.

    1. DySeg (:func:`dyseg_segments` with ``c``, ``tau``) splits the video into segments.
    2. Budgets (:func:`fastvid_frame_counts`): a segment of ``L`` frames keeps ``R = int(N * retention_ratio) * L``
       tokens, ``C = max(int(R * d), 1)`` context and ``R - C`` salient. A one-frame segment gives both to its
       frame. Otherwise the segment is cut again where consecutive similarity ``< tau_ignore``; only the last frame
       of each run (its anchor) keeps tokens: the salient budget split evenly over anchors (remainder to the first),
       the context budget split evenly over ``ceil(runs / p)`` groups, given (capped at ``N // 2``) to anchors
       ``0, p, 2p, ...`` and that list reversed; an anchor's salient count is capped at ``N - context``.
    3. Salient: per frame the highest ``frame_attn`` (ties -> lower index), kept unchanged.
    4. Context: per frame, among its non-salient tokens (ascending), the best DPC-KNN scores
       (:func:`dpc_knn_scores`, ``neighbours`` nearest, distances ``/ sqrt(D)``; ties -> lower index).
    5. Merging, per frame with context anchors ``A``: every token of the segment that is neither salient nor in
       ``A`` (other frames' anchors included, as officially) joins the anchor of highest cosine similarity (ties ->
       first anchor); anchor ``a`` with ``m_a`` members becomes ``w x_a + (1 - w) mean(members)``,
       ``w = max(1 / (m_a + 1), beta)`` (unchanged when ``m_a = 0``).

    Official: LunarShen/FastVID ``fastvid_qwen25vl/lmms-eval/lmms_eval/models/qwenvlutils/modeling_qwen2_5_vl.py``
    lines 1889-2095 (forward; ``frame_attn`` from lines 195-203 and 590-596), ``fastvid_qwen25vl/scripts/eval.sh``
    (defaults), commit a40a109cb8df20e8c2c17c6850f8269717369990. Deviations: no ``1e-6 * rand`` density noise and
    every tie goes to the lower index; scores and merging in float32 (output in ``features``' dtype); unit vectors
    with an epsilon; ``min(c - 1, T - 1)`` DySeg cuts and ``min(neighbours, M)`` neighbours (the official ``topk``
    fails there); empty salient / context sets allowed (official ``torch.cat`` of an empty list fails).

    Args:
        features: ``[T, N, D]`` one video's post-merger tokens (the LLM's input embeddings).
        frame_attn: ``[T, N]`` attention each token receives in the last vision block, per frame (official: the
            softmax of the frame's mean query over its 2x2-averaged keys, averaged over heads; rows sum to 1).
        retention_ratio: in ``(0, 1]``, with ``int(N * retention_ratio) >= 1``.
        c, tau, tau_ignore: DySeg (``c >= 1``; ``tau`` any float; ``tau_ignore`` in ``[-1, 1]``).
        d: context share in ``[0, 1]``. p: one context anchor per ``p >= 1`` runs. beta: merge floor in ``[0, 1]``.
        neighbours: DPC-KNN neighbours (official 4).

    Returns:
        ``(kept [K] int64 ascending flat indices t * N + i, tokens [K, D])``, tokens in kept order (salient
        unchanged, context anchors merged).
    """
    check_video("features", features)
    t, n, dim = features.shape
    check_tensor("frame_attn", frame_attn, ndim=2, shape_hint="[T, N]", finite=True)
    if tuple(frame_attn.shape) != (t, n):
        raise ValueError(f"frame_attn must be [T, N] = {(t, n)} to match features, got {tuple(frame_attn.shape)}")
    ratio = check_fraction("retention_ratio", retention_ratio, low_open=True, high_open=False)
    frame_retain = int(n * ratio)
    if frame_retain < 1:
        raise ValueError(f"int(N * retention_ratio) must be >= 1, got N={n}, retention_ratio={retention_ratio!r}")
    tau_ignore = check_fraction("tau_ignore", tau_ignore, low_open=False, high_open=False, low=-1.0)
    d = check_fraction("d", d, low_open=False, high_open=False)
    beta = check_fraction("beta", beta, low_open=False, high_open=False)
    p = check_int("p", p, 1)
    neighbours = check_int("neighbours", neighbours, 1)
    sizes = dyseg_segments(features, c, tau)
    sims = frame_similarity(features).tolist()
    salient, context = fastvid_frame_counts(sizes, sims, n, frame_retain, tau_ignore, d, p)

    dt = compute_dtype(features)
    x = features.to(dt)
    attn = frame_attn.to(dt)
    device = features.device
    kept, tokens = [], []
    start = 0
    for size in sizes:
        frames = range(start, start + size)
        seg = x[start : start + size].reshape(size * n, dim)
        is_salient = torch.zeros(size * n, dtype=torch.bool, device=device)
        anchor_sets = []
        for j, f in enumerate(frames):
            top = topk_lowtie(attn[f], salient[f])
            is_salient[top + j * n] = True
            if context[f] > 0:
                rest = (~is_salient[j * n : (j + 1) * n]).nonzero().squeeze(1)
                best = topk_lowtie(dpc_knn_scores(x[f, rest], neighbours), context[f]).sort().values
                anchor_sets.append(rest[best] + j * n)
        out = seg.clone()
        units = unit_rows(seg)
        for anchors in anchor_sets:
            members = is_salient.clone()
            members[anchors] = True
            members = (~members).nonzero().squeeze(1)
            target = (units[members] @ units[anchors].T).argmax(dim=1)
            count = torch.zeros(anchors.numel(), dtype=dt, device=device).index_add_(
                0, target, torch.ones(members.numel(), dtype=dt, device=device)
            )
            total = torch.zeros(anchors.numel(), dim, dtype=dt, device=device).index_add_(0, target, seg[members])
            w = (1 / (count + 1)).clamp(min=beta)[:, None]
            out[anchors] = w * seg[anchors] + (1 - w) * total / count.clamp(min=1)[:, None]
        keep = is_salient.clone()
        for anchors in anchor_sets:
            keep[anchors] = True
        idx = keep.nonzero().squeeze(1)
        kept.append(idx + start * n)
        tokens.append(torch.where(is_salient[idx, None], seg[idx], out[idx]))
        start += size
    return torch.cat(kept), torch.cat(tokens).to(features.dtype)
