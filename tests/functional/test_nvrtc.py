"""NVRTC back end of the native ops (vtprune.kernels.nvrtc), without a GPU: every kernel source compiles to PTX and
CUBIN for sm_80 / sm_90, the disk cache hits and misses when it should, the launch parameters cover every row, the
loader falls back cleanly (one warning, pure torch) when there is no driver or no cuda-python, and the NVRTC
registration defines the ops with their schemas and fake kernels. GPU parity is in `make gpu-check`
(eval/gpu/kernels_cuda.py --backend nvrtc)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from vtprune import kernels
from vtprune.kernels import nvrtc


def _nvrtc_missing() -> str | None:
    try:
        nvrtc.nvrtc_version()
    except Exception as exc:  # noqa: BLE001
        return f"cuda-python / NVRTC not installed ({type(exc).__name__}: {exc}); pip install vtprune[cuda]"
    return None


needs_nvrtc = pytest.mark.skipif(_nvrtc_missing() is not None, reason=str(_nvrtc_missing()))
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the loader on a machine without a GPU")
FORCED = os.environ.get("VTPRUNE_NO_EXT") == "1" or os.environ.get("VTPRUNE_KERNELS", "auto") != "auto"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VTPRUNE_NVRTC_CACHE", str(tmp_path / "nvrtc"))
    return tmp_path / "nvrtc"


# ----------------------------------------------------------------------------- compilation


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("kind", ["ptx", "cubin"])
def test_every_source_compiles(arch, kind, cache):
    images = kernels.compile_nvrtc(arch, kind)
    assert set(images) == set(nvrtc.KERNELS)
    for name, image in images.items():
        if kind == "cubin":
            assert image[:4] == b"\x7fELF", name
        else:
            text = image.decode()
            assert f".target {arch}" in text, name
            assert sorted(re.findall(r"\.entry (\w+)\(", text)) == sorted(nvrtc.KERNELS[name])
        for entry in nvrtc.KERNELS[name]:  # every entry point the launchers name is in the image
            assert entry.encode() in image, (name, entry)


@needs_nvrtc
def test_cache_hits_then_misses_on_a_changed_source(cache, monkeypatch):
    image, hit = nvrtc.compile_source("dbdpc", "sm_80", "ptx")
    assert not hit and len(os.listdir(cache)) == 1
    again, hit = nvrtc.compile_source("dbdpc", "sm_80", "ptx")
    assert hit and again == image
    _, hit = nvrtc.compile_source("dbdpc", "sm_90", "ptx")  # another architecture: its own entry
    assert not hit and len(os.listdir(cache)) == 2
    original = nvrtc.source
    monkeypatch.setattr(nvrtc, "source", lambda name: original(name) + "\n// edited\n")
    _, hit = nvrtc.compile_source("dbdpc", "sm_80", "ptx")
    assert not hit and len(os.listdir(cache)) == 3
    # the key names the NVRTC version: a new NVRTC never reads an old image
    text = original("dbdpc")
    assert nvrtc.cache_key(text, "sm_90", "cubin", (13, 0)) != nvrtc.cache_key(text, "sm_90", "cubin", (13, 1))
    _, hit = nvrtc.compile_source("dbdpc", "sm_80", "ptx", cache=False)
    assert not hit


@needs_nvrtc
def test_unwritable_cache_only_costs_the_recompile(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("VTPRUNE_NVRTC_CACHE", str(blocker / "sub"))
    image, hit = nvrtc.compile_source("dbdpc", "sm_80", "ptx")
    assert image and not hit


@needs_nvrtc
def test_compile_error_shows_the_nvrtc_log(cache, monkeypatch):
    monkeypatch.setattr(nvrtc, "source", lambda name: "__global__ void broken() { undefined_thing; }")
    with pytest.raises(RuntimeError, match=r"could not compile dbdpc\.cu for sm_80.*undefined_thing"):
        nvrtc.compile_source("dbdpc", "sm_80")


def test_bad_arch_or_kind_is_refused():
    with pytest.raises(ValueError, match="arch must look like 'sm_90'.*got '90'"):
        nvrtc.compile_nvrtc("90")
    with pytest.raises(ValueError, match="kind must be 'cubin' or 'ptx', got 'elf'"):
        nvrtc.compile_nvrtc("sm_90", "elf")
    with pytest.raises(ValueError, match="kernel source must be one of"):
        nvrtc.source("sort")


def test_pick_target():
    supported = [75, 80, 86, 89, 90, 100, 120]
    assert nvrtc.pick_target((9, 0), supported) == ("sm_90", "cubin")
    assert nvrtc.pick_target((8, 6), supported) == ("sm_86", "cubin")
    # an architecture newer than this NVRTC knows: PTX of the newest older one, for the driver to JIT
    assert nvrtc.pick_target((12, 5), supported) == ("compute_120", "ptx")
    with pytest.raises(RuntimeError, match="sm_70"):
        nvrtc.pick_target((7, 0), supported)


def test_row_preparation_is_bitwise_the_functional_one():
    """The launchers prepare rows and DivPrune first picks without importing vtprune.functional (an import cycle);
    they must give what it gives, bit for bit, or the greedy loops would start from other numbers."""
    from vtprune.functional import _common, diversity

    assert nvrtc.COSINE_EPS == _common.COSINE_EPS and nvrtc.BLOCK_ELEMENTS == _common.BLOCK_ELEMENTS
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(70, 9, generator=g).to(dtype)
        x[60:] = x[:10]  # duplicates: distances within rounding of 0
        x[5] = 0.0  # a zero row: the eps clamp
        unit = nvrtc._unit_rows(x)
        assert torch.equal(unit, _common.unit_rows(x, dtype))
        for rows, l2, metric in ((unit, False, "cosine"), (x, True, "l2"), (unit[:1], False, "cosine")):
            got = nvrtc._farthest_nearest_neighbour(rows, l2)
            assert torch.equal(got, diversity._farthest_nearest_neighbour(rows, metric))


# ----------------------------------------------------------------------------- launch parameters


def test_launch_constants_match_the_sources():
    defines = {}
    for name in nvrtc.KERNELS:
        for key, value in re.findall(r"^#define (VT_\w+) (\S+)", nvrtc.source(name), re.MULTILINE):
            defines[key] = value
    assert int(defines["VT_WARPS"]) == nvrtc.WARPS
    assert int(defines["VT_WARPS"]) * 32 == nvrtc.THREADS
    assert int(defines["VT_WARPS"]) * int(defines["VT_ROWS_PER_WARP"]) == nvrtc.ROWS_PER_BLOCK
    assert int(defines["VT_DBDPC_BLOCK"]) == nvrtc.DBDPC_BLOCK
    assert int(defines["VT_LABEL_BLOCK"]) == nvrtc.LABEL_BLOCK
    from vtprune.functional import pact

    assert int(defines["VT_SEQUENTIAL_BELOW"]) == pact.SEQUENTIAL_BELOW


@pytest.mark.parametrize("name", sorted(nvrtc.KERNELS))
def test_both_back_ends_compile_one_device_source(name):
    """The device code exists once (vtprune/kernels/src/<name>.cuh): the NVRTC source and the nvcc extension's
    csrc/cuda/<name>.cu include the same text (same hash), and csrc/cuda holds host code and kernel wrappers only,
    so a kernel edit cannot reach one back end and miss the other."""
    header = os.path.join(os.path.dirname(nvrtc.__file__), "src", f"{name}.cuh")
    guard, close = f"#ifndef VTPRUNE_{name.upper()}_CUH", f"#endif  // VTPRUNE_{name.upper()}_CUH"

    def included(text: str) -> str:  # the device header's text inside an expanded source, from guard to guard
        start, end = text.find(guard), text.find(close)
        assert 0 <= start < end, "the device header is not included"
        return text[start : end + len(close)]

    device = included(nvrtc.expand(header))
    assert "__device__" in device and '#include "' not in device  # common.cuh expanded in it, nothing left to fetch
    digest = hashlib.sha256(device.encode()).hexdigest()

    assert hashlib.sha256(included(nvrtc.source(name)).encode()).hexdigest() == digest
    csrc = os.path.join(kernels.source_dir(), "cuda", f"{name}.cu")
    if not os.path.isfile(csrc):
        pytest.skip("no csrc/ (an installed wheel): only the NVRTC back end")
    host = open(csrc).read()
    assert hashlib.sha256(included(nvrtc.expand(csrc)).encode()).hexdigest() == digest
    # no second copy: the extension's own code has no device functions, warp intrinsics or shared memory
    assert not re.findall(r"__device__|__shfl\w*|__shared__|__syncthreads", host), csrc


def _rows_of_greedy_grid(cfg: nvrtc.Launch) -> list[int]:
    """Row indices the greedy step kernel visits: blockIdx.x * ROWS_PER_BLOCK + warp * 4 + r (select.cu)."""
    warps = cfg.block[0] // 32
    per_warp = nvrtc.ROWS_PER_BLOCK // warps
    return [
        bx * nvrtc.ROWS_PER_BLOCK + w * per_warp + r
        for bx in range(cfg.grid[0])
        for w in range(warps)
        for r in range(per_warp)
    ]


@pytest.mark.parametrize("max_n", [1, 31, 32, 33, 576, 2880])
def test_greedy_launch_covers_every_row_once(max_n):
    cfg = nvrtc.launch_greedy_step(max_n, images=3)
    assert cfg.block == (256, 1, 1) and cfg.grid[1:] == (3, 1) and cfg.shared == 0
    rows = _rows_of_greedy_grid(cfg)
    assert len(rows) == len(set(rows)) and set(range(max_n)) <= set(rows)
    assert len(rows) - max_n < nvrtc.ROWS_PER_BLOCK  # no block without a row
    assert nvrtc.launch_greedy_finish(3) == nvrtc.Launch((3, 1, 1), (32, 1, 1))


def test_launch_limits_and_small_sizes():
    with pytest.raises(ValueError, match="at most 65535 images.*got 65536"):
        nvrtc.launch_greedy_step(10, 65536)
    with pytest.raises(ValueError, match="max_n >= 1"):
        nvrtc.launch_greedy_step(0, 1)
    assert nvrtc.launch_dart_sims(0).grid == (1, 1, 1)  # never an empty grid
    assert nvrtc.launch_dart_sims(17) == nvrtc.Launch((3, 1, 1), (256, 1, 1))  # one warp per row: 8 rows a block
    centres, labels = nvrtc.launch_dbdpc(513)
    assert centres == nvrtc.Launch((1, 1, 1), (1024, 1, 1))
    assert labels == nvrtc.Launch((3, 1, 1), (256, 1, 1))


def test_launchers_check_arguments_before_touching_a_device():
    x = torch.rand(6, 3)
    with pytest.raises(ValueError, match=r"k must be in \[1, 6\].*got 7"):
        nvrtc.kcenter(x, [0, 6], 7, [-1], "cosine")
    with pytest.raises(ValueError, match="metric must be 'cosine' or 'l2', got 'dot'"):
        nvrtc.kcenter(x, [0, 6], 2, [-1], "dot")
    with pytest.raises(ValueError, match=r"first\[0\] must be in \[-1, 5\], got 6"):
        nvrtc.maxsum(x, [0, 6], 2, [6])
    with pytest.raises(TypeError, match="float32 or float64"):
        nvrtc.maxsum(x.half(), [0, 6], 2, [-1])
    with pytest.raises(ValueError, match="must be a CUDA tensor here, got cpu"):
        nvrtc.kcenter(x, [0, 6], 2, [-1], "cosine")
    with pytest.raises(ValueError, match="counts must be >= 0"):
        nvrtc.dart_pick(x, x[:2], torch.tensor([0]), [1, -1])
    dist = torch.rand(6, 6)
    with pytest.raises(ValueError, match="cutoff must be a finite number >= 0"):
        nvrtc.dbdpc(dist, torch.arange(6), float("nan"))
    with pytest.raises(ValueError, match="must be a CUDA tensor here"):
        nvrtc.dbdpc(dist, torch.arange(6), 0.5)


@needs_nvrtc
def test_launchers_pass_what_the_kernels_declare(cache, monkeypatch):
    """Every launch the four ops make (driven on CPU tensors with the device stubbed) names an entry point of the
    compiled PTX and passes as many arguments, of the same sizes, as its ``.param`` list; grids as computed."""
    from vtprune.functional import _common, pact

    params = {}
    for image in kernels.compile_nvrtc("sm_80", "ptx").values():
        for entry, body in re.findall(r"\.entry (\w+)\(([^)]*)\)", image.decode()):
            params[entry] = [int(bits) for bits in re.findall(r"\.param \.[a-z](\d+)", body)]
    calls = []

    class Recorder:
        def launch(self, entry, cfg, args):
            calls.append((entry, cfg, args))

    monkeypatch.setattr(nvrtc, "_device", lambda t: Recorder())
    monkeypatch.setattr(nvrtc, "_check_cuda", lambda t, name: None)
    x = torch.randn(50, 5, generator=torch.Generator().manual_seed(0))
    nvrtc.kcenter(x, [0, 20, 50], 4, [-1, 3], "cosine")
    nvrtc.kcenter(x, [0, 50], 1, [-1], "l2")  # k = 1: no launch
    nvrtc.maxsum(x.double(), [0, 50], 3, [-1])
    units = _common.unit_rows(x)
    nvrtc.dart_pick(units, units[:3], torch.tensor([0, 7]), [2, 0, 5])
    dist, rank = pact._distances(x, 2.0)
    nvrtc.dbdpc(dist, rank, 0.5)
    entries = [entry for entry, _, _ in calls]
    assert entries == (
        ["greedy_step_cosine_f32"] * 3
        + ["greedy_finish_f32"]
        + ["greedy_step_maxsum_f64"] * 2
        + ["greedy_finish_f64"]
        + ["dart_sims_f32"] * 2
        + ["dbdpc_centres_f32", "dbdpc_labels_f32"]
    )
    for entry, _cfg, args in calls:
        sizes = [64 if isinstance(a, torch.Tensor) else ctypes.sizeof(a) * 8 for a in args]
        assert sizes == params[entry], entry
    assert calls[0][1] == nvrtc.launch_greedy_step(30, 2) and calls[3][1] == nvrtc.launch_greedy_finish(2)
    assert [a.value for a in calls[0][2] if isinstance(a, ctypes.c_int64)][-1] == 1  # step t = 1 first
    assert calls[-2][1] == nvrtc.launch_dbdpc(50)[0] and calls[-1][1] == nvrtc.launch_dbdpc(50)[1]
    assert isinstance(calls[-2][2][4], ctypes.c_float)  # the cutoff in the dtype of dist


# ----------------------------------------------------------------------------- loader


@no_gpu
def test_probe_names_why_not():
    why = nvrtc.probe()
    assert why is not None and ("driver" in why or "cuda-python" in why or "NVRTC" in why or "CUDA device" in why)


def test_probe_without_cuda_python(monkeypatch):
    def missing():
        raise ImportError("No module named 'cuda'")

    monkeypatch.setattr(nvrtc, "_bindings", missing)
    assert "pip install vtprune[cuda]" in nvrtc.probe()


@no_gpu
@pytest.mark.skipif(FORCED, reason="VTPRUNE_NO_EXT / VTPRUNE_KERNELS force a back end: no automatic choice to check")
def test_auto_falls_back_with_one_warning_when_no_driver(monkeypatch):
    """A CUDA device as torch would report it, but no driver for cuda-python: CPU keeps the compiled extension,
    CUDA tensors go to pure torch, one warning names the NVRTC failure."""
    kernels.available()  # the extension (CPU) loaded once, as in any process
    monkeypatch.setattr(kernels, "_state", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = kernels.available()
        assert not kernels.native(torch.device("cuda"))
    assert state["nvrtc"] is False and state["cuda"] is False
    messages = [str(w.message) for w in caught if "vtprune" in str(w.message)]
    assert len(messages) == 1 and "unavailable on CUDA" in messages[0] and "NVRTC kernels:" in messages[0]
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("vtprune::kcenter", "CUDA")


@no_gpu
def test_forced_nvrtc_falls_back_without_driver_and_registers_with_one():
    """VTPRUNE_KERNELS=nvrtc in a fresh process. Without a driver: pure torch everywhere, one warning, no ops
    defined. Then with the driver side stubbed (probe() -> None): the ops are defined from their schemas, the NVRTC
    launchers registered for CUDA only, and the fake kernels (torch.compile shapes)."""
    code = (
        "import warnings, torch\n"
        "from vtprune import kernels\n"
        "from vtprune.kernels import nvrtc\n"
        "import vtprune.functional as F\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    state, cpu = kernels.available(), kernels.native(torch.device('cpu'))\n"
        "    print(state, F.kcenter_select(torch.eye(4), 2).tolist(), cpu)\n"
        "    F.maxsum_select(torch.eye(4), 2)\n"
        "print(len([x for x in w if 'vtprune' in str(x.message)]), hasattr(torch.ops.vtprune, 'kcenter'))\n"
        "nvrtc.probe = lambda: None\n"
        "kernels._state = None\n"
        "print(kernels.available())\n"
        "has = torch._C._dispatch_has_kernel_for_dispatch_key\n"
        "print([has(f'vtprune::{op}', 'CUDA') for op in kernels._OPS], "
        "[has(f'vtprune::{op}', 'CPU') for op in kernels._OPS])\n"
        "print(torch.ops.vtprune.kcenter.default._schema)\n"
        "from torch._subclasses.fake_tensor import FakeTensorMode\n"
        "with FakeTensorMode():\n"
        "    x = torch.empty(10, 4, device='cuda')\n"
        "    print(tuple(torch.ops.vtprune.maxsum(x, [0, 4, 10], 3, [-1, 0]).shape))\n"
    )
    env = dict(os.environ, VTPRUNE_KERNELS="nvrtc")
    env.pop("VTPRUNE_NO_EXT", None)
    r = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[:2] == ["{'cpp': False, 'cuda': False, 'nvrtc': False} [0, 1] False", "1 False"], r.stdout
    assert lines[2] == "{'cpp': False, 'cuda': False, 'nvrtc': True}"
    assert lines[3] == "[True, True, True, True] [False, False, False, False]"
    assert lines[4].startswith("vtprune::kcenter(Tensor x, int[] offsets, int k, int[] first, str metric)")
    assert lines[5] == "(2, 3)"


def test_bad_backend_name_is_refused(monkeypatch):
    monkeypatch.delenv("VTPRUNE_NO_EXT", raising=False)
    monkeypatch.setenv("VTPRUNE_KERNELS", "cuda")
    with pytest.raises(ValueError, match=r"VTPRUNE_KERNELS must be one of .*'nvrtc'.*got 'cuda'"):
        kernels.backend()
    monkeypatch.setenv("VTPRUNE_KERNELS", "torch")
    assert kernels.backend() == "torch" and not kernels.native(torch.device("cpu"))
