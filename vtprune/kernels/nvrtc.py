"""CUDA kernels of vtprune's native ops without a compiler: NVRTC through cuda-python (``pip install vtprune[cuda]``).

The device code (``vtprune/kernels/src/*.cuh``: plain CUDA C++, no host code, no torch; the one copy, which the nvcc
extension ``csrc/cuda/*.cu`` includes too, so a kernel edit happens once) with its C entry points (``src/*.cu``) is
compiled at first use with NVRTC for the GPU's architecture, cached on disk per (source hash, architecture, NVRTC
version), loaded with the driver API into the device's primary context (the one torch uses) and launched on torch's
current stream with the tensors' device pointers. The Python launchers here do what ``csrc/cuda/*.cu`` does on the
host side (argument checks, unit rows and DivPrune first picks with the same torch calls as ``vtprune.functional``,
the per-pivot sorts of DART), so the three paths (CPU op, CUDA op, NVRTC op) pick identical indices.

* ``compile_nvrtc(arch="sm_90", kind="cubin")``: every kernel source compiled for ``arch``, no GPU needed;
* ``launch_*``: grid / block / shared-memory logic of each kernel (pure Python, unit-tested without a GPU);
* ``ops()``: the four ops as Python callables on CUDA tensors (``kcenter``, ``maxsum``, ``dart_pick``, ``dbdpc``), the
  ones ``vtprune.kernels`` registers as the CUDA implementation of ``torch.ops.vtprune.*``;
* ``probe()``: why NVRTC kernels cannot run here (no cuda-python, no NVRTC library, no driver, no GPU), or None.

Environment: ``VTPRUNE_NVRTC_CACHE`` (cache folder; default ``$XDG_CACHE_HOME/vtprune/nvrtc``, ``~/.cache/...``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import re
import threading

import torch

from . import _fake, reference

__all__ = ["KERNELS", "Launch", "cache_dir", "compile_nvrtc", "nvrtc_version", "ops", "probe"]

_HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
# kernel source -> its entry points (C names), in vtprune/kernels/src/<source>.cu
KERNELS = {
    "select": tuple(f"greedy_step_{m}_{t}" for m in ("cosine", "l2", "maxsum") for t in ("f32", "f64"))
    + ("greedy_finish_f32", "greedy_finish_f64", "dart_sims_f32", "dart_sims_f64"),
    "dbdpc": ("dbdpc_centres_f32", "dbdpc_centres_f64", "dbdpc_labels_f32", "dbdpc_labels_f64"),
}
_OPTIONS = ("-std=c++17",)

# launch constants; keep in sync with the #defines of select.cu / dbdpc.cu (tests/functional/test_nvrtc.py checks them)
WARPS = 8
THREADS = WARPS * 32
ROWS_PER_BLOCK = WARPS * 4
DBDPC_BLOCK = 1024
LABEL_BLOCK = 256
MAX_GRID_Y = 65535
MAX_GRID_X = 2**31 - 1


# ----------------------------------------------------------------------------- bindings


def _bindings():
    """``(driver, nvrtc)`` modules of cuda-python (``cuda.bindings``, or the pre-12.6 ``cuda`` layout)."""
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError:
        from cuda import cuda as driver  # cuda-python < 12.6
        from cuda import nvrtc
    return driver, nvrtc


def _ok(result, what: str):
    """Unpack a cuda-python ``(status, *values)`` result; raise RuntimeError naming the call on an error."""
    status, values = result[0], result[1:]
    if int(status) != 0:
        raise RuntimeError(f"{what} failed: {status!r}")
    return values[0] if len(values) == 1 else values


def nvrtc_version() -> tuple[int, int]:
    """``(major, minor)`` of the NVRTC library cuda-python loads (ImportError / RuntimeError when there is none)."""
    _, nvrtc = _bindings()
    return tuple(_ok(nvrtc.nvrtcVersion(), "nvrtcVersion"))


def supported_archs() -> list[int]:
    """Compute capabilities this NVRTC compiles for, e.g. ``[75, 80, ..., 120]``."""
    _, nvrtc = _bindings()
    return list(_ok(nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs"))


# ----------------------------------------------------------------------------- compilation and cache


_INCLUDE = re.compile(r'^#include "([\w./]+)"[ \t]*$', re.MULTILINE)


def expand(path: str, _seen: set[str] | None = None) -> str:
    """Text of the CUDA file at ``path`` with its ``#include "x"`` lines replaced by the files' text (looked up beside
    it, recursively, each file once: the include guards' effect). Other ``#include <...>`` lines stay as written (the
    device code has none under NVRTC, see common.cuh). The nvcc extension includes the same headers
    (csrc/cuda/*.cu), so ``expand`` of a header is the device code both back ends compile."""
    seen = set() if _seen is None else _seen
    path = os.path.abspath(path)
    if path in seen:
        return ""
    seen.add(path)
    with open(path) as f:
        text = f.read()
    folder = os.path.dirname(path)
    return _INCLUDE.sub(lambda m: expand(os.path.join(folder, m.group(1)), seen).rstrip("\n"), text)


def source(name: str) -> str:
    """The full source NVRTC compiles for kernel source ``name``: ``src/<name>.cu`` (its C entry points) with the
    device code it includes (``<name>.cuh``, ``common.cuh``) expanded in place, so the cache key hashes all of it."""
    if name not in KERNELS:
        raise ValueError(f"kernel source must be one of {sorted(KERNELS)}, got {name!r}")
    return expand(os.path.join(_HERE, f"{name}.cu"))


def cache_dir() -> str:
    """Where compiled images are cached: ``VTPRUNE_NVRTC_CACHE``, else ``$XDG_CACHE_HOME/vtprune/nvrtc``."""
    root = os.environ.get("VTPRUNE_NVRTC_CACHE")
    if root:
        return root
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vtprune", "nvrtc")


def _check_arch(arch: str, kind: str) -> int:
    if kind not in ("cubin", "ptx"):
        raise ValueError(f"kind must be 'cubin' or 'ptx', got {kind!r}")
    prefix, _, digits = str(arch).partition("_")
    if prefix not in ("sm", "compute") or not digits.rstrip("af").isdigit():
        raise ValueError(f"arch must look like 'sm_90' (or 'compute_90', 'sm_90a'), got {arch!r}")
    return int(digits.rstrip("af"))


def cache_key(text: str, arch: str, kind: str, version: tuple[int, int]) -> str:
    """Cache file name stem: the source hash (with compile options), architecture, kind and NVRTC version."""
    h = hashlib.sha256("\0".join((text, *_OPTIONS)).encode()).hexdigest()[:20]
    return f"{h}-{arch}-{kind}-nvrtc{version[0]}.{version[1]}"


def _nvrtc_compile(name: str, text: str, arch: str, kind: str) -> bytes:
    _, nvrtc = _bindings()
    target = arch.replace("sm_", "compute_") if kind == "ptx" else arch.replace("compute_", "sm_")
    prog = _ok(nvrtc.nvrtcCreateProgram(text.encode(), f"{name}.cu".encode(), 0, [], []), "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture={target}".encode(), *(o.encode() for o in _OPTIONS)]
        status = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
        if int(status) != 0:
            size = _ok(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC could not compile {name}.cu for {target}: {log.decode(errors='replace')}")
        get_size, get = (
            (nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX)
            if kind == "ptx"
            else (nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN)
        )
        image = b" " * _ok(get_size(prog), "nvrtcGet size")
        _ok(get(prog, image), f"nvrtcGet{kind.upper()}")
        return image
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_source(name: str, arch: str = "sm_90", kind: str = "cubin", cache: bool = True) -> tuple[bytes, bool]:
    """``(image, from_cache)`` for kernel source ``name``: a CUBIN (``kind="cubin"``) or PTX (``"ptx"``) for ``arch``.

    The cache (``cache_dir()``) holds one file per (source hash, arch, kind, NVRTC version); a changed source or a
    new NVRTC compiles again. An unwritable cache folder only costs the recompilation."""
    _check_arch(arch, kind)
    text = source(name)
    version = nvrtc_version()
    path = os.path.join(cache_dir(), f"{name}-{cache_key(text, arch, kind, version)}.{kind}")
    if cache and os.path.isfile(path):
        with open(path, "rb") as f:
            return f.read(), True
    image = _nvrtc_compile(name, text, arch, kind)
    if cache:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(image)
            os.replace(tmp, path)  # atomic: concurrent processes never read half a file
        except OSError:
            pass
    return image, False


def compile_nvrtc(arch: str = "sm_90", kind: str = "cubin", cache: bool = True) -> dict[str, bytes]:
    """Compile every kernel source for ``arch`` (``"sm_80"``, ``"sm_90"``, ...; no GPU needed) and return the images
    (CUBIN, or PTX with ``kind="ptx"``) by source name (``"select"``, ``"dbdpc"``; entry points in ``KERNELS``).

    Raises ValueError for a malformed ``arch`` / ``kind``, ImportError without cuda-python, RuntimeError when NVRTC
    fails (its log in the message)."""
    return {name: compile_source(name, arch, kind, cache)[0] for name in KERNELS}


def pick_target(capability: tuple[int, int], supported: list[int]) -> tuple[str, str]:
    """``(arch, kind)`` to build for a GPU of compute ``capability``: its own CUBIN when NVRTC knows the
    architecture, else PTX of the newest architecture NVRTC knows below it (the driver JIT-compiles that)."""
    cc = capability[0] * 10 + capability[1]
    if cc in supported:
        return f"sm_{cc}", "cubin"
    older = [a for a in supported if a <= cc]
    if not older:
        raise RuntimeError(f"NVRTC supports compute capabilities {supported}; this GPU is sm_{cc}")
    return f"compute_{max(older)}", "ptx"


# ----------------------------------------------------------------------------- launch parameters


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch: grid and block (x, y, z) and dynamic shared memory in bytes (the kernels here use static
    shared memory only: at most ``WARPS * 16 + 8`` bytes in a greedy step)."""

    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared: int = 0


def launch_greedy_step(max_n: int, images: int) -> Launch:
    """Greedy step: ``ROWS_PER_BLOCK`` rows per block of ``THREADS`` (one warp per 4 rows), grid.y = images."""
    if max_n < 1 or images < 1:
        raise ValueError(f"a greedy step needs max_n >= 1 and images >= 1, got {max_n} and {images}")
    if images > MAX_GRID_Y:
        raise ValueError(f"at most {MAX_GRID_Y} images per call (CUDA's grid.y limit), got {images}")
    return Launch(((max_n + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK, images, 1), (THREADS, 1, 1))


def launch_greedy_finish(images: int) -> Launch:
    """The last pick: one warp per image."""
    if images > MAX_GRID_X:
        raise ValueError(f"at most {MAX_GRID_X} images, got {images}")
    return Launch((images, 1, 1), (32, 1, 1))


def launch_dart_sims(n: int) -> Launch:
    """DART similarities: one warp per row."""
    return Launch((max(1, (n + WARPS - 1) // WARPS), 1, 1), (THREADS, 1, 1))


def launch_dbdpc(n: int) -> tuple[Launch, Launch]:
    """DBDPC: the centre search in one block of ``DBDPC_BLOCK`` threads, then one thread per token's label."""
    return Launch((1, 1, 1), (DBDPC_BLOCK, 1, 1)), Launch(
        (max(1, (n + LABEL_BLOCK - 1) // LABEL_BLOCK), 1, 1), (LABEL_BLOCK, 1, 1)
    )


# ----------------------------------------------------------------------------- driver


class _Device:
    """The loaded modules of one GPU: primary context, functions by entry-point name."""

    def __init__(self, index: int):
        driver, _ = _bindings()
        self.driver, self.index = driver, index
        dev = _ok(driver.cuDeviceGet(index), "cuDeviceGet")
        self.ctx = _ok(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        self.make_current()
        props = torch.cuda.get_device_properties(index)
        self.arch, self.kind = pick_target((props.major, props.minor), supported_archs())
        self.functions, self.modules = {}, []
        for name, entries in KERNELS.items():
            image, _ = compile_source(name, self.arch, self.kind)
            module = _ok(driver.cuModuleLoadData(image), f"cuModuleLoadData({name}, {self.arch})")
            self.modules.append(module)
            for entry in entries:
                self.functions[entry] = _ok(driver.cuModuleGetFunction(module, entry.encode()), entry)

    def make_current(self) -> None:
        if int(_ok(self.driver.cuCtxGetCurrent(), "cuCtxGetCurrent") or 0) != int(self.ctx):
            _ok(self.driver.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")

    def launch(self, entry: str, cfg: Launch, args: list) -> None:
        """Launch ``entry`` on torch's current stream; ``args``: tensors (device pointers) or ctypes scalars."""
        values = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args]
        params = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
        stream = self.driver.CUstream(torch.cuda.current_stream(self.index).cuda_stream)
        _ok(
            self.driver.cuLaunchKernel(
                self.functions[entry], *cfg.grid, *cfg.block, cfg.shared, stream, ctypes.addressof(params), 0
            ),
            f"cuLaunchKernel({entry})",
        )


_devices: dict[int, _Device] = {}
_lock = threading.Lock()


def _device(t: torch.Tensor) -> _Device:
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    dev = _devices.get(index)
    if dev is None:
        with _lock:
            dev = _devices.get(index)
            if dev is None:
                dev = _devices[index] = _Device(index)
    dev.make_current()
    return dev


def probe() -> str | None:
    """None when NVRTC kernels can run here; else why not (no cuda-python, no NVRTC, no driver, no GPU, a failed
    compilation or load on the current GPU)."""
    try:
        driver, _ = _bindings()
    except ImportError as exc:
        return f"cuda-python is not installed ({exc}; pip install vtprune[cuda])"
    try:
        nvrtc_version()
    except Exception as exc:  # noqa: BLE001  (library not found)
        return f"the NVRTC library does not load ({type(exc).__name__}: {str(exc)[:200]})"
    try:
        _ok(driver.cuInit(0), "cuInit")
    except Exception as exc:  # noqa: BLE001  (no libcuda.so: no driver)
        return f"no CUDA driver ({type(exc).__name__}: {str(exc)[:200]})"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    try:
        _device(torch.empty(0, device="cuda"))
    except Exception as exc:  # noqa: BLE001
        return f"loading the kernels failed ({type(exc).__name__}: {str(exc)[:300]})"
    return None


# ----------------------------------------------------------------------------- ops


def _suffix(t: torch.Tensor) -> str:
    return "f64" if t.dtype == torch.float64 else "f32"


def _scalar(t: torch.Tensor, value: float):
    return ctypes.c_double(value) if t.dtype == torch.float64 else ctypes.c_float(value)


def _check_cuda(t: torch.Tensor, name: str) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor here, got {t.device}")


# Row preparation, the torch calls of vtprune.functional line by line (as csrc/ops.cpp mirrors them in ATen; this
# package never imports vtprune.functional, which imports it), so the greedy loops see bitwise identical rows.
COSINE_EPS = 1e-8  # keep in sync with vtprune/functional/_common.py (tests/functional/test_nvrtc.py checks)
BLOCK_ELEMENTS = reference.BLOCK_ELEMENTS


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """``vtprune.functional._common.unit_rows`` in ``x``'s dtype."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(COSINE_EPS)


def _farthest_nearest_neighbour(x: torch.Tensor, l2: bool) -> torch.Tensor:
    """DivPrune's first pick as a [1] long tensor (the code ``vtprune.functional`` runs)."""
    return reference.farthest_nearest_neighbour(x, "l2" if l2 else "cosine")


def _greedy(x_in: torch.Tensor, offsets, k: int, first, mode: str) -> torch.Tensor:
    _fake._check_offsets(x_in, offsets, k, first)
    for b, f in enumerate(first):
        n = offsets[b + 1] - offsets[b]
        if not -1 <= f < n:
            raise ValueError(f"first[{b}] must be in [-1, {n - 1}], got {f}")
    _check_cuda(x_in, "x")
    l2 = mode == "l2"
    x = (x_in if l2 else _unit_rows(x_in)).contiguous()
    images = len(offsets) - 1
    firsts = torch.cat(
        [
            torch.full((1,), f, dtype=torch.long, device=x.device)
            if f >= 0
            else _farthest_nearest_neighbour(x[offsets[b] : offsets[b + 1]], l2)
            for b, f in enumerate(first)
        ]
    )
    out = torch.empty(images, k, dtype=torch.long, device=x.device)
    out[:, 0] = firsts
    if k == 1:
        return out
    max_n = max(b - a for a, b in zip(offsets[:-1], offsets[1:]))
    step, finish = launch_greedy_step(max_n, images), launch_greedy_finish(images)
    nblocks = step.grid[0]
    maximize = mode != "maxsum"
    state = torch.full((x.shape[0],), float("inf") if maximize else 0.0, dtype=x.dtype, device=x.device)
    vals = torch.empty(2, images * nblocks, dtype=x.dtype, device=x.device)
    idxs = torch.empty(2, images * nblocks, dtype=torch.long, device=x.device)
    offsets_dev = torch.tensor(offsets, dtype=torch.long, device=x.device)
    dev, sfx = _device(x), _suffix(x)
    entry, d = f"greedy_step_{mode}_{sfx}", ctypes.c_int64(x.shape[1])
    nb, kk = ctypes.c_int(nblocks), ctypes.c_int64(k)
    for t in range(1, k):
        now, before = t % 2, 1 - t % 2
        args = [x, offsets_dev, d, state, firsts, vals[before], idxs[before], vals[now], idxs[now], nb, out, kk]
        dev.launch(entry, step, [*args, ctypes.c_int64(t)])
    last = (k - 1) % 2
    dev.launch(f"greedy_finish_{sfx}", finish, [vals[last], idxs[last], nb, ctypes.c_int(int(maximize)), out, kk])
    return out


def kcenter(x: torch.Tensor, offsets: list[int], k: int, first: list[int], metric: str) -> torch.Tensor:
    """``torch.ops.vtprune.kcenter`` on CUDA tensors (NVRTC kernels)."""
    if metric not in ("cosine", "l2"):
        raise ValueError(f"metric must be 'cosine' or 'l2', got '{metric}'")
    return _greedy(x, list(offsets), k, list(first), metric)


def maxsum(x: torch.Tensor, offsets: list[int], k: int, first: list[int]) -> torch.Tensor:
    """``torch.ops.vtprune.maxsum`` on CUDA tensors (NVRTC kernels)."""
    return _greedy(x, list(offsets), k, list(first), "maxsum")


def dart_pick(
    units_in: torch.Tensor, pivots_in: torch.Tensor, excluded: torch.Tensor, counts: list[int]
) -> torch.Tensor:
    """``torch.ops.vtprune.dart_pick`` on CUDA tensors (NVRTC kernels)."""
    _fake._dart_pick(units_in, pivots_in, excluded, counts)
    if pivots_in.dtype != units_in.dtype or pivots_in.shape[1] != units_in.shape[1]:
        raise TypeError(
            f"pivots must be [P, {units_in.shape[1]}] {units_in.dtype}, got {pivots_in.dtype} {tuple(pivots_in.shape)}"
        )
    if any(c < 0 for c in counts):
        raise ValueError(f"counts must be >= 0, got {list(counts)}")
    if excluded.dtype != torch.long or excluded.dim() != 1:
        raise TypeError(f"excluded must be a 1-D int64 tensor, got {excluded.dtype} of shape {tuple(excluded.shape)}")
    _check_cuda(units_in, "units")
    units, pivots = units_in.contiguous(), pivots_in.contiguous()
    n, d = units.shape
    available = torch.ones(n, dtype=torch.bool, device=units.device)
    available.index_fill_(0, excluded, False)
    remaining = n - excluded.shape[0]
    sims = torch.empty(n, dtype=units.dtype, device=units.device)
    dev, cfg, entry = _device(units), launch_dart_sims(n), f"dart_sims_{_suffix(units)}"
    picks = []
    for t, count in enumerate(counts):
        if remaining <= 0:
            break
        take = min(count, remaining)
        if take == 0:
            continue
        dev.launch(entry, cfg, [units, pivots[t], available, ctypes.c_int64(n), ctypes.c_int64(d), sims])
        chosen = torch.sort(sims, stable=True).indices[:take]
        available.index_fill_(0, chosen, False)
        picks.append(chosen)
        remaining -= take
    return torch.cat(picks) if picks else torch.empty(0, dtype=torch.long, device=units.device)


def dbdpc(dist_in: torch.Tensor, rank_in: torch.Tensor, cutoff: float) -> torch.Tensor:
    """``torch.ops.vtprune.dbdpc`` on CUDA tensors (NVRTC kernels)."""
    if dist_in.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dist must be float32 or float64, got {dist_in.dtype}")
    _fake._dbdpc(dist_in, rank_in, cutoff)
    if rank_in.dtype != torch.long or tuple(rank_in.shape) != (dist_in.shape[0],):
        raise ValueError(
            f"rank must be int64 [N] with N = {dist_in.shape[0]}, got {rank_in.dtype} {tuple(rank_in.shape)}"
        )
    if not (cutoff >= 0.0 and cutoff != float("inf")):
        raise ValueError(f"cutoff must be a finite number >= 0, got {cutoff}")
    _check_cuda(dist_in, "dist")
    dist, rank = dist_in.contiguous(), rank_in.contiguous()
    n = dist.shape[0]
    by_rank = torch.argsort(rank)
    if not torch.equal(rank[by_rank], torch.arange(n, device=rank.device)):
        raise ValueError(f"rank must be a permutation of 0 .. {n - 1} (density order, 0 = densest)")
    state = torch.zeros(n, dtype=torch.int8, device=dist.device)
    delta = torch.empty(n, dtype=dist.dtype, device=dist.device)
    labels = torch.empty(n, dtype=torch.long, device=dist.device)
    dev, sfx = _device(dist), _suffix(dist)
    centres_cfg, labels_cfg = launch_dbdpc(n)
    size = ctypes.c_int64(n)
    dev.launch(f"dbdpc_centres_{sfx}", centres_cfg, [dist, rank, by_rank, size, _scalar(dist, cutoff), state, delta])
    dev.launch(f"dbdpc_labels_{sfx}", labels_cfg, [dist, state, size, labels])
    return labels


def ops() -> dict:
    """The NVRTC implementations by op name (what ``vtprune.kernels`` registers for the CUDA dispatch key)."""
    return {"kcenter": kcenter, "maxsum": maxsum, "dart_pick": dart_pick, "dbdpc": dbdpc}
