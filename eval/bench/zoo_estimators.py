"""ZOO-Prune estimators: which is the cheapest whose kept sets stay within the literal estimator's own seed spread.

The literal estimator (the paper's central difference, ``2 m`` projector passes per token) is random: its ``m``
directions come from a seeded generator. Its kept sets change with the seed; that spread is the accuracy any
cheaper estimator needs. For each image and seed, this script computes the kept sets of

* ``literal`` (``estimator="literal"``, m = 64, h = 0.01),
* ``jvp`` (the exact ``h -> 0`` limit on the same directions),
* ``jvp`` with ``sketch=r`` (a seeded Johnson-Lindenstrauss projection of each directional derivative to r dims),

and reports (a) the literal spread: mean over seed pairs of the fraction of kept tokens that differ between the
literal estimator at two seeds, (b) each estimator's distance to the literal estimator at the same seed, (c) each
estimator's time for one image (sensitivity + selection, median). Projector: LLaVA-1.5-7B widths (Linear 1024 ->
4096, GELU, Linear 4096 -> 4096), random weights (``nn.Linear`` default init, seeded per image); inputs: 576
Gaussian tokens per image (``N(0, 1)``, seeded per image).

    PYTHONPATH=. .venv/bin/python eval/bench/zoo_estimators.py --threads 1 --images 2 --seeds 3 --keep 64,192 \
        --out eval/results/zoo_estimators.md
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time

import torch
from torch import nn

from vtprune import functional as F
from vtprune.methods.zoo import ZOOConfig, ZOOPrune
from vtprune.timing import median_ms, num_threads, provenance

SKETCHES = (512, 256, 128, 64)
DIRECTIONS = (32, 16)


def estimators() -> list[tuple[str, dict]]:
    return (
        [("jvp", {"estimator": "jvp"})]
        + [(f"jvp m={m}", {"estimator": "jvp", "num_directions": m}) for m in DIRECTIONS]
        + [(f"jvp sketch={r}", {"estimator": "jvp", "sketch": r}) for r in SKETCHES]
    )


def sensitivity(projector, x, z, seed: int, options: dict) -> torch.Tensor:
    """The zoo method's sensitivity on one image (its own direction bank and sketch for ``seed``)."""
    cfg = ZOOConfig(keep=1, seed=seed, **options)
    method = ZOOPrune(cfg)
    dirs, sketch = method.random_bank(x.shape[1], z.shape[1], x.device)
    with torch.no_grad():
        if cfg.estimator == "literal":
            s = F.zoo_sensitivity(projector, x, dirs, cfg.h, cfg.chunk_size)
        else:
            s = F.zoo_sensitivity_jvp(projector, x, dirs, cfg.chunk_size, sketch)
    return s


def kept_set(s: torch.Tensor, z: torch.Tensor, k: int) -> set[int]:
    return set(F.zoo_select(s, z, k).tolist())


def differ(a: set[int], b: set[int]) -> float:
    return 1.0 - len(a & b) / len(a)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--keep", default="64,192")
    p.add_argument("--tokens", type=int, default=576)
    p.add_argument("--width", type=int, default=1024, help="projector input width (LLaVA-1.5: 1024)")
    p.add_argument("--hidden", type=int, default=4096, help="projector hidden / output width (7B: 4096)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    keeps = [int(v) for v in args.keep.split(",")]
    command = "PYTHONPATH=. python eval/bench/zoo_estimators.py " + " ".join(
        argv if argv is not None else os.sys.argv[1:]
    )
    start = time.perf_counter()
    names = ["literal"] + [n for n, _ in estimators()]
    dist = {(n, k): [] for n in names[1:] for k in keeps}
    spread = {k: [] for k in keeps}
    cost = {n: [] for n in names}
    with num_threads(args.threads):
        for image in range(args.images):
            torch.manual_seed(1000 + image)
            projector = nn.Sequential(
                nn.Linear(args.width, args.hidden), nn.GELU(), nn.Linear(args.hidden, args.hidden)
            ).eval()
            x = torch.randn(args.tokens, args.width, generator=torch.Generator().manual_seed(2000 + image))
            with torch.no_grad():
                z = projector(x)
            lit = [sensitivity(projector, x, z, s, {"estimator": "literal"}) for s in range(args.seeds)]
            est = {name: [sensitivity(projector, x, z, s, o) for s in range(args.seeds)] for name, o in estimators()}
            for k in keeps:
                literal = [kept_set(s, z, k) for s in lit]
                spread[k] += [differ(literal[a], literal[b]) for a, b in itertools.combinations(range(args.seeds), 2)]
                for name in est:
                    dist[(name, k)] += [differ(kept_set(s, z, k), literal[i]) for i, s in enumerate(est[name])]
            if image == 0:
                for name, options in [("literal", {"estimator": "literal"})] + estimators():
                    runs = (1, 0) if name == "literal" else (3, 1)  # the literal estimator: one timed run

                    def once(o=options, p=projector, x=x, z=z):
                        return kept_set(sensitivity(p, x, z, 0, o), z, keeps[0])

                    cost[name].append(median_ms(once, repeats=runs[0], warmup=runs[1]))
            print(f"image {image} done ({time.perf_counter() - start:.0f} s)", flush=True)
        threads = torch.get_num_threads()
    elapsed = time.perf_counter() - start
    lines, winner = [], {}
    for k in keeps:
        limit = statistics.mean(spread[k])
        lines.append(
            f"| literal (other seed) | {k} | {limit:.4f} | {max(spread[k]):.4f} | "
            f"{cost['literal'][0]:.0f} | reference |"
        )
        for name in names[1:]:
            d = statistics.mean(dist[(name, k)])
            ok = d <= limit
            lines.append(
                f"| {name} | {k} | {d:.4f} | {max(dist[(name, k)]):.4f} | {cost[name][0]:.0f} | "
                f"{'yes' if ok else 'no'} |"
            )
            winner.setdefault(k, [])
            if ok:
                winner[k].append(name)
    chosen = [n for n in names[1:] if all(n in winner[k] for k in keeps)]
    cheapest = min(chosen, key=lambda n: cost[n][0]) if chosen else None
    table = "\n".join(
        [
            "| estimator | keep | kept tokens differing from literal (mean) | max | ms per image (keep="
            f"{keeps[0]}) | within the literal spread |",
            "|:--|--:|--:|--:|--:|:--|",
            *lines,
        ]
    )
    verdict = (
        f"Cheapest estimator within the literal estimator's seed spread at every budget: **{cheapest}**."
        if cheapest
        else "No cheaper estimator stays within the literal estimator's seed spread."
    )
    setup = (
        f"{args.images} random-weight projectors {args.width} -> {args.hidden} -> {args.hidden} (Linear, GELU, "
        f"Linear), {args.tokens} Gaussian tokens each; {args.seeds} seeds of the direction bank (m = 64, h = "
        "0.01); 'kept tokens differing' = 1 - |A ∩ B| / k. Literal row: between the literal estimator at two "
        "seeds (mean over seed pairs); other rows: the estimator vs the literal estimator at the same seed."
    )
    print(setup + "\n\n" + table + "\n\n" + verdict)
    if args.out:
        meta = "\n".join(provenance(command, str(threads)) + [f"- wall time of the run: {elapsed:.0f} s"])
        with open(args.out, "w") as f:
            f.write(
                f"# ZOO-Prune estimators vs the literal estimator's own spread\n\n{setup}\n\n{meta}\n\n{table}\n\n"
                f"{verdict}\n"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
