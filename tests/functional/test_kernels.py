"""Native ops (torch.ops.vtprune.*): registration (opcheck, torch.compile), identical indices to the pure-torch
reference (random sizes, duplicates, ties, k = 1 and k = N), clear errors, the loader's fallback, CUDA parity."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vtprune.functional as F
from vtprune import kernels
from vtprune.functional import diversity, pact

NO_EXT = os.environ.get("VTPRUNE_NO_EXT") == "1"
pytestmark = pytest.mark.skipif(NO_EXT, reason="VTPRUNE_NO_EXT=1 forces the pure-torch path")
PROPS = settings(max_examples=15, deadline=None)
ops = torch.ops.vtprune


@pytest.fixture(scope="module", autouse=True)
def _native():
    # without VTPRUNE_NO_EXT the extension must load (prebuilt by `pip install -e .`, else JIT): a broken build
    # fails here instead of silently testing pure torch against itself
    assert kernels.available()["cpp"], "native CPU ops failed to load"


def features(seed, n, d, dup=0, dtype=torch.float64):
    """Random rows; the last ``dup`` rows copy earlier ones (exact ties)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    dup = min(dup, n - 1)
    if dup:
        src = torch.randint(0, max(1, n - dup), (dup,), generator=g)
        x[n - dup :] = x[src]
    return x.to(dtype)


def test_available_shape():
    state = kernels.available()
    assert set(state) == {"cpp", "cuda", "nvrtc"} and all(isinstance(v, bool) for v in state.values())
    assert state["cuda"] == torch._C._dispatch_has_kernel_for_dispatch_key("vtprune::kcenter", "CUDA")


# ----------------------------------------------------------------------------- registration


def test_opcheck_every_op():
    x = features(0, 30, 7, dup=4, dtype=torch.float32)
    for metric in ("cosine", "l2"):
        torch.library.opcheck(ops.kcenter, (x, [0, 12, 30], 5, [-1, 3], metric))
    torch.library.opcheck(ops.maxsum, (x.double(), [0, 30], 9, [2]))
    units = F._common.unit_rows(x)
    torch.library.opcheck(ops.dart_pick, (units, units[:3], torch.tensor([0, 4]), [2, 0, 5]))
    dist, rank = pact._distances(x, 2.0)
    torch.library.opcheck(ops.dbdpc, (dist, rank, 0.5))


def test_torch_compile_fullgraph():
    def pipeline(x, dist, rank):
        order = ops.kcenter(x * 2.0, [0, 10, 25], 4, [-1, 0], "cosine")
        labels = ops.dbdpc(dist, rank, 0.8)
        return order.sort(dim=1).values, labels.bincount(minlength=dist.shape[0])

    x = features(1, 25, 6, dup=3, dtype=torch.float32)
    dist, rank = pact._distances(x, 2.0)
    compiled = torch.compile(pipeline, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, dist, rank), pipeline(x, dist, rank)):
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------- parity with pure torch


@PROPS
@given(
    st.integers(0, 2**31),
    st.integers(1, 40),
    st.integers(1, 9),
    st.integers(0, 8),
    st.sampled_from(["cosine", "l2", "maxsum"]),
    st.booleans(),
    st.data(),
)
def test_greedy_identical_to_pure_torch(seed, n, d, dup, kind, give_first, data):
    dup = min(dup, n - 1)
    k = data.draw(st.sampled_from([1, n, data.draw(st.integers(1, n))]))
    first = data.draw(st.integers(0, n - 1)) if give_first else None
    x = features(seed, n, d, dup, dtype=data.draw(st.sampled_from([torch.float64, torch.float32])))
    if kind == "maxsum":
        native = ops.maxsum(x, [0, n], k, [-1 if first is None else first])[0]
        pure = diversity._maxsum_torch(x, k, first)
    else:
        native = ops.kcenter(x, [0, n], k, [-1 if first is None else first], kind)[0]
        pure = diversity._kcenter_torch(x, k, first, kind)
    assert native.dtype == torch.int64 and torch.equal(native, pure)


def test_exact_ties_break_to_lower_index():
    same = torch.ones(6, 4)
    assert ops.kcenter(same, [0, 6], 6, [-1], "cosine")[0].tolist() == list(range(6))
    assert ops.kcenter(same, [0, 6], 6, [3], "l2")[0].tolist() == [3, 0, 1, 2, 4, 5]
    assert ops.maxsum(torch.eye(5), [0, 5], 5, [-1])[0].tolist() == list(range(5))
    # integer-valued rows: every distance is exact in both paths, many ties
    x = torch.randint(0, 3, (40, 5), generator=torch.Generator().manual_seed(3)).float()
    for metric in ("cosine", "l2"):
        assert torch.equal(ops.kcenter(x, [0, 40], 40, [-1], metric)[0], diversity._kcenter_torch(x, 40, None, metric))


@PROPS
@given(st.integers(0, 2**31), st.lists(st.integers(1, 15), min_size=1, max_size=4), st.data())
def test_batch_equals_images_alone(seed, sizes, data):
    k = data.draw(st.integers(1, min(sizes)))
    firsts = [data.draw(st.integers(-1, s - 1)) for s in sizes]
    x = features(seed, sum(sizes), 5, dup=2, dtype=torch.float32)
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    out = ops.kcenter(x, offsets, k, firsts, "cosine")
    assert out.shape == (len(sizes), k)
    for b, f in enumerate(firsts):
        alone = diversity._kcenter_torch(x[offsets[b] : offsets[b + 1]], k, None if f < 0 else f, "cosine")
        assert torch.equal(out[b], alone)


@PROPS
@given(
    st.integers(0, 2**31),
    st.integers(1, 30),
    st.integers(0, 4),
    st.integers(0, 5),
    st.integers(0, 5),
    st.integers(0, 8),
)
def test_dart_identical_to_pure_torch(seed, image_len, after, n_ip, n_tp, per):
    seq = 2 + image_len + after
    hidden = features(seed, seq, 6, dup=min(4, seq - 1), dtype=torch.float32)
    keys = features(seed + 1, seq, 4, dtype=torch.float32)
    native = F.dart_select(hidden, keys, 2, image_len, per, n_ip, n_tp)
    kernels_native = kernels.native
    try:
        kernels.native = lambda device: False
        pure = F.dart_select(hidden, keys, 2, image_len, per, n_ip, n_tp)
    finally:
        kernels.native = kernels_native
    assert torch.equal(native, pure)


@PROPS
@given(st.integers(0, 2**31), st.integers(1, 60), st.integers(2, 8), st.integers(0, 10), st.floats(0.0, 1.5))
def test_dbdpc_identical_to_pure_torch(seed, n, d, dup, cutoff):
    x = features(seed, n, d, dup=min(dup, n - 1), dtype=torch.float32)
    dist, rank = pact._distances(x, 2.0)
    assert torch.equal(ops.dbdpc(dist, rank, cutoff), pact._dbdpc_torch(dist, rank, cutoff))


def test_dbdpc_many_rounds_identical():
    # clustered data: the first rounds find >= 10 centres, later ones fewer (the sequential pass runs)
    g = torch.Generator().manual_seed(5)
    centres = torch.randn(40, 16, generator=g)
    x = centres.repeat_interleave(6, 0) + 0.05 * torch.randn(240, 16, generator=g)
    dist, rank = pact._distances(x, 2.0)
    for cutoff in (0.0, 0.01, 0.05, 0.3, 2.5):
        assert torch.equal(ops.dbdpc(dist, rank, cutoff), pact._dbdpc_torch(dist, rank, cutoff))


# ----------------------------------------------------------------------------- errors


def test_bad_arguments_raise_clear_errors():
    x = torch.rand(6, 3)
    with pytest.raises(ValueError, match=r"k must be in \[1, 6\].*got 7"):
        ops.kcenter(x, [0, 6], 7, [-1], "cosine")
    with pytest.raises(ValueError, match=r"k must be in \[1, 2\].*got 3"):
        ops.kcenter(x, [0, 4, 6], 3, [-1, -1], "cosine")
    with pytest.raises(ValueError, match=r"k must be in \[1, 6\].*got 0"):
        ops.maxsum(x, [0, 6], 0, [-1])
    with pytest.raises(TypeError, match="float32 or float64.*BFloat16"):
        ops.kcenter(x.bfloat16(), [0, 6], 2, [-1], "cosine")
    with pytest.raises(TypeError, match="float32 or float64.*Long"):
        ops.maxsum(x.long(), [0, 6], 2, [-1])
    with pytest.raises(ValueError, match=r"2-D \[tokens, D\].*\[6\]"):
        ops.kcenter(x[:, 0], [0, 6], 2, [-1], "cosine")
    with pytest.raises(ValueError, match="end at x.size\\(0\\) = 6"):
        ops.kcenter(x, [0, 5], 2, [-1], "cosine")
    with pytest.raises(ValueError, match=r"first\[0\] must be in \[-1, 5\], got 6"):
        ops.kcenter(x, [0, 6], 2, [6], "cosine")
    with pytest.raises(ValueError, match="one entry per image"):
        ops.maxsum(x, [0, 3, 6], 2, [-1])
    with pytest.raises(ValueError, match="metric must be 'cosine' or 'l2', got 'dot'"):
        ops.kcenter(x, [0, 6], 2, [-1], "dot")
    with pytest.raises(ValueError, match="must be on one device"):
        ops.dart_pick(x, x.to("meta"), torch.tensor([0]), [1] * 6)
    with pytest.raises(ValueError, match="one entry per pivot"):
        ops.dart_pick(x, x[:2], torch.tensor([0]), [1])
    with pytest.raises(ValueError, match="not repeat an index"):
        ops.dart_pick(x, x[:2], torch.tensor([1, 1]), [1, 1])
    dist, rank = pact._distances(x, 2.0)
    with pytest.raises(ValueError, match="cutoff must be a finite number >= 0"):
        ops.dbdpc(dist, rank, -0.1)
    with pytest.raises(ValueError, match="permutation"):
        ops.dbdpc(dist, torch.zeros(6, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="square"):
        ops.dbdpc(dist[:3], rank, 0.5)
    # the functional layer still validates first (same messages as before the native path)
    with pytest.raises(ValueError, match=r"k must be in \[1, 6\]"):
        F.kcenter_select(x, 7)


# ----------------------------------------------------------------------------- loader


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(kernels, "_state", None)
    monkeypatch.setattr(kernels, "_prebuilt_is_fresh", lambda: False)

    def no_compiler():
        raise RuntimeError("error: no C++ compiler")

    monkeypatch.setattr(kernels, "_jit_build", no_compiler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels.available() == {"cpp": False, "cuda": False, "nvrtc": False}
        assert not kernels.native(torch.device("cpu"))
        F.kcenter_select(torch.rand(5, 3), 2)
    assert [str(w.message).count("no C++ compiler") for w in caught] == [1]


def test_no_ext_env_forces_pure_torch():
    code = (
        "import warnings; warnings.simplefilter('error'); import torch, vtprune.functional as F; "
        "from vtprune import kernels; print(kernels.available(), F.kcenter_select(torch.eye(4), 2).tolist())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, VTPRUNE_NO_EXT="1"),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "{'cpp': False, 'cuda': False, 'nvrtc': False} [0, 1]"


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_ops_match_cpu():
    if not kernels.available()["cuda"]:
        pytest.skip("CUDA kernels not built (VTPRUNE_CUDA=1)")
    dev = torch.device("cuda")
    x = features(7, 300, 64, dup=20, dtype=torch.float32)
    offsets = [0, 120, 300]
    for metric in ("cosine", "l2"):
        got = ops.kcenter(x.to(dev), offsets, 40, [-1, 5], metric)
        assert got.device.type == "cuda" and torch.equal(got.cpu(), ops.kcenter(x, offsets, 40, [-1, 5], metric))
    assert torch.equal(ops.maxsum(x.to(dev), offsets, 40, [-1, -1]).cpu(), ops.maxsum(x, offsets, 40, [-1, -1]))
    assert ops.kcenter(x[:1].repeat(50, 1).to(dev), [0, 50], 50, [-1], "cosine").tolist() == [list(range(50))]
    units = F._common.unit_rows(x)
    excl = torch.tensor([3, 9])
    assert torch.equal(
        ops.dart_pick(units.to(dev), units[:6].to(dev), excl.to(dev), [7] * 6).cpu(),
        ops.dart_pick(units, units[:6], excl, [7] * 6),
    )
    dist, rank = pact._distances(x, 2.0)
    for cutoff in (0.0, 0.8, 1.0):
        assert torch.equal(ops.dbdpc(dist.to(dev), rank.to(dev), cutoff).cpu(), ops.dbdpc(dist, rank, cutoff))
    torch.library.opcheck(ops.kcenter, (x.to(dev), offsets, 5, [-1, 2], "cosine"))
