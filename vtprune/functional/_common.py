"""Private helpers shared by ``vtprune.functional``: input validation, the compute-dtype rule,
cosine similarity and tie-breaking top-k.

Each piece of knowledge lives here once:

* compute dtype: float64 stays float64, every other dtype (bf16, fp16, float32, integers) is
  computed in float32;
* cosine similarity: rows are divided by ``max(||x||, eps)`` with ``eps = 1e-8`` (the convention
  of ``torch.nn.functional.cosine_similarity``), so a zero row has cosine 0 with everything;
* ties: every selection breaks ties towards the lower index; similarity rows are computed so
  that duplicated tokens get bitwise identical values (see ``rowwise``), so their ties are exact.
"""

from __future__ import annotations

import operator

import torch

from ..kernels.reference import BLOCK_ELEMENTS, near_zero_tol  # noqa: F401  (functional's modules import them here)

COSINE_EPS = 1e-8

# Row block of the per-step similarity rows on CPU: 2**18 float32 = 1 MiB, cache-resident.
ROW_BLOCK_ELEMENTS_CPU = 1 << 18


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_tensor(
    name: str,
    x,
    ndim=None,
    min_ndim: int | None = None,
    shape_hint: str = "",
    allow_bool: bool = False,
    finite: bool = False,
) -> torch.Tensor:
    """Check that ``x`` is a real-valued tensor with the given number of dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{shape_hint and ' ' + shape_hint}, got {type(x).__name__}")
    if x.is_complex() or (x.dtype == torch.bool and not allow_bool):
        raise TypeError(f"{name} must be a real (floating or integer) tensor, got dtype {x.dtype}")
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if allowed is not None and x.ndim not in allowed:
        want = " or ".join(f"{d}-D" for d in allowed)
        raise ValueError(f"{name} must be {want}{shape_hint and ' ' + shape_hint}, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions"
            f"{shape_hint and ' ' + shape_hint}, got shape {tuple(x.shape)}"
        )
    if finite and x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values; only finite values are allowed")
    return x


def check_rows(*named: tuple[str, torch.Tensor, str], at_least: int = 0) -> int:
    """Check ``(name, tensor, shape_hint)`` triples whose hints start with ``[N``: each is a finite real tensor of
    as many dimensions as its hint names, and all agree on ``N`` (``>= at_least``). Returns ``N``. Raises
    ``TypeError`` / ``ValueError`` naming the tensors and their shapes."""
    for name, x, hint in named:
        check_tensor(name, x, ndim=hint.count(",") + 1, shape_hint=hint, finite=True)
    n = named[0][1].shape[0]
    if any(x.shape[0] != n for _, x, _ in named) or n < at_least:
        names = " and ".join(f"{name} {hint}" for name, _, hint in named)
        shapes = " and ".join(str(tuple(x.shape)) for _, x, _ in named)
        floor = f" >= {at_least}" if at_least else ""
        raise ValueError(f"{names} must agree on N{floor}, got {shapes}")
    return n


def as_int(value, what: str) -> int:
    """``value`` as a Python int (bools and non-integers rejected: "``what``, got ...")."""
    if isinstance(value, bool):
        raise TypeError(f"{what}, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what}, got {type(value).__name__} {value!r}") from None


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` as a Python int (bools rejected), checking ``minimum <= value <= maximum``."""
    v = as_int(value, f"{name} must be an int")
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        lo = "-inf" if minimum is None else str(minimum)
        hi = "inf" if maximum is None else str(maximum)
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")
    return v


def check_k(k, n: int, what: str = "tokens") -> int:
    """A budget ``k`` must be an int in ``[1, n]``."""
    v = as_int(k, "k must be an int")
    if not 1 <= v <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of {what}), got {v}")
    return v


def unit_rows(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows of ``x`` (cast to ``dtype``) divided by ``max(||row||_2, eps)``."""
    x = x.to(dtype or compute_dtype(x))
    # the native ops (csrc/ops.cpp unit_rows) make the same ATen calls: bitwise identical unit rows
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(COSINE_EPS)


def _row_block(x: torch.Tensor) -> int:
    """Rows per block for row-wise products: small (cache-sized) on CPU, large on accelerators."""
    elements = ROW_BLOCK_ELEMENTS_CPU if x.device.type == "cpu" else BLOCK_ELEMENTS
    return max(1, elements // max(x.shape[1], 1))


def rowwise(x: torch.Tensor, row: torch.Tensor, fn) -> torch.Tensor:
    """``fn(block, row)`` -> [rows] for every row block of ``x`` [N, D], concatenated to [N].

    Every block has the same number of rows (the last block overlaps the previous one), so the
    reduction runs with one configuration and identical rows of ``x`` give bitwise identical
    results. A matrix-vector product does not promise this (BLAS kernels treat tail rows
    differently), and exact ties between duplicated tokens must break towards the lower index.
    """
    n = x.shape[0]
    step = _row_block(x)
    if step >= n:
        return fn(x, row)
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    for start in range(0, n, step):
        start = min(start, n - step)
        out[start : start + step] = fn(x[start : start + step], row)
    return out


def _dots(block: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    return (block * row).sum(dim=1)


def _sq_dists(block: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    return (block - row).square_().sum(dim=1)


def cosine_to(units: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``units`` (unit rows, [N, D]) to row ``index`` (long
    tensor of shape [1]); shape [N], clamped to [-1, 1]. ``index`` stays a tensor so GPU loops need
    no host sync; identical rows get identical values (see :func:`rowwise`)."""
    return cosine_to_row(units, units.index_select(0, index))


def cosine_to_row(units: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``units`` ([N, D] unit rows) to ``row`` ([1, D] unit row);
    shape [N], clamped to [-1, 1]; identical rows get identical values."""
    return rowwise(units, row, _dots).clamp_(-1.0, 1.0)


def sq_l2_to(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance of every row of ``x`` to row ``index`` ([1] long), from explicit
    differences (exactly 0 for duplicate rows)."""
    return rowwise(x, x.index_select(0, index), _sq_dists)


def topk_lowtie(scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Indices of the k largest (or smallest) entries along the last axis, in rank order;
    equal scores rank by lower index (stable sort)."""
    order = torch.sort(scores, dim=-1, descending=largest, stable=True).indices
    return order[..., :k]
