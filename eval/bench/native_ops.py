"""Native ops vs pure torch: wall time of vtprune's selection kernels on random features.

Grid: N in {576, 2880, 11520} tokens, D in {1024, 4096}, k in {64, 10% of N}, batch in {1, 8} images, greedy k-center
(cosine) with a given first pick (the greedy steps, which the native op fuses). Extra rows: DivPrune's first pick
(``first=None``, a blocked matmul that both paths share), max-sum, DART's per-pivot picks and DBDPC (PACT).
Native = one ``torch.ops.vtprune`` call per batch; pure torch = the functional code under ``VTPRUNE_NO_EXT``
semantics, one call per image. Variants are interleaved and the median of the repeats is reported; every cell
also checks that both paths return identical indices.

    python eval/bench/native_ops.py --threads 1 --out eval/results/kernels.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from vtprune import kernels
from vtprune.functional import dart, diversity, pact
from vtprune.functional._common import unit_rows
from vtprune.timing import cpu_model

DEVICE = torch.device("cpu")  # set by --device


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn) -> tuple[float, object]:
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync()
    return (time.perf_counter() - start) * 1e3, out


def _compare(native, torch_fn, repeats: int) -> tuple[float, float, bool]:
    """Median ms of each variant (interleaved) and whether the outputs are equal."""
    tn, tt, same = [], [], True
    for _ in range(repeats):
        a, out_n = _timed(native)
        b, out_t = _timed(torch_fn)
        tn.append(a)
        tt.append(b)
        same = same and torch.equal(out_n, out_t)
    return statistics.median(tn), statistics.median(tt), same


def _repeats(work: float) -> int:
    """Fewer repeats for huge cells (work ~ multiply-adds of the pure-torch path)."""
    return 5 if work < 2e9 else 3 if work < 2e10 else 1


def greedy_cells(args):
    rows = []
    for n in (576, 2880, 11520):
        for d in (1024, 4096):
            for k in (64, n // 10):
                for batch in (1, 8):
                    work = batch * n * d * k
                    if work > args.max_work:
                        rows.append((n, d, k, batch, None))
                        continue
                    g = torch.Generator().manual_seed(n + d + k + batch)
                    x = torch.randn(batch * n, d, generator=g).to(DEVICE)
                    offsets = [i * n for i in range(batch + 1)]
                    first = [0] * batch
                    native = lambda: torch.ops.vtprune.kcenter(x, offsets, k, first, "cosine")  # noqa: E731
                    pure = (
                        lambda: torch.stack(
                            [  # noqa: E731
                                diversity._kcenter_torch(x[i * n : (i + 1) * n], k, 0, "cosine") for i in range(batch)
                            ]
                        )
                    )
                    rows.append((n, d, k, batch, _compare(native, pure, _repeats(work))))
                    print(rows[-1], flush=True)
    return rows


def extra_cells():
    rows = []
    for n, d in ((576, 4096), (2880, 4096)):
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, d, generator=g).to(DEVICE)
        k = 64
        reps = _repeats(n * n * d)
        rows.append(
            (
                "kcenter, first=None (DivPrune)",
                n,
                d,
                k,
                _compare(
                    lambda: torch.ops.vtprune.kcenter(x, [0, n], k, [-1], "cosine")[0],
                    lambda: diversity._kcenter_torch(x, k, None, "cosine"),
                    reps,
                ),
            )
        )
        rows.append(
            (
                "maxsum, first=None",
                n,
                d,
                k,
                _compare(
                    lambda: torch.ops.vtprune.maxsum(x, [0, n], k, [-1])[0],
                    lambda: diversity._maxsum_torch(x, k, None),
                    reps,
                ),
            )
        )
        units = unit_rows(x)
        pivots = units[:8]
        excluded = torch.arange(4, device=DEVICE)
        counts = [(k - 4) // 8] * 8

        rows.append(
            (
                "dart per-pivot picks (8 pivots)",
                n,
                d,
                k,
                _compare(
                    lambda: torch.ops.vtprune.dart_pick(units, pivots, excluded, counts),
                    lambda: dart.dart_pick_torch(units, pivots, excluded, counts),
                    5,
                ),
            )
        )
        keys = torch.randn(n, 128, generator=g).to(DEVICE)  # one head's worth of key features
        dist, rank = pact._distances(keys, pact.PACT_DC)
        rows.append(
            (
                "dbdpc centres + labels, cutoff 0.9",
                n,
                128,
                None,
                _compare(
                    lambda: torch.ops.vtprune.dbdpc(dist, rank, 0.9), lambda: pact._dbdpc_torch(dist, rank, 0.9), 3
                ),
            )
        )
        print(rows[-4:], flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the features live: the CPU (C++/OpenMP) or the CUDA kernels",
    )
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--max-work",
        type=float,
        default=6e10,
        help="skip grid cells whose batch*N*D*k exceeds this (pure torch would take minutes)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    state = kernels.available()
    needed = "cuda" if args.device == "cuda" else "cpp"
    if not state[needed]:
        raise SystemExit(
            f"the native {needed} ops are not available; build them first (pip install -e ., "
            "VTPRUNE_CUDA=1 for the CUDA kernels)"
        )
    grid = greedy_cells(args)
    extra = extra_cells()

    lines = [
        f"# Native ops vs pure torch ({'CUDA' if DEVICE.type == 'cuda' else 'CPU'})",
        "",
        f"Command: `python eval/bench/{' '.join(['kernels.py'] + sys.argv[1:])}`",
        "",
        f"Machine: {cpu_model()} ({os.cpu_count()} logical CPUs), torch {torch.__version__}, "
        f"{args.threads} thread(s); device: "
        + (torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU")
        + ". Variants are interleaved and medians reported (other jobs on the machine make absolute times noisy).",
        "",
        "Greedy k-center (cosine), first pick given: native = one `torch.ops.vtprune.kcenter` call for the batch, "
        "pure = `vtprune.functional` torch code per image. Identical = both returned the same indices.",
        "",
        "| N | D | k | batch | native ms | pure torch ms | speed-up | identical |",
        "|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for n, d, k, batch, res in grid:
        if res is None:
            lines.append(f"| {n} | {d} | {k} | {batch} | skipped | skipped | | |")
            continue
        tn, tt, same = res
        lines.append(
            f"| {n} | {d} | {k} | {batch} | {tn:.1f} | {tt:.1f} | {tt / tn:.2f}x | {'yes' if same else 'NO'} |"
        )
    lines += [
        "",
        f"Skipped: cells with batch x N x D x k > {args.max_work:.0e} (the pure-torch side alone would take minutes).",
        "",
        "Other ops, batch 1:",
        "",
        "| op | N | D | k | native ms | pure torch ms | speed-up | identical |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for name, n, d, k, (tn, tt, same) in extra:
        lines.append(
            f"| {name} | {n} | {d} | {k if k else '-'} | {tn:.1f} | {tt:.1f} | {tt / tn:.2f}x | "
            f"{'yes' if same else 'NO'} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
