"""Loader of vtprune's native ops (``torch.ops.vtprune.*``, sources in ``csrc/``).

The ops are C++/OpenMP (CPU) and CUDA kernels registered with ``torch.library``:

* ``kcenter(x, offsets, k, first, metric)`` and ``maxsum(x, offsets, k, first)``: greedy k-center / max-sum
  selection, batched over images stacked in ``x`` ([T, D]; image b is rows ``offsets[b] .. offsets[b+1]-1``),
  ``first[b] = -1`` for DivPrune's first pick; -> int64 ``[B, k]`` selection order;
* ``dart_pick(units, pivots, excluded, counts)``: DART's per-pivot least-similar picks;
* ``dbdpc(dist, rank, cutoff)``: PACT's density-peak clustering on a precomputed distance matrix.

``vtprune.functional`` calls them when they are loaded for the input's device and falls back to its pure-torch
code otherwise; both return identical indices (see ``vtprune.functional`` for the math and tie rules).

Loading, on first use: the prebuilt extension ``vtprune._C`` (``pip install -e .`` builds it), else a JIT build
of ``csrc/`` with ``torch.utils.cpp_extension.load`` (cached under ``TORCH_EXTENSIONS_DIR``), else pure torch
with one warning. ``VTPRUNE_NO_EXT=1`` forces pure torch; ``VTPRUNE_JIT=1`` JIT-builds even where a prebuilt
extension exists (a second environment, with another torch, beside the one that built ``vtprune/_C``; set
``TORCH_EXTENSIONS_DIR`` per environment); ``VTPRUNE_CUDA=1`` JIT-builds ``csrc/`` with its CUDA
sources (``nvcc`` and a CUDA build of torch needed; ``CUDA_HOME`` = the toolkit root, ``TORCH_CUDA_ARCH_LIST=9.0``
for H100/H200; minutes of nvcc) instead of importing a CPU-only prebuilt extension. ``VTPRUNE_CFLAGS`` adds C++
flags to the JIT build (e.g. ``-march=native``).
"""

from __future__ import annotations

import glob
import os
import threading
import warnings

import torch

from . import _fake  # noqa: F401  (fake kernels for torch.compile, registered once the ops exist)

__all__ = ["available", "native", "source_dir"]

_lock = threading.Lock()
_state: dict | None = None
_OPS = ("kcenter", "maxsum", "dart_pick", "dbdpc")


def source_dir() -> str:
    """``csrc/`` of a source checkout (absent from a plain installed wheel)."""
    return os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "csrc"))


def _sources(cuda: bool) -> list[str]:
    root = source_dir()
    files = sorted(glob.glob(os.path.join(root, "**", "*.cpp"), recursive=True))
    if cuda:
        files += sorted(glob.glob(os.path.join(root, "**", "*.cu"), recursive=True))
    return files


def _prebuilt_is_fresh() -> bool:
    """Import ``vtprune._C`` unless the source tree holds newer sources than it (then JIT-build instead)."""
    pattern = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_C*.so")
    built = glob.glob(pattern) + glob.glob(pattern[:-3] + ".pyd")
    if not built:
        return False
    stamp = min(os.path.getmtime(p) for p in built)
    sources = glob.glob(os.path.join(source_dir(), "**", "*.*"), recursive=True)
    return all(os.path.getmtime(s) <= stamp for s in sources)


def _jit_build() -> None:
    from torch.utils import cpp_extension

    cuda = os.environ.get("VTPRUNE_CUDA") == "1" and torch.version.cuda is not None
    sources = _sources(cuda)
    if not sources:
        raise RuntimeError(f"no C++ sources under {source_dir()} (an installed wheel without the extension)")
    kwargs = dict(
        extra_cflags=["-O3", "-fopenmp"] + os.environ.get("VTPRUNE_CFLAGS", "").split(),
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
    )
    if cuda:
        kwargs["extra_cuda_cflags"] = ["-O3"]
    cpp_extension.load(name="vtprune_native_cuda" if cuda else "vtprune_native", sources=sources, **kwargs)


def _has_kernel(key: str) -> bool:
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"vtprune::{op}", key) for op in _OPS)


def _load() -> dict:
    if os.environ.get("VTPRUNE_NO_EXT") == "1":
        return {"cpp": False, "cuda": False}
    error = None
    try:
        if os.environ.get("VTPRUNE_CUDA") != "1" and os.environ.get("VTPRUNE_JIT") != "1" and _prebuilt_is_fresh():
            import vtprune._C  # noqa: F401
        else:
            _jit_build()
    except Exception as exc:  # compiler missing, no sources, ABI mismatch: fall back to pure torch
        error = exc
        lines = [line for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines if "error" in line.lower()), lines[0] if lines else "")
    if error is None and hasattr(torch.ops.vtprune, "kcenter"):
        _fake.register()
        return {"cpp": _has_kernel("CPU"), "cuda": _has_kernel("CUDA")}
    warnings.warn(
        f"vtprune: native ops unavailable "
        f"({type(error).__name__ + ': ' + detail[:300] if error else 'not registered'}); "
        "using the pure-torch implementations (same results, slower). Set VTPRUNE_NO_EXT=1 to silence this.",
        RuntimeWarning,
        stacklevel=3,
    )
    return {"cpp": False, "cuda": False}


def available() -> dict:
    """``{"cpp": bool, "cuda": bool}``: whether the native CPU / CUDA kernels are loaded (loads them on first
    call; ``VTPRUNE_NO_EXT=1`` gives both False)."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _load()
    return dict(_state)


def native(device: torch.device) -> bool:
    """Whether ``vtprune.functional`` should use the native ops for tensors on ``device``."""
    if os.environ.get("VTPRUNE_NO_EXT") == "1":
        return False
    state = available()
    if device.type == "cpu":
        return state["cpp"]
    if device.type == "cuda":
        return state["cuda"]
    return False
