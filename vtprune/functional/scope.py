"""SCOPE (kinredon/SCOPE, NeurIPS 2025): saliency-coverage oriented token selection.

Source: ``scope/clip_encoder.py`` at commit 6bf73069e0d61307051cfda8e25925bc7b7afdd9 — ``SCOPE()`` (lines 140-199)
and its caller ``CLIPVisionTower_SCOPE.forward`` (lines 101-138).
"""

from __future__ import annotations

import math

import torch

from ._common import check_k, check_rows, compute_dtype, unit_rows

__all__ = ["scope_select"]


def scope_select(cls_attn: torch.Tensor, features: torch.Tensor, k: int, alpha: float = 1.0) -> torch.Tensor:
    """SCOPE token selection: greedily pick the token of largest saliency x coverage gain.

    With ``S = cos(features, features)`` ``[N, N]`` (unit rows, diagonal 1) and ``m = 0`` ``[N]`` (the coverage each
    token already has), repeat ``k`` times::

        gain[j]  = sum_i max(0, S[i, j] - m[i])          for every unselected j
        score[j] = gain[j] * cls_attn[j] ** alpha
        pick j* = argmax score (ties -> lower index);  m = max(m, S[j*, :])

    The official ``SCOPE()`` (``scope/clip_encoder.py`` lines 140-199, commit 6bf73069) does exactly this, batched,
    in the model dtype: ``cosine_simi`` line 153, ``cur_max`` zeros line 162, ``cls_attn ** alpha`` line 167
    (``alpha`` from the ``ALPHA`` environment variable, default 1.0), the gain at lines 174-178 (selected columns
    filled with 0, then ``max(0, S - cur_max[:, None]).sum`` over rows), the product at line 183
    (``COMBINED=multi``, the default; ``COMBINED=add`` — gain plus saliency — is not offered here), the selected
    tokens masked to -inf at line 189, ``argmax`` at line 192, ``cur_max`` update at line 197. Its caller (lines
    116-130) passes ``cls_attn`` = the CLS query's attention row of ``attentions[-2]`` summed over heads (softmax over
    all keys, CLS column dropped) and ``features`` = ``hidden_states[-2][:, 1:]``, the patch features of the layer
    the projector reads, before the projector; the kept tokens are then taken in their original order. Summing or
    averaging the heads scales every score by the same factor and selects the same tokens.

    Here: float32 (float64 for float64 input); cosine rows divided by ``max(||x||, 1e-8)`` (the official code divides
    by the norm alone: a zero feature row gives NaN there and cosine 0 here).

    Args:
        cls_attn: ``[N]`` saliency of each token, >= 0 (the CLS attention row as above, or another non-negative
            importance such as the attention each token receives).
        features: ``[N, C]`` the tokens' features (cosine similarity).
        k: tokens kept, ``1 <= k <= N``.
        alpha: saliency exponent, a finite number >= 0 (official default 1.0; 0: coverage alone).

    Returns: ``[k]`` int64 ascending indices.

    Raises: ``TypeError`` / ``ValueError`` on bad shapes, a negative or non-finite ``cls_attn``, ``k`` or ``alpha``.
    """
    n = check_rows(("cls_attn", cls_attn, "[N]"), ("features", features, "[N, C]"))
    k = check_k(k, n)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0 (the saliency exponent; official 1.0), got {alpha!r}")
    if bool((cls_attn < 0).any()):
        raise ValueError(
            f"cls_attn must be >= 0 (an attention mass), got a minimum of {float(cls_attn.min())}; "
            "SCOPE raises it to the power alpha"
        )
    dt = compute_dtype(cls_attn, features)
    units = unit_rows(features, dt)
    sim = units @ units.T  # [N, N], symmetric
    weight = cls_attn.to(dt) ** float(alpha)
    covered = torch.zeros(n, dtype=dt, device=features.device)  # m[i]: best similarity of token i to the picks
    taken = torch.zeros(n, dtype=torch.bool, device=features.device)
    kept = torch.empty(k, dtype=torch.long, device=features.device)
    buf = torch.empty_like(sim)
    for step in range(k):
        torch.sub(sim, covered[:, None], out=buf)
        gain = buf.clamp_min_(0).sum(dim=0).mul_(weight).masked_fill_(taken, -math.inf)
        best = int(torch.argmax(gain))  # argmax: the first maximum, i.e. the lower index
        kept[step] = best
        taken[best] = True
        torch.maximum(covered, sim[best], out=covered)
    return kept.sort().values
