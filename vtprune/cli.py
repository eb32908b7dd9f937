"""The ``vtprune`` command line: ``vtprune <command> [options]``.

Commands so far:

* ``demo`` — a tiny random-weight LLaVA-1.5 model, every registered method at a few token budgets: visual tokens
  kept, analytic prefill FLOPs and measured prefill latency (``vtprune.demo``).

The CLI only parses arguments and prints: the work lives in the library (``vtprune.demo``, later the harness).
To add a command, write ``_add_<name>(subparsers)`` (which registers its parser and sets ``func`` to a
``_cmd_<name>(args) -> int``) and list it in ``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

__all__ = ["main", "build_parser", "format_table"]


# -- helpers -------------------------------------------------------------------------------------------------------
def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints such as 64,16,4, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 1 such as 64,16,4, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A Markdown table (pipes, padded columns). ``align``: one of ``l``/``r`` per column (default: first left,
    the rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else (":" + "-" * (w + 1)) for w, a in zip(widths, align))
    return "\n".join([line(cells[0]), rule + "|"] + [line(r) for r in cells[1:]])


# -- demo ------------------------------------------------------------------------------------------------------------
DEMO_HEADERS = ("method", "budget", "visual tokens kept", "prefill GFLOPs", "FLOPs ratio", "prefill ms", "speed-up")


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="prune a tiny random-weight LLaVA with every method: tokens kept, FLOPs, latency",
        description="Build a tiny random-weight LLaVA-1.5-architecture model (CLIP 224/14: 256 visual tokens, "
        "4-layer Llama LM), run one image + prompt through every registered method at each budget (keep=N) and "
        "print visual tokens kept, analytic prefill FLOPs and measured prefill time (median of interleaved "
        "repeats) against the unpatched model.",
    )
    p.add_argument("--budgets", type=_positive_ints, default=[64, 16, 4], metavar="N,N,...",
                   help="visual tokens kept per image, comma-separated (default: 64,16,4)")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="torch intra-op threads while timing (default: leave torch's setting)")
    p.add_argument("--repeats", type=_positive_int, default=5, metavar="N",
                   help="timed prefill runs per variant; the median is reported (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default: 0)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from .demo import run_demo
    from .timing import num_threads

    with num_threads(args.threads):
        import torch

        threads = torch.get_num_threads()
        rows = run_demo(budgets=args.budgets, repeats=args.repeats, seed=args.seed)
    table, skipped = [], []
    for r in rows:
        if r.skipped is not None:
            skipped.append(f"skipped {r.method}: {r.skipped}")
            continue
        table.append((
            r.method,
            "-" if r.budget is None else r.budget,
            f"{r.visual_tokens_kept}/{r.visual_tokens_in}",
            f"{r.gflops:.3f}",
            f"{r.flops_ratio:.3f}",
            f"{r.prefill_ms:.1f}",
            f"{r.speedup:.2f}x",
        ))
    print(f"vtprune demo: random-weight LLaVA-1.5 (CLIP 224/14, Llama 256x4), 1 image, {threads} thread(s), "
          f"prefill = median of {args.repeats} interleaved runs, logits_to_keep=1")
    print(format_table(DEMO_HEADERS, table))
    for line in skipped:
        print(line)
    return 0


# -- entry point -----------------------------------------------------------------------------------------------------
#: every subcommand: a function that adds its parser to the subparsers (and sets ``func``)
_COMMANDS: tuple[Callable, ...] = (_add_demo,)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vtprune", description="Training-free visual-token pruning for Hugging Face VLMs."
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"vtprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: ``vtprune <command> ...``. Returns the exit status; argparse errors exit with 2."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
