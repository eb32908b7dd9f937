"""CUDA kernels vs CPU ops: ``torch.ops.vtprune.*`` on the GPU against the same op on the CPU (C++/OpenMP) and
against vtprune's pure-torch code on the GPU, on fresh random inputs of many sizes.

Ops: ``kcenter`` (cosine and l2, given and DivPrune first picks, batches of images of different sizes),
``maxsum``, ``dart_pick`` and ``dbdpc``, in float32 and float64, with duplicated rows (exact ties) and
k = 1 / k = N. Indices must be identical. Where two paths pick differently, the step where they part is scored
in float64: a gap within float32 rounding is reported as a near-tie (WARN: both are right to rounding), anything
else is a FAIL. Also ``torch.library.opcheck`` of every op on the device.

    VTPRUNE_CUDA=1 python eval/gpu/kernels_cuda.py --out eval/results/gpu/kernels_cuda.md     # on a GPU
    python eval/gpu/kernels_cuda.py --device cpu --smoke                                       # CPU: C++ vs torch

On the CPU (``--device cpu``) the native CPU op is compared with the pure-torch code instead.

``--impl nvrtc`` tests the NVRTC kernels (``vtprune.kernels.nvrtc``, called directly, so the compiled CUDA
extension can be loaded beside them) against the CPU op, the CUDA extension's op (when built) and pure torch, checks
their registration as ``torch.ops.vtprune.*`` in a fresh process (``VTPRUNE_KERNELS=nvrtc``: ``opcheck`` on CUDA,
``vtprune.functional`` on CUDA tensors), and reports the NVRTC compile time. Every run ends with a timing table of
LLaVA-sized cells: the op under test beside the other back ends on the same device (CUDA-synchronised medians).

    python eval/gpu/kernels_cuda.py --impl nvrtc --out eval/results/gpu/kernels_nvrtc.md   # on a GPU, no nvcc needed
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time

import common
import torch

from vtprune import kernels
from vtprune.functional import diversity, pact
from vtprune.functional._common import unit_rows

ops = torch.ops.vtprune
# the implementation under test on the device, by op name: the registered torch.ops (default) or the NVRTC launchers
UT: dict = {}
NEAR_TIE = {torch.float32: 1e-4, torch.float64: 1e-9}


def features(gen: torch.Generator, n: int, d: int, dup: int, dtype) -> torch.Tensor:
    """Random rows (normal, some shifted off zero-mean), the last ``dup`` rows copies of earlier ones."""
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if torch.rand(1, generator=gen).item() < 0.5:
        x += torch.randn(1, d, generator=gen, dtype=torch.float64)  # correlated rows: closer cosines
    dup = min(dup, n - 1)
    if dup > 0:
        src = torch.randint(0, n - dup, (dup,), generator=gen)
        x[n - dup :] = x[src]
    return x.to(dtype)


# ----------------------------------------------------------------------------- near-tie diagnosis


def _dist_rows(x64: torch.Tensor, cand: torch.Tensor, others: torch.Tensor, mode: str) -> torch.Tensor:
    """[len(cand), len(others)] distances (cosine: 1 - cos; l2: squared) / similarities (maxsum: cos)."""
    if mode == "l2":
        return torch.cdist(x64[cand], x64[others]).square()
    u = unit_rows(x64, torch.float64)
    sim = u[cand] @ u[others].T
    return sim if mode == "maxsum" else 1.0 - sim


def greedy_gap(x64: torch.Tensor, prefix: list[int], a: int, b: int, mode: str) -> float:
    """Relative float64 gap between the objectives of picks ``a`` and ``b`` after the common ``prefix``."""
    cand = torch.tensor([a, b])
    if not prefix:  # DivPrune's first pick: farthest nearest neighbour
        d = _dist_rows(x64, cand, torch.arange(x64.shape[0]), "l2" if mode == "l2" else "cosine")
        d[0, a] = d[1, b] = float("inf")
        score = d.min(dim=1).values
    else:
        d = _dist_rows(x64, cand, torch.tensor(prefix), mode)
        score = d.sum(dim=1) if mode == "maxsum" else d.min(dim=1).values
    sa, sb = score.tolist()
    return abs(sa - sb) / max(abs(sa), abs(sb), 1e-12)


def first_difference(got: torch.Tensor, want: torch.Tensor):
    """``(verdict, got, want, j)``: verdict 'ok' / 'MISMATCH: lengths ...' when that settles it (else None), the
    index lists, and the first step where they part."""
    got, want = got.cpu().tolist(), want.cpu().tolist()
    if got == want:
        return "ok", got, want, None
    if len(got) != len(want):
        return f"MISMATCH: lengths {len(got)} vs {len(want)}", got, want, None
    return None, got, want, next(i for i, (p, q) in enumerate(zip(got, want)) if p != q)


def compare_selection(got: torch.Tensor, want: torch.Tensor, x64: torch.Tensor, mode: str, dtype) -> str:
    """'ok', 'near-tie (gap ...)' or 'MISMATCH ...' for one image's selection order."""
    verdict, got, want, j = first_difference(got, want)
    if verdict is not None:
        return verdict
    gap = greedy_gap(x64, want[:j], got[j], want[j], mode)
    if gap <= NEAR_TIE[dtype]:
        return f"near-tie at step {j} (float64 gap {gap:.1e})"
    return f"MISMATCH at step {j}: {got[j]} vs {want[j]} (float64 gap {gap:.1e})"


# ----------------------------------------------------------------------------- reference paths


def pure_greedy(x: torch.Tensor, offsets, k: int, first, mode: str) -> torch.Tensor:
    rows = []
    for b in range(len(offsets) - 1):
        xi = x[offsets[b] : offsets[b + 1]]
        f = None if first[b] < 0 else first[b]
        rows.append(diversity._maxsum_torch(xi, k, f) if mode == "maxsum" else diversity._kcenter_torch(xi, k, f, mode))
    return torch.stack(rows)


def native_greedy(x: torch.Tensor, offsets, k: int, first, mode: str, impl=None) -> torch.Tensor:
    """The greedy op of ``impl`` (op name -> callable; default the registered ``torch.ops.vtprune``)."""
    impl = impl or {"kcenter": ops.kcenter, "maxsum": ops.maxsum}
    if mode == "maxsum":
        return impl["maxsum"](x, offsets, k, first)
    return impl["kcenter"](x, offsets, k, first, mode)


def references(on_gpu: bool) -> dict[str, str]:
    """Extra reference back ends besides pure torch on the device: the CPU op, and the CUDA extension's op when the
    op under test is NVRTC (both only when loaded)."""
    state = kernels.available()
    refs = {}
    if on_gpu and state["cpp"]:
        refs["vs CPU op"] = "cpu"
    if on_gpu and UT.get("name") == "nvrtc" and state["cuda"]:
        refs["vs CUDA extension op"] = "cuda"
    return refs


def pure_dart(units: torch.Tensor, pivots: torch.Tensor, excluded: torch.Tensor, counts) -> torch.Tensor:
    from vtprune.functional import dart

    return dart.dart_pick_torch(units, pivots, excluded, counts)


def compare_dart(got, want, units64, pivots64, counts, dtype) -> str:
    verdict, got, want, j = first_difference(got, want)
    if verdict is not None:
        return verdict
    t, acc = 0, 0
    while t < len(counts) and acc + counts[t] <= j:
        acc += counts[t]
        t += 1
    sims = units64[[got[j], want[j]]] @ pivots64[t]
    gap = abs(sims[0] - sims[1]).item()
    if gap <= NEAR_TIE[dtype]:
        return f"near-tie at pick {j} (float64 gap {gap:.1e})"
    return f"MISMATCH at pick {j}: {got[j]} vs {want[j]} (float64 gap {gap:.1e})"


# ----------------------------------------------------------------------------- cases


class Tally:
    def __init__(self):
        self.rows: dict[tuple[str, str], list[int]] = {}  # (op, comparison) -> [cases, ok, near-tie, fail]
        self.failures: list[str] = []

    def add(self, op: str, comparison: str, verdicts: list[str], case: str) -> None:
        row = self.rows.setdefault((op, comparison), [0, 0, 0, 0])
        row[0] += 1
        if all(v == "ok" for v in verdicts):
            row[1] += 1
        elif any(v.startswith(("MISMATCH", "ERROR")) for v in verdicts):
            row[3] += 1
            bad = next(v for v in verdicts if v.startswith(("MISMATCH", "ERROR")))
            self.failures.append(f"{op} [{comparison}] {case}: {bad}")
        else:
            row[2] += 1
            self.failures.append(f"{op} [{comparison}] {case}: {next(v for v in verdicts if v != 'ok')} (WARN)")

    @property
    def failed(self) -> int:
        return sum(r[3] for r in self.rows.values())


def run_cases(dev: torch.device, n_cases: int, max_n: int, max_d: int, seed: int, tally: Tally, deadline: float):
    """Random greedy / DART / DBDPC cases. ``dev`` is where the op under test runs (cuda or cpu)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    on_gpu = dev.type == "cuda"
    extra = references(on_gpu)  # comparison name -> device of the registered op
    for case in range(n_cases):
        if time.monotonic() > deadline:
            print(f"time budget reached after {case} cases", flush=True)
            break
        dtype = rng.choice([torch.float32, torch.float32, torch.float64])
        images = rng.choice([1, 1, 2, 3, 5])
        sizes = [rng.randint(1, max_n) for _ in range(images)]
        d = rng.choice([1, 3, 8, 64, 257, max_d])
        x = features(gen, sum(sizes), d, rng.choice([0, 0, 2, 10]), dtype)
        x64 = x.double()
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        k = rng.choice([1, min(sizes), rng.randint(1, min(sizes)), min(min(sizes), 64)])
        first = [rng.choice([-1, rng.randint(0, s - 1)]) for s in sizes]
        mode = rng.choice(["cosine", "l2", "maxsum"])
        desc = f"#{case} {mode} {str(dtype)[6:]} sizes={sizes} D={d} k={k} first={first}"
        xd = x.to(dev)
        try:
            got = native_greedy(xd, offsets, k, first, mode, UT["ops"])
            refs = {name: native_greedy(x.to(where), offsets, k, first, mode) for name, where in extra.items()}
            refs["vs pure torch, same device"] = pure_greedy(xd, offsets, k, first, mode)
        except Exception as exc:  # noqa: BLE001
            tally.add(f"greedy {mode}", "run", [f"ERROR {type(exc).__name__}: {exc}"[:300]], desc)
            continue
        ok_dev = got.device.type == dev.type and got.dtype == torch.int64 and tuple(got.shape) == (images, k)
        for name, want in refs.items():
            verdicts = ["ok" if ok_dev else f"MISMATCH: output {got.dtype} {tuple(got.shape)} on {got.device}"]
            verdicts += [
                compare_selection(got[b], want[b], x64[offsets[b] : offsets[b + 1]], mode, dtype) for b in range(images)
            ]
            tally.add(f"greedy {mode}", name, verdicts, desc)

        # DART per-pivot picks on the first image
        n = sizes[0]
        units = unit_rows(x[:n])
        p = rng.randint(1, min(8, n))
        pivots = units[torch.randperm(n, generator=gen)[:p]]
        excl = torch.randperm(n, generator=gen)[: rng.randint(0, min(4, n - 1))]
        free = n - excl.numel()
        counts = [rng.randint(0, max(0, free // p)) for _ in range(p)]
        ddesc = f"#{case} dart {str(dtype)[6:]} N={n} D={d} pivots={p} excluded={excl.numel()} counts={counts}"
        try:
            got = UT["ops"]["dart_pick"](units.to(dev), pivots.to(dev), excl.to(dev), counts)
            refs = {
                name: ops.dart_pick(units.to(where), pivots.to(where), excl.to(where), counts)
                for name, where in extra.items()
            }
            refs["vs pure torch, same device"] = pure_dart(units.to(dev), pivots.to(dev), excl.to(dev), counts)
            for name, want in refs.items():
                tally.add(
                    "dart_pick", name, [compare_dart(got, want, units.double(), pivots.double(), counts, dtype)], ddesc
                )
        except Exception as exc:  # noqa: BLE001
            tally.add("dart_pick", "run", [f"ERROR {type(exc).__name__}: {exc}"[:300]], ddesc)

        # DBDPC on a precomputed distance matrix (comparisons only: must be exact)
        if n >= 2:
            dist, rank = pact._distances(x[:n], 2.0)
            cutoff = rng.choice([0.0, 0.21, 0.5, 0.9, 1.0, 2.5])
            cdesc = f"#{case} dbdpc {str(dtype)[6:]} N={n} D={d} cutoff={cutoff}"
            try:
                got = UT["ops"]["dbdpc"](dist.to(dev), rank.to(dev), cutoff)
                refs = {name: ops.dbdpc(dist.to(where), rank.to(where), cutoff) for name, where in extra.items()}
                refs["vs pure torch, same device"] = pact._dbdpc_torch(dist.to(dev), rank.to(dev), cutoff)
                for name, want in refs.items():
                    same = torch.equal(got.cpu(), want.cpu())
                    tally.add(
                        "dbdpc",
                        name,
                        ["ok" if same else f"MISMATCH: {(got.cpu() != want.cpu()).sum().item()} labels differ"],
                        cdesc,
                    )
            except Exception as exc:  # noqa: BLE001
                tally.add("dbdpc", "run", [f"ERROR {type(exc).__name__}: {exc}"[:300]], cdesc)


def fixed_cases(dev: torch.device, smoke: bool, tally: Tally) -> None:
    """LLaVA-sized cells (576 / 2880 tokens, 1024 / 4096 wide, batches) and an all-duplicates image."""
    cells = (
        [(2, 40, 16, 5)]
        if smoke
        else [(1, 576, 4096, 64), (8, 576, 4096, 64), (1, 2880, 1024, 288), (2, 2880, 4096, 64), (4, 576, 1024, 576)]
    )
    gen = torch.Generator().manual_seed(1234)
    for images, n, d, k in cells:
        x = features(gen, images * n, d, 8, torch.float32)
        offsets = [i * n for i in range(images + 1)]
        for mode in ("cosine", "l2", "maxsum"):
            for first in ([-1] * images, [3] * images):
                desc = f"fixed {mode} batch={images} N={n} D={d} k={k} first={first[0]}"
                got = native_greedy(x.to(dev), offsets, k, first, mode, UT["ops"])
                want = (
                    native_greedy(x, offsets, k, first, mode)
                    if dev.type == "cuda" and kernels.available()["cpp"]
                    else pure_greedy(x.to(dev), offsets, k, first, mode)
                )
                verdicts = [
                    compare_selection(got[b], want[b], x[offsets[b] : offsets[b + 1]].double(), mode, torch.float32)
                    for b in range(images)
                ]
                tally.add(f"greedy {mode}", "fixed LLaVA-sized cells", verdicts, desc)
    same = torch.ones(50, 7).to(dev)
    got = UT["ops"]["kcenter"](same, [0, 50], 50, [-1], "cosine")[0].tolist()
    tally.add(
        "greedy cosine",
        "all-duplicate rows -> 0..N-1",
        ["ok" if got == list(range(50)) else f"MISMATCH: {got[:8]}..."],
        "50 identical rows",
    )


def opchecks(dev: torch.device, tally: Tally) -> None:
    gen = torch.Generator().manual_seed(7)
    x = features(gen, 30, 7, 4, torch.float32).to(dev)
    units = unit_rows(x)
    dist, rank = pact._distances(x, 2.0)
    checks = {
        "kcenter": (ops.kcenter, (x, [0, 12, 30], 5, [-1, 3], "cosine")),
        "maxsum": (ops.maxsum, (x.double(), [0, 30], 9, [2])),
        "dart_pick": (ops.dart_pick, (units, units[:3], torch.tensor([0, 4], device=dev), [2, 0, 5])),
        "dbdpc": (ops.dbdpc, (dist, rank, 0.5)),
    }
    for name, (op, args) in checks.items():
        try:
            torch.library.opcheck(op, args)
            tally.add(name, f"torch.library.opcheck on {dev.type}", ["ok"], "opcheck")
        except Exception as exc:  # noqa: BLE001
            tally.add(
                name, f"torch.library.opcheck on {dev.type}", [f"ERROR {type(exc).__name__}: {exc}"[:300]], "opcheck"
            )


REGISTRATION_CHECK = """
import torch, vtprune.functional as F
from vtprune import kernels
from vtprune.functional import _common, diversity, pact
state = kernels.available()
assert state["nvrtc"], f"NVRTC kernels not registered: {state}"
ops, dev = torch.ops.vtprune, torch.device("cuda")
x = torch.randn(30, 7, device=dev)
units = _common.unit_rows(x)
dist, rank = pact._distances(x, 2.0)
torch.library.opcheck(ops.kcenter, (x, [0, 12, 30], 5, [-1, 3], "cosine"))
torch.library.opcheck(ops.maxsum, (x.double(), [0, 30], 9, [2]))
torch.library.opcheck(ops.dart_pick, (units, units[:3], torch.tensor([0, 4], device=dev), [2, 0, 5]))
torch.library.opcheck(ops.dbdpc, (dist, rank, 0.5))
got = F.kcenter_select(x, 6)
assert got.device.type == "cuda" and torch.equal(got.cpu(), diversity._kcenter_torch(x.cpu(), 6, None, "cosine"))
print("registered:", state)
"""


def registration_check(tally: Tally) -> None:
    """NVRTC as the registered CUDA implementation, in a fresh process with ``VTPRUNE_KERNELS=nvrtc``."""
    env = dict(os.environ, VTPRUNE_KERNELS="nvrtc")
    env.pop("VTPRUNE_NO_EXT", None)
    r = subprocess.run(
        [sys.executable, "-c", REGISTRATION_CHECK], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    text = (r.stdout + r.stderr).strip()
    print(text, flush=True)
    lines = text.splitlines() or [""]
    verdict = "ok" if r.returncode == 0 else f"ERROR: {lines[-1][:280]}"
    tally.add("all ops", "torch.ops + opcheck + functional (VTPRUNE_KERNELS=nvrtc)", [verdict], "registration")


# ----------------------------------------------------------------------------- timing


def _time_ms(fn, repeats: int, dev: torch.device) -> float:
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return common.median(times)


def timing(dev: torch.device, smoke: bool, repeats: int) -> tuple[list[str], list[dict]]:
    """The op under test beside the other back ends on ``dev``: LLaVA-sized cells, median ms per call."""
    state = kernels.available()
    backends = {}
    if dev.type == "cuda":
        if state["cuda"]:
            backends["CUDA extension"] = {
                "kcenter": ops.kcenter,
                "maxsum": ops.maxsum,
                "dart_pick": ops.dart_pick,
                "dbdpc": ops.dbdpc,
            }
        if UT["name"] == "nvrtc":
            backends["NVRTC"] = UT["ops"]
    elif state["cpp"]:
        backends["C++ op"] = {
            "kcenter": ops.kcenter,
            "maxsum": ops.maxsum,
            "dart_pick": ops.dart_pick,
            "dbdpc": ops.dbdpc,
        }
    pure = {
        "kcenter": lambda x, o, k, f, m: pure_greedy(x, o, k, f, m),
        "maxsum": lambda x, o, k, f: pure_greedy(x, o, k, f, "maxsum"),
        "dart_pick": pure_dart,
        "dbdpc": pact._dbdpc_torch,
    }
    backends["pure torch"] = pure
    gen = torch.Generator().manual_seed(99)
    greedy = [(1, 40, 16, 8)] if smoke else [(1, 576, 4096, 64), (8, 576, 4096, 64), (1, 2880, 1024, 288)]
    cells = []
    for images, n, d, k in greedy:
        x = features(gen, images * n, d, 0, torch.float32).to(dev)
        offsets = [i * n for i in range(images + 1)]
        first = [-1] * images
        cells.append((f"kcenter cosine batch={images} N={n} D={d} k={k}", "kcenter", (x, offsets, k, first, "cosine")))
        cells.append((f"maxsum batch={images} N={n} D={d} k={k}", "maxsum", (x, offsets, k, first)))
    n, d = (40, 16) if smoke else (576, 4096)
    units = unit_rows(features(gen, n, d, 0, torch.float32)).to(dev)
    cells.append(
        (f"dart_pick N={n} D={d} pivots=8", "dart_pick", (units, units[:8], torch.arange(8, device=dev), [8] * 8))
    )
    for n in [40] if smoke else [576, 2880]:
        dist, rank = pact._distances(features(gen, n, 64, 0, torch.float32), 2.0)
        cells.append((f"dbdpc N={n} cutoff=0.5", "dbdpc", (dist.to(dev), rank.to(dev), 0.5)))
    names = list(backends)
    sync = ", CUDA-synchronised" if dev.type == "cuda" else ""
    lines = [
        "",
        f"## Timing on {dev.type.upper()} (median of {repeats} calls, ms{sync})",
        "",
        "| cell | " + " | ".join(names) + " |",
        "|:--|" + "--:|" * len(names),
    ]
    rows = []
    for desc, op, args in cells:
        row = {"cell": desc}
        for name in names:
            try:
                row[name] = round(_time_ms(lambda fn=backends[name][op], a=args: fn(*a), repeats, dev), 3)
            except Exception as exc:  # noqa: BLE001
                row[name] = f"error: {common.short_error(exc, 80)}"
        rows.append(row)
        cols = [f"{row[n]:.3f}" if isinstance(row[n], float) else str(row[n]) for n in names]
        lines.append(f"| {desc} | " + " | ".join(cols) + " |")
    print("\n".join(lines), flush=True)
    return lines, rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--device",
        default="auto",
        help="cuda (CUDA op vs CPU op and vs torch on the GPU), cpu (C++ op vs torch), auto (default: cuda if visible)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes, few cases (a CPU test that the script works)")
    p.add_argument(
        "--impl",
        choices=("ext", "nvrtc"),
        default="ext",
        help="op under test on the GPU: the registered torch.ops (ext, default) or the NVRTC kernels (nvrtc)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed calls per cell (default 7; 2 with --smoke)")
    p.add_argument("--cases", type=int, default=None, help="random cases (default 150; 12 with --smoke)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=100.0, help="stop drawing random cases after this many seconds")
    p.add_argument("--out", default=None, help="write the Markdown report here (and a .json beside it)")
    args = p.parse_args(argv)
    dev = common.pick_device(args.device)
    t0 = time.monotonic()
    state = kernels.available()
    UT.clear()
    compile_s = None
    if args.impl == "nvrtc":
        if dev.type != "cuda":
            common.summary(
                "FAIL: --impl nvrtc needs a CUDA device (tests/functional/test_nvrtc.py compiles the sources on a CPU)"
            )
            return 1
        from vtprune.kernels import nvrtc

        t = time.monotonic()
        why = nvrtc.probe()  # compiles (or reads the cache) and loads the modules on this GPU
        compile_s = time.monotonic() - t
        if why is not None:
            common.summary(f"FAIL: NVRTC kernels do not load here: {why}")
            return 1
        UT.update(name="nvrtc", ops=nvrtc.ops())
    else:
        need = "cuda" if dev.type == "cuda" else "cpp"
        if not state[need]:
            common.summary(f"FAIL: the native {need} ops are not loaded ({state}); build them first (VTPRUNE_CUDA=1)")
            return 1
        UT.update(
            name="ext",
            ops={"kcenter": ops.kcenter, "maxsum": ops.maxsum, "dart_pick": ops.dart_pick, "dbdpc": ops.dbdpc},
        )
    n_cases = args.cases if args.cases is not None else (12 if args.smoke else 150)
    max_n, max_d = (24, 16) if args.smoke else (1500, 1024)
    tally = Tally()
    if dev.type == "cuda":
        torch.cuda.manual_seed_all(args.seed)
    if UT["name"] == "nvrtc":
        registration_check(tally)
    else:
        opchecks(dev, tally)
    fixed_cases(dev, args.smoke, tally)
    run_cases(dev, n_cases, max_n, max_d, args.seed, tally, deadline=t0 + args.budget_s)
    time_lines, time_rows = timing(dev, args.smoke, args.repeats or (2 if args.smoke else 7))
    elapsed = time.monotonic() - t0

    info = common.machine(dev)
    under = ("NVRTC op" if UT["name"] == "nvrtc" else "CUDA op") if dev.type == "cuda" else "C++ (CPU) op"
    nvrtc_line = []
    if compile_s is not None:
        from vtprune.kernels import nvrtc

        arch = next(iter(nvrtc._devices.values()))
        nvrtc_line = [
            f"NVRTC {'.'.join(map(str, nvrtc.nvrtc_version()))}: {arch.kind} for {arch.arch}, compiled or read from "
            f"the cache ({nvrtc.cache_dir()}) and loaded in {compile_s:.1f} s.",
            "",
        ]
    lines = [
        f"# Native ops on {dev.type.upper()}: {under} vs reference",
        "",
        *common.provenance_lines(info, common.command_line()),
        "",
        *nvrtc_line,
        f"Random inputs (seed {args.seed}; up to {max_n} tokens per image, D up to {max_d}, duplicated rows, "
        "float32 / float64) plus LLaVA-sized cells. ok = identical indices; near-tie = the paths part where the "
        "two picks' objectives agree within rounding (float64 gap <= 1e-4 float32 / 1e-9 float64); FAIL = any "
        f"other difference or an error. {elapsed:.0f} s.",
        "",
        "| op | comparison | cases | ok | near-tie | FAIL |",
        "|:--|:--|--:|--:|--:|--:|",
    ]
    for (op, comp), (n, ok, tie, fail) in sorted(tally.rows.items()):
        lines.append(f"| {op} | {comp} | {n} | {ok} | {tie} | {fail} |")
    lines += time_lines
    if tally.failures:
        lines += ["", "Differences (first 40):", ""] + [f"- {f}" for f in tally.failures[:40]]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    total = sum(r[0] for r in tally.rows.values())
    ties = sum(r[2] for r in tally.rows.values())
    common.write_outputs(
        args.out,
        text,
        {
            "machine": info,
            "rows": [
                {"op": op, "comparison": c, "cases": r[0], "ok": r[1], "near_tie": r[2], "fail": r[3]}
                for (op, c), r in sorted(tally.rows.items())
            ],
            "differences": tally.failures,
            "impl": UT["name"],
            "nvrtc_load_s": compile_s,
            "timing": time_rows,
        },
    )
    verdict = "PASS" if tally.failed == 0 else "FAIL"
    common.summary(
        f"{verdict}: {total} comparisons on {dev.type}, {tally.failed} failed, {ties} near-ties ({elapsed:.0f} s)"
    )
    return 0 if tally.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
