"""IDPruner (Tencent/AngelSlim): greedy maximal marginal relevance over importance and cosine similarity.

Official code: ``angelslim/compressor/token_compressor/algorithm/idpruner.py`` (``idpruner``, lines 63-162, with
``_default_similarity_compute`` lines 31-36 and ``_default_importance_compute`` lines 39-42), commit
67394ce55f6b6cfae702575fbc3c7a05c13fdd74.
"""

from __future__ import annotations

import torch

from ._common import as_int, check_k, check_rows, compute_dtype, topk_lowtie

__all__ = ["idpruner_select"]

#: the official min-max normalisation's denominator guard (``s_max - s_min + 1e-6``)
IDPRUNER_SCORE_EPS = 1e-6
#: the official cosine similarity's norm guard (``features.norm() + 1e-8``)
IDPRUNER_NORM_EPS = 1e-8


def idpruner_select(
    features: torch.Tensor,
    scores: torch.Tensor,
    k: int,
    mmr_lambda: float = 0.5,
    parallel_k: int = 1,
) -> torch.Tensor:
    """IDPruner's kept tokens: greedy maximal marginal relevance, ``parallel_k`` picks per step.

    ``imp = (scores - min) / (max - min + 1e-6)`` (the scorer's raw outputs normalised to [0, 1]); ``sim`` the cosine
    similarity of the features, each row divided by ``||x|| + 1e-8``. The first step picks the ``parallel_k`` tokens
    of largest ``imp``; every later step the ``min(parallel_k, k - picked)`` unpicked tokens of largest
    ``mmr_lambda * imp_i - (1 - mmr_lambda) * max_{j picked} sim_ij`` (ties -> lower index, where the official
    ``torch.topk`` leaves them unspecified). The official code builds the full ``N x N`` similarity matrix; here
    each step computes only the columns of its new picks (the same dot products, ``O(N k D)`` in all).

    Args:
        features: ``[N, D]`` the visual tokens the language model receives (the official code reads them from
            ``inputs_embeds``: the projected features).
        scores: ``[N]`` importance, raw (the official selector's ``mode="raw"`` outputs); normalised here.
        k: tokens kept, ``1 <= k <= N``.
        mmr_lambda: weight of importance against redundancy, a number in [0, 1] (official 0.5).
        parallel_k: tokens picked per greedy step, an int >= 1 (official 1).

    Returns: ``[k]`` int64 ascending indices. Computed in float32 (float64 for float64 input).
    Raises ``TypeError`` / ``ValueError`` on bad shapes or values.
    """
    n = check_rows(("features", features, "[N, D]"), ("scores", scores, "[N]"), at_least=1)
    k = check_k(k, n)
    lam = mmr_lambda
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"mmr_lambda must be a number in [0, 1] (official 0.5), got {mmr_lambda!r}")
    step = as_int(parallel_k, "parallel_k must be an int >= 1")
    if step < 1:
        raise ValueError(f"parallel_k must be an int >= 1 (tokens picked per greedy step; official 1), got {step}")
    dt = compute_dtype(features, scores)
    s = scores.to(dt)
    imp = (s - s.min()) / (s.max() - s.min() + IDPRUNER_SCORE_EPS)
    x = features.to(dt)
    units = x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + IDPRUNER_NORM_EPS)
    lam = float(lam)
    gain = lam * imp
    max_sim = torch.full((n,), -2.0, dtype=dt, device=x.device)
    picked = torch.zeros(n, dtype=torch.bool, device=x.device)
    chosen, count = [], 0
    while count < k:
        take = min(step, k - count)
        mmr = imp.clone() if count == 0 else gain - (1.0 - lam) * max_sim
        mmr[picked] = -float("inf")
        best = mmr.argmax().view(1) if take == 1 else topk_lowtie(mmr, take)  # argmax: the first maximum
        chosen.append(best)
        picked[best] = True
        count += take
        if count < k:  # the similarity columns of the new picks
            cols = torch.mv(units, units[best[0]]) if take == 1 else (units @ units[best].T).amax(dim=1)
            max_sim = torch.maximum(max_sim, cols)
    return torch.cat(chosen).sort().values
