"""Loader of vtprune's native ops (``torch.ops.vtprune.*``, sources in ``csrc/``).

The ops are C++/OpenMP (CPU) and CUDA kernels registered with ``torch.library``:

* ``kcenter(x, offsets, k, first, metric)`` and ``maxsum(x, offsets, k, first)``: greedy k-center / max-sum
  selection, batched over images stacked in ``x`` ([T, D]; image b is rows ``offsets[b] .. offsets[b+1]-1``),
  ``first[b] = -1`` for DivPrune's first pick; -> int64 ``[B, k]`` selection order;
* ``dart_pick(units, pivots, excluded, counts)``: DART's per-pivot least-similar picks;
* ``dbdpc(dist, rank, cutoff)``: PACT's density-peak clustering on a precomputed distance matrix.

``vtprune.functional`` calls them when they are loaded for the input's device and falls back to its pure-torch
code otherwise; both return identical indices (see ``vtprune.functional`` for the math and tie rules).

Back ends, chosen on first use, per device:

1. the compiled extension: the prebuilt ``vtprune._C`` (``pip install -e .`` builds it), else a JIT build of
   ``csrc/`` with ``torch.utils.cpp_extension.load`` (cached under ``TORCH_EXTENSIONS_DIR``); CPU kernels, plus
   CUDA kernels when built with ``VTPRUNE_CUDA=1``;
2. for CUDA tensors, when the extension has no CUDA kernels: NVRTC kernels (``vtprune.kernels.nvrtc``; needs
   cuda-python and the NVRTC library, ``pip install vtprune[cuda]``, no compiler): compiled at first use for the
   GPU and cached on disk, registered as the CUDA implementation of the same ``torch.library`` ops (the ops are
   defined here, with the same schemas, when no extension loaded);
3. pure torch, with one warning naming what failed.

``available()`` says which loaded: ``{"cpp": ..., "cuda": ..., "nvrtc": ...}``. ``VTPRUNE_KERNELS`` forces one:
``ext`` (the compiled extension only), ``nvrtc`` (NVRTC on CUDA, pure torch on CPU: the extension is not loaded),
``torch`` (pure torch everywhere, as ``VTPRUNE_NO_EXT=1``); unset or ``auto``: the order above.
``VTPRUNE_JIT=1`` JIT-builds even where a prebuilt extension exists (a second environment, with another torch,
beside the one that built ``vtprune/_C``; set ``TORCH_EXTENSIONS_DIR`` per environment); ``VTPRUNE_CUDA=1``
JIT-builds ``csrc/`` with its CUDA sources (``nvcc`` and a CUDA build of torch needed; ``CUDA_HOME`` = the toolkit
root, ``TORCH_CUDA_ARCH_LIST=9.0`` for H100/H200; minutes of nvcc) instead of importing a CPU-only prebuilt
extension. ``VTPRUNE_CFLAGS`` adds C++ flags to the JIT build (e.g. ``-march=native``).
"""

from __future__ import annotations

import glob
import os
import threading
import warnings

import torch

from . import _fake  # noqa: F401  (fake kernels for torch.compile, registered once the ops exist)

__all__ = ["available", "backend", "compile_nvrtc", "native", "source_dir"]

_lock = threading.Lock()
_state: dict | None = None
_OPS = ("kcenter", "maxsum", "dart_pick", "dbdpc")
# the op schemas (csrc/ops.cpp declares them for the extension; defined from here when only NVRTC kernels load)
_SCHEMAS = (
    "kcenter(Tensor x, int[] offsets, int k, int[] first, str metric) -> Tensor",
    "maxsum(Tensor x, int[] offsets, int k, int[] first) -> Tensor",
    "dart_pick(Tensor units, Tensor pivots, Tensor excluded, int[] counts) -> Tensor",
    "dbdpc(Tensor dist, Tensor rank, float cutoff) -> Tensor",
)
_BACKENDS = ("auto", "ext", "nvrtc", "torch")
_libraries: list = []  # torch.library.Library objects of the NVRTC registration (kept alive)


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
    sources += glob.glob(os.path.join(os.path.dirname(__file__), "src", "*.cuh"))  # device code csrc/cuda includes
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


def backend() -> str:
    """``VTPRUNE_KERNELS`` (``auto``, ``ext``, ``nvrtc`` or ``torch``; ``VTPRUNE_NO_EXT=1`` means ``torch``)."""
    if os.environ.get("VTPRUNE_NO_EXT") == "1":
        return "torch"
    choice = os.environ.get("VTPRUNE_KERNELS", "auto").strip().lower() or "auto"
    if choice not in _BACKENDS:
        raise ValueError(f"VTPRUNE_KERNELS must be one of {_BACKENDS}, got {os.environ['VTPRUNE_KERNELS']!r}")
    return choice


def _first_error_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    detail = next((line for line in lines if "error" in line.lower()), lines[0] if lines else "")
    return f"{type(exc).__name__}: {detail[:300]}"


def _load_extension() -> str | None:
    """Load the compiled extension; None on success, else why it did not load."""
    try:
        if os.environ.get("VTPRUNE_CUDA") != "1" and os.environ.get("VTPRUNE_JIT") != "1" and _prebuilt_is_fresh():
            import vtprune._C  # noqa: F401
        else:
            _jit_build()
    except Exception as exc:  # compiler missing, no sources, ABI mismatch: fall back
        return _first_error_line(exc)
    return None if hasattr(torch.ops.vtprune, "kcenter") else "not registered"


def _load_nvrtc(define: bool) -> str | None:
    """Register the NVRTC kernels as the ops' CUDA implementation (defining the ops first when ``define``); None on
    success, else why not (no GPU, no driver, no cuda-python, a failed compilation)."""
    from . import nvrtc

    why = nvrtc.probe()
    if why is not None:
        return why
    try:
        if define:
            lib = torch.library.Library("vtprune", "DEF")
            for schema in _SCHEMAS:
                lib.define(schema)
            _libraries.append(lib)
        lib = torch.library.Library("vtprune", "IMPL")
        for name, fn in nvrtc.ops().items():
            lib.impl(name, fn, "CUDA")
        _libraries.append(lib)
    except Exception as exc:  # noqa: BLE001  (a torch.library conflict: keep pure torch rather than fail)
        return f"registration failed ({_first_error_line(exc)})"
    return None


def _load() -> dict:
    state = {"cpp": False, "cuda": False, "nvrtc": False}
    choice = backend()
    if choice == "torch":
        return state
    problems = []
    if choice in ("auto", "ext"):
        why = _load_extension()
        if why is None:
            state["cpp"], state["cuda"] = _has_kernel("CPU"), _has_kernel("CUDA")
        else:
            problems.append(f"compiled extension: {why}")
    gpu = torch.cuda.is_available()
    if choice == "nvrtc" or (choice == "auto" and not state["cuda"] and gpu):
        why = _load_nvrtc(define=not hasattr(torch.ops.vtprune, "kcenter"))
        if why is None:
            state["nvrtc"] = True
        else:
            problems.append(f"NVRTC kernels: {why}")
    if state["cpp"] or state["cuda"] or state["nvrtc"]:
        _fake.register()
    where = []
    if choice != "nvrtc" and not state["cpp"]:
        where.append("CPU")
    if (gpu or choice == "nvrtc") and not (state["cuda"] or state["nvrtc"]):
        where.append("CUDA")
    if problems and where:
        warnings.warn(
            f"vtprune: native ops unavailable on {' and '.join(where)} ({'; '.join(problems)}); "
            "using the pure-torch implementations (same results, slower). Set VTPRUNE_KERNELS=torch to silence "
            "this; `pip install vtprune[cuda]` gives CUDA kernels without a compiler.",
            RuntimeWarning,
            stacklevel=3,
        )
    return state


def compile_nvrtc(arch: str = "sm_90", kind: str = "cubin") -> dict[str, bytes]:
    """Compile every NVRTC kernel source for ``arch`` without a GPU; the images (CUBIN, or PTX with ``kind="ptx"``)
    by source name. Needs cuda-python and NVRTC (``pip install vtprune[cuda]``). See ``vtprune.kernels.nvrtc``."""
    from . import nvrtc

    return nvrtc.compile_nvrtc(arch, kind)


def available() -> dict:
    """``{"cpp": bool, "cuda": bool, "nvrtc": bool}``: whether the compiled extension's CPU / CUDA kernels and the
    NVRTC CUDA kernels are loaded (loads them on first call; ``VTPRUNE_KERNELS=torch`` gives all False)."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _load()
    return dict(_state)


def native(device: torch.device) -> bool:
    """Whether ``vtprune.functional`` should use the native ops for tensors on ``device``."""
    if backend() == "torch":
        return False
    state = available()
    if device.type == "cpu":
        return state["cpp"]
    if device.type == "cuda":
        return state["cuda"] or state["nvrtc"]
    return False
