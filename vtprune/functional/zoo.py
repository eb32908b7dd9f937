"""ZOO-Prune: zeroth-order sensitivity of the projector and sensitivity-weighted diversity."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable

import torch

from ._common import check_int, check_k, check_tensor, compute_dtype, cosine_to, unit_rows

__all__ = ["zoo_sensitivity", "zoo_sensitivity_jvp", "zoo_select"]


def _check_projector_dtype(projector, dtype: torch.dtype) -> None:
    if not isinstance(projector, torch.nn.Module):
        return
    for name, p in projector.named_parameters():
        if p.is_floating_point() and p.dtype != dtype:
            raise TypeError(
                f"projector parameter {name!r} has dtype {p.dtype}, but the sensitivity is computed "
                f"in {dtype} (x is {'float64' if dtype == torch.float64 else 'not float64'}); pass a "
                f"projector in {dtype}, e.g. copy.deepcopy(projector).to({dtype}) "
                "(in fp16/bf16 most x + h*u round back to x)"
            )


def _check_inputs(projector, x, directions) -> tuple[int, int, int]:
    """Validate the sensitivity inputs; returns ``(N, D, m)``."""
    if not callable(projector):
        raise TypeError(f"projector must be callable ([*, D] -> [*, D']), got {type(projector).__name__}")
    check_tensor("x", x, ndim=2, shape_hint="[N, D]", finite=True)
    check_tensor("directions", directions, ndim=2, shape_hint="[m, D]", finite=True)
    n, d = x.shape
    m = directions.shape[0]
    if n < 1 or d < 1:
        raise ValueError(f"x must be a non-empty [N, D] tensor, got shape {tuple(x.shape)}")
    if m < 1 or directions.shape[1] != d:
        raise ValueError(
            f"directions must be [m, D] with m >= 1 and D = {d} (x's feature size), got shape {tuple(directions.shape)}"
        )
    return n, d, m


def zoo_sensitivity(
    projector: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    directions: torch.Tensor,
    h: float = 0.01,
    chunk_size: int = 8192,
) -> torch.Tensor:
    """Zeroth-order (central-difference) sensitivity of the projector at each token.

    ``S(i) = (1/m) sum_j || (P(x_i + h u_j) - P(x_i - h u_j)) / (2h) ||_2``

    the literal estimator of ZOO-Prune ("Training-Free Token Pruning via Zeroth-Order Gradient
    Estimation in VLMs"; no public code yet), with one bank of directions shared by all tokens
    (paper defaults ``m = 64`` unit Gaussian directions, ``h = 0.01``).

    Computed in float32 (float64 if ``x`` is float64): ``x`` and ``directions`` are cast, and the
    projector is called under ``torch.no_grad()`` with autocast disabled. The caller passes a
    projector that runs in that dtype (e.g. a float32 copy of a bf16 projector); an
    ``nn.Module`` whose floating parameters have another dtype raises ``TypeError``. The ``2 m N``
    perturbed inputs go through the projector in chunks of at most ``chunk_size`` rows.

    Args:
        projector: callable ``[*, D] -> [*, D']`` applied row-wise (e.g. the multimodal projector).
        x: ``[N, D]`` projector inputs (vision features of the visual tokens).
        directions: ``[m, D]`` unit-norm direction rows ``u_j`` (used as given, not renormalised).
        h: finite-difference step, > 0.
        chunk_size: maximum number of rows per projector call (>= 2).

    Returns:
        ``[N]`` sensitivities, float32 (float64 for float64 ``x``), on ``x.device``.
    """
    n, d, m = _check_inputs(projector, x, directions)
    if isinstance(h, bool) or not isinstance(h, numbers.Real) or not math.isfinite(h) or h <= 0:
        raise ValueError(f"h must be a finite number > 0, got {h!r}")
    chunk_size = check_int("chunk_size", chunk_size, 2)
    dtype = compute_dtype(x)
    _check_projector_dtype(projector, dtype)

    xs = x.to(dtype)
    us = directions.to(device=x.device, dtype=dtype)
    h = float(h)
    total = m * n  # pairs (j, i), j-major: pair p -> j = p // n, i = p % n
    pairs_per_call = chunk_size // 2
    norms = torch.empty(total, dtype=dtype, device=x.device)
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        for start in range(0, total, pairs_per_call):
            p = torch.arange(start, min(start + pairs_per_call, total), device=x.device)
            base = xs.index_select(0, p % n)
            step = h * us.index_select(0, p // n)
            out = projector(torch.cat([base + step, base - step]))
            if not isinstance(out, torch.Tensor) or out.ndim < 1 or out.shape[0] != 2 * p.numel():
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(
                    f"projector must map [rows, D] to [rows, D'] row-wise; for {2 * p.numel()} rows it returned {got}"
                )
            out = out.to(dtype).reshape(2 * p.numel(), -1)
            plus, minus = out[: p.numel()], out[p.numel() :]
            norms[start : start + p.numel()] = ((plus - minus) / (2.0 * h)).norm(dim=-1)
    return norms.view(m, n).mean(dim=0)


def _mlp_parts(projector):
    """``(linear_1, act, linear_2)`` when ``projector`` is ``nn.Sequential(Linear, elementwise act, Linear)``."""
    if isinstance(projector, torch.nn.Sequential) and len(projector) == 3:
        first, act, second = projector
        if isinstance(first, torch.nn.Linear) and isinstance(second, torch.nn.Linear):
            return first, act, second
    return None


def _elementwise_slope(act, pre: torch.Tensor) -> torch.Tensor:
    """``act'(pre)`` of an elementwise activation (the gradient of ``sum(act(pre))``); works under
    ``torch.inference_mode`` too (the input is cloned into a normal tensor)."""
    with torch.inference_mode(False), torch.enable_grad():
        pre = pre.detach().clone().requires_grad_(True)
        return torch.autograd.grad(act(pre).sum(), pre)[0]


def _check_sketch(sketch, out_dim: int, dtype, device):
    if sketch is None:
        return None
    check_tensor("sketch", sketch, ndim=2, shape_hint="[r, D']", finite=True)
    if sketch.shape[0] < 1 or sketch.shape[1] != out_dim:
        raise ValueError(
            f"sketch must be [r, D'] with r >= 1 and D' = {out_dim} (the projector's output size), "
            f"got shape {tuple(sketch.shape)}"
        )
    return sketch.to(device=device, dtype=dtype)


def zoo_sensitivity_jvp(
    projector: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    directions: torch.Tensor,
    chunk_size: int = 65536,
    sketch: torch.Tensor | None = None,
) -> torch.Tensor:
    """The quantity :func:`zoo_sensitivity` estimates, in its ``h -> 0`` limit: ``S(i) = (1/m) sum_j
    || J_P(x_i) u_j ||_2``, the mean norm of the projector's directional derivatives (Jacobian-vector products).

    The central difference ``(P(x + h u) - P(x - h u)) / 2h`` equals ``J_P(x) u`` up to ``O(h^2)``; this computes
    the right-hand side exactly, without the ``2 m`` perturbed projector passes per token:

    * ``projector = nn.Sequential(Linear W1, act, Linear W2)`` with an elementwise ``act`` (the LLaVA projector):
      ``J u = W2 (act'(W1 x + b1) * (W1 u))``; ``W1 u`` is computed once for all tokens and ``act'`` once per
      token, so the cost is ``N m D_h D'`` multiply-adds for the second layer and nothing else of size ``N m``;
    * any other projector: ``torch.func.jvp`` vmapped over the directions (the primal pass runs once per chunk).

    ``sketch`` (optional ``[r, D']``, e.g. Gaussian rows scaled by ``1/sqrt(r)``) replaces ``||y||`` by
    ``||sketch y||``, a Johnson-Lindenstrauss estimate of the norm: with an MLP projector the second layer becomes
    ``sketch @ W2`` (``[r, D_h]``), ``D'/r`` times cheaper. Without it the result is exact.
    Computed in float32 (float64 for float64 ``x``) like :func:`zoo_sensitivity`; the projector must run in that
    dtype. Token rows are processed in chunks of about ``chunk_size`` (token, direction) pairs.

    Returns:
        ``[N]`` sensitivities on ``x.device``.
    """
    n, d, m = _check_inputs(projector, x, directions)
    chunk_size = check_int("chunk_size", chunk_size, 1)
    dtype = compute_dtype(x)
    _check_projector_dtype(projector, dtype)
    xs = x.to(dtype)
    us = directions.to(device=x.device, dtype=dtype)
    rows = max(1, chunk_size // m)
    out = torch.empty(n, dtype=dtype, device=x.device)
    parts = _mlp_parts(projector)
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        if parts is not None:
            first, act, second = parts
            w2 = second.weight.to(dtype)
            sk = _check_sketch(sketch, w2.shape[0], dtype, x.device)
            w2 = w2 if sk is None else sk @ w2
            wu = us @ first.weight.to(dtype).T  # [m, D_h], shared by every token
            for start in range(0, n, rows):
                pre = first(xs[start : start + rows])
                slope = _elementwise_slope(act, pre)
                tangents = slope[:, None, :] * wu[None]  # [c, m, D_h]
                out[start : start + rows] = (tangents @ w2.T).norm(dim=-1).mean(dim=1)
        else:
            sk = None
            for start in range(0, n, rows):
                with torch.inference_mode(False):  # forward AD needs normal tensors: clone out of inference mode
                    chunk = xs[start : start + rows].clone()
                    tangent = us.clone()[:, None, :].expand(m, chunk.shape[0], d)

                    def directional(t, chunk=chunk):
                        return torch.func.jvp(projector, (chunk,), (t,))[1]

                    # vmap over the tangents only: the unbatched primal pass runs once per chunk
                    with warnings.catch_warnings():  # torch's forward-AD set-up warns once about torch.jit.script
                        warnings.filterwarnings("ignore", message=".*torch.jit.script", category=FutureWarning)
                        tangents = torch.func.vmap(directional)(tangent)
                tangents = tangents.reshape(m, chunk.shape[0], -1)  # [m, c, D']
                if sk is None:
                    sk = _check_sketch(sketch, tangents.shape[-1], dtype, x.device) if sketch is not None else False
                if sk is not False:
                    tangents = tangents @ sk.T
                out[start : start + rows] = tangents.norm(dim=-1).mean(dim=0)
    return out


@torch.no_grad()  # indices only: inputs that require grad (a model run with gradients) are read as values
def zoo_select(sensitivity: torch.Tensor, features: torch.Tensor, k: int) -> torch.Tensor:
    """ZOO-Prune greedy selection: sensitive tokens that are dissimilar to those already kept.

    ``S' = (S - min S) / (max S - min S)`` (constant ``S`` -> all ones); first pick
    ``argmax_i S'(i)``; then repeatedly
    ``argmax_{i not selected} S'(i) * (1 - max_{j selected} cos(z_i, z_j))`` with ``z = features``
    (the projected features ``P(x)``). ZOO-Prune paper (no public code yet). Ties go to the lower
    index; a running maximum of cosine similarity is updated with one row per step (O(N k D)).
    Computed in float32 (float64 if either input is float64).

    Args:
        sensitivity: ``[N]`` sensitivities (e.g. from :func:`zoo_sensitivity`).
        features: ``[N, D']`` features used for the cosine redundancy term.
        k: number of tokens to select, ``1 <= k <= N``.

    Returns:
        int64 ``[k]`` indices in selection order, on ``features.device``.
    """
    check_tensor("sensitivity", sensitivity, ndim=1, shape_hint="[N]", finite=True)
    check_tensor("features", features, ndim=2, shape_hint="[N, D]", finite=True)
    n = features.shape[0]
    if sensitivity.shape[0] != n or features.shape[1] < 1:
        raise ValueError(
            f"sensitivity [N] and features [N, D] must agree on N (D >= 1), got "
            f"{tuple(sensitivity.shape)} and {tuple(features.shape)}"
        )
    k = check_k(k, n)
    dtype = compute_dtype(sensitivity, features)
    device = features.device
    s = sensitivity.to(device=device, dtype=dtype)
    lo, hi = s.min(), s.max()
    span = hi - lo
    s = torch.where(span > 0, (s - lo) / torch.where(span > 0, span, 1.0), torch.ones_like(s))
    z = unit_rows(features, dtype)

    selected = torch.empty(k, dtype=torch.long, device=device)
    max_cos = torch.full((n,), float("-inf"), dtype=dtype, device=device)
    taken = torch.zeros(n, dtype=torch.bool, device=device)
    cur = torch.argmax(s).view(1)
    for t in range(k):
        selected[t : t + 1] = cur
        if t == k - 1:
            break
        taken.index_fill_(0, cur, True)
        torch.maximum(max_cos, cosine_to(z, cur), out=max_cos)
        score = (s * (1.0 - max_cos)).masked_fill_(taken, float("-inf"))
        cur = torch.argmax(score).view(1)
    return selected
