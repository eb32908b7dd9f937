"""The ``vtprune`` command line: ``vtprune <command> [options]``.

Commands:

* ``demo`` — the bundled tiny VLM (models/tiny-llava-shapes) with every method x budget on the synthetic shapes
  task, through the harness: accuracy / FLOPs / latency table and plot (``vtprune.harness.demo``);
* ``sweep`` / ``table`` / ``plot`` — evaluation sweeps through lmms-eval, paper-style tables, accuracy-vs-cost
  plots (``vtprune.harness``; needs the ``vtprune[eval]`` extra);
* ``calibrate`` — fit a model's positional attention trend for debiased pruning (``vtprune.calibration``);
* ``bench`` — a tiny random-weight LLaVA-1.5, every method at a few budgets: visual tokens kept, analytic prefill
  FLOPs and measured prefill latency (``vtprune.latency``);
* ``robustness`` — ranking stability under benign perturbations, the compression-aware attack, its transfer
  matrix and a defense, for every method on the bundled model (``vtprune.robustness``).

The CLI only parses arguments and prints: the work lives in the library. To add a command, write
``_add_<name>(subparsers)`` (which registers its parser and sets ``func`` to a ``_cmd_<name>(args) -> int``) and
list it in ``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from ._version import __version__
from .markdown import format_table

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


#: what bad input (a config, an option, a path, a file, a missing extra) raises in the library: ``main`` prints it as
#: one line ``vtprune <command>: error: ...`` and returns 2, like argparse errors. Any other exception is a bug and
#: keeps its traceback; ``--debug`` (or ``VTPRUNE_DEBUG=1``) shows the traceback of these too.
USER_ERRORS = (ValueError, TypeError, OSError, ImportError, NotImplementedError)


# -- demo ------------------------------------------------------------------------------------------------------------
def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="sweep every method x budget on the bundled tiny VLM: accuracy / FLOPs / latency table and plot",
        description="Run configs/sweeps/demo.yaml: the bundled models/tiny-llava-shapes (a LLaVA-architecture VLM "
        "trained on the synthetic shapes task) with every registered method at 25/11/5% of its 256 visual tokens "
        "plus the unpruned model, on eval/tasks/vtprune_shapes, through the lmms-eval harness. Prints the table "
        "and writes results.jsonl, table.md/.csv/.tex and the accuracy plots to runs/demo/; then "
        "configs/sweeps/demo_video.yaml: the bundled models/tiny-qwen2vl-video-shapes (a Qwen2-VL trained on the "
        "synthetic video task) with the video methods and image methods applied to videos at 25/15/10% of its 128 "
        "visual tokens, on eval/tasks/vtprune_video_shapes, written to runs/demo_video/.",
    )
    p.add_argument(
        "--limit",
        type=_positive_int,
        default=None,
        metavar="N",
        help="evaluate only the first N questions (default: the whole test split)",
    )
    p.add_argument(
        "--output-dir",
        default=None,
        metavar="DIR",
        help="default: runs/demo (untracked); the committed results are eval/results/demo",
    )
    p.add_argument(
        "--video-output-dir",
        default=None,
        metavar="DIR",
        help="default: runs/demo_video (untracked); the committed results are eval/results/demo_video",
    )
    p.add_argument(
        "--only",
        choices=("image", "video"),
        default=None,
        help="run only the image sweep (demo.yaml) or only the video sweep (demo_video.yaml); default: both",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from .harness.demo import DEMO_CONFIG, DEMO_VIDEO_CONFIG, missing_models, run_demo

    parts = [("image", DEMO_CONFIG, args.output_dir), ("video", DEMO_VIDEO_CONFIG, args.video_output_dir)]
    for part, config, output_dir in parts:
        if args.only not in (None, part):
            continue
        missing = missing_models(config)
        if missing:  # the video model is trained by eval/train_tiny_video.py; a checkout may not have it yet
            print(
                f"skipped the {part} demo: {', '.join(missing)} not found (train it with the script its README names)"
            )
            if args.only == part:
                return 1
            continue
        paths = run_demo(config, output_dir=output_dir, limit=args.limit, progress=not args.quiet)
        print(paths["md"].read_text(), end="")
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


# -- bench ------------------------------------------------------------------------------------------------------------
BENCH_HEADERS = ("method", "budget", "visual tokens kept", "prefill GFLOPs", "FLOPs ratio", "prefill ms", "speed-up")


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="prune a tiny random-weight LLaVA with every method: tokens kept, FLOPs, latency",
        description="Build a tiny random-weight LLaVA-1.5-architecture model (CLIP 224/14: 256 visual tokens, "
        "4-layer Llama LM), run one image + prompt through every registered method at each budget (keep=N) and "
        "print visual tokens kept, analytic prefill FLOPs and measured prefill time (median of interleaved "
        "repeats) against the unpatched model.",
    )
    p.add_argument(
        "--budgets",
        type=_positive_ints,
        default=[64, 16, 4],
        metavar="N,N,...",
        help="visual tokens kept per image, comma-separated (default: 64,16,4)",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="torch intra-op threads while timing (default: leave torch's setting)",
    )
    p.add_argument(
        "--repeats",
        type=_positive_int,
        default=5,
        metavar="N",
        help="timed prefill runs per variant; the median is reported (default: 5)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default: 0)")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    from .latency import run_latency
    from .timing import num_threads

    with num_threads(args.threads):
        import torch

        threads = torch.get_num_threads()
        rows = run_latency(budgets=args.budgets, repeats=args.repeats, seed=args.seed)
    table, skipped = [], []
    for r in rows:
        if r.skipped is not None:
            skipped.append(f"skipped {r.method}: {r.skipped}")
            continue
        table.append(
            (
                r.method,
                "-" if r.budget is None else r.budget,
                f"{r.visual_tokens_kept}/{r.visual_tokens_in}",
                f"{r.gflops:.3f}",
                f"{r.flops_ratio:.3f}",
                f"{r.prefill_ms:.1f}",
                f"{r.speedup:.2f}x",
            )
        )
    print(
        f"vtprune bench: random-weight LLaVA-1.5 (CLIP 224/14, Llama 256x4), 1 image, {threads} thread(s), "
        f"prefill = median of {args.repeats} interleaved runs, logits_to_keep=1"
    )
    print(format_table(BENCH_HEADERS, table))
    for line in skipped:
        print(line)
    return 0


# -- sweep / table / plot (vtprune.harness) ----------------------------------------------------------------------------
def _add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="run models x methods x budgets x tasks through lmms-eval into results.jsonl",
        description="Run every cell of a sweep config (models x methods x token budgets x lmms-eval tasks, plus "
        "each model's unpruned baseline) and append one row per cell to OUTPUT_DIR/results.jsonl. Cells already "
        "there are skipped, so an interrupted sweep resumes. Tasks, models and methods are checked before any "
        "model loads. Multi-GPU: accelerate launch -m vtprune.cli sweep CONFIG.",
    )
    p.add_argument("config", help="sweep config (YAML), e.g. configs/sweeps/smoke.yaml")
    p.add_argument(
        "--limit",
        type=_positive_int,
        default=None,
        metavar="N",
        help="evaluate only the first N documents of each task (quick runs; a separate cell)",
    )
    p.add_argument(
        "--output-dir",
        default=None,
        metavar="DIR",
        help="where results.jsonl goes (default: the config's output_dir, else runs/<config name>)",
    )
    p.add_argument(
        "--no-resume", action="store_true", help="start a fresh results.jsonl instead of skipping finished cells"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE (a module name, or a .py file) before the config is checked, so the methods "
        "it registers with @vtprune.register_method can be swept; repeatable. Installed packages' "
        "vtprune.methods entry points load by themselves",
    )
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args) -> int:
    from .harness import load_config, run_sweep
    from .registry import import_methods

    import_methods(args.imports)
    cfg = load_config(args.config)
    out = args.output_dir or cfg.output_dir
    rows = run_sweep(cfg, output_dir=out, limit=args.limit, resume=not args.no_resume, progress=not args.quiet)
    if rows:
        path = f"{out}/results.jsonl"
        print(f"vtprune sweep: {len(rows)} cells in {path}; next: vtprune table {path} && vtprune plot {path}")
    return 0


def _results_arg(p) -> None:
    p.add_argument("results", help="a results.jsonl written by `vtprune sweep` (or its folder)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: the results file's folder)")


def _load_results(args):
    from pathlib import Path

    from .harness import read_results

    rows = read_results(args.results)
    path = Path(args.results)
    return rows, Path(args.out) if args.out else (path if path.is_dir() else path.parent)


def _add_table(sub) -> None:
    p = sub.add_parser(
        "table",
        help="paper-style tables (Markdown, CSV, LaTeX) from sweep results",
        description="Rows method x budget (unpruned first), columns: each task's score, Avg (tasks on 0-100), "
        "Rel. % (mean of value / unpruned value), visual tokens, prefill TFLOPs and prefill ms per request. One "
        "table per model and limit. Writes table.md, table.csv, table.tex and prints the Markdown.",
    )
    _results_arg(p)
    p.set_defaults(func=_cmd_table)


def _cmd_table(args) -> int:
    from .harness import write_tables

    rows, out = _load_results(args)
    paths = write_tables(rows, out)
    print(paths["md"].read_text(), end="")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _add_plot(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="accuracy vs prefill FLOPs and vs visual tokens (PNG) from sweep results",
        description="Writes accuracy_vs_flops.png and accuracy_vs_tokens.png: one panel per model and limit, a "
        "line per method over its budgets, the unpruned model as a star.",
    )
    _results_arg(p)
    p.add_argument(
        "--y",
        choices=("avg", "rel"),
        default="avg",
        help="accuracy axis: Avg score (default) or Rel. %% of the unpruned model",
    )
    p.set_defaults(func=_cmd_plot)


def _cmd_plot(args) -> int:
    from .harness import plot_results

    rows, out = _load_results(args)
    paths = plot_results(rows, out, y=args.y)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


# -- calibrate -------------------------------------------------------------------------------------------------------
def _add_calibrate(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="fit the positional attention trend of a model for debiased pruning (fastv debias_weights=PATH)",
        description="Run a VLM on calibration images (one per prompt, the processor's chat template), record the "
        "attention of the last prompt token over the image tokens at layer K-1, fit its positional trend "
        "(cubic or exponential) and write a profile JSON for `debias_weights=PATH`.",
    )
    p.add_argument("model", help="local model folder or hub id (AutoModelForImageTextToText + AutoProcessor)")
    p.add_argument("images", nargs="+", help="calibration image files (one size per model: same token count)")
    p.add_argument("--layer", type=_positive_int, default=2, help="pruning layer K (default: 2, as FastV)")
    p.add_argument("--kind", choices=("cubic", "exp"), default="cubic", help="trend to fit (default: cubic)")
    p.add_argument("--prompt", default="Describe the image.", help="text after the image")
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(args) -> int:
    from .calibration import calibrate_files

    profile = calibrate_files(args.model, args.images, layer=args.layer, kind=args.kind, prompt=args.prompt)
    profile.save(args.out)
    coeffs = ", ".join(f"{c:.6g}" for c in profile.coefficients)
    print(
        f"fitted a {profile.kind} trend ({coeffs}) at layer {profile.layer} on {profile.images} image(s) -> {args.out}"
    )
    return 0


# -- robustness ------------------------------------------------------------------------------------------------------
def _add_robustness(sub) -> None:
    p = sub.add_parser(
        "robustness",
        help="ranking stability, compression-aware attack, transfer matrix and a defense for every method",
        description="Audit every registered method (configs/robustness.yaml: the bundled models/tiny-llava-shapes on "
        "eval/tasks/vtprune_shapes, keep 64/28/13): kept-set Jaccard and accuracy under benign perturbations, the "
        "compression-aware PGD attack through each method's importance signal (a documented surrogate where the "
        "selection is not differentiable), the transfer matrix of those perturbations, and the vote-over-"
        "augmentations defense with its selection time. Writes results.jsonl, table.md/.csv, transfer.csv and plots.",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="robustness config YAML (default: configs/robustness.yaml of the repository)",
    )
    p.add_argument(
        "--limit",
        type=_positive_int,
        default=None,
        metavar="N",
        help="audit only the first N questions (default: the config's limit)",
    )
    p.add_argument(
        "--output-dir",
        default="eval/results/robustness",
        metavar="DIR",
        help="where the results go (default: eval/results/robustness)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_robustness)


def _cmd_robustness(args) -> int:
    from .robustness import load_config, run_robustness

    cfg = load_config(args.config, limit=args.limit)
    run_robustness(cfg, output_dir=args.output_dir, progress=not args.quiet)
    from pathlib import Path

    out = Path(args.output_dir)
    print((out / "table.md").read_text(), end="")
    print(f"wrote {out / 'results.jsonl'}, {out / 'table.md'}, {out / 'table.csv'} and plots")
    return 0


# -- methods ---------------------------------------------------------------------------------------------------------
def _add_methods(sub) -> None:
    p = sub.add_parser(
        "methods",
        help="list every registered method with its host, stage, signals and options",
        description="Every registered method, read from the registry (vtprune.list_methods()): where it acts (host "
        "vlm: a VLM's visual tokens; vit: between the blocks of a vision transformer), its stage, whether it merges, "
        "the signals it reads, and its options with their defaults (besides the budget, keep= or ratio=).",
    )
    p.add_argument("--host", choices=("vlm", "vit"), default=None, help="only methods of this host")
    p.add_argument("--stage", choices=("vision", "llm", "tower"), default=None, help="only methods of this stage")
    p.set_defaults(func=_cmd_methods)


def _cmd_methods(args) -> int:
    from .registry import get_method, list_methods

    filters = {k: v for k, v in (("host", args.host), ("stage", args.stage)) if v is not None}
    rows = []
    for name in list_methods(**filters):
        spec = get_method(name)
        options = ", ".join(f"{k}={v!r}" for k, v in spec.options().items())
        rows.append(
            [
                name,
                spec.host,
                spec.stage,
                "yes" if spec.merges else "no",
                ", ".join(sorted(spec.signals)) or "-",
                options or "-",
            ]
        )
    print(format_table(["method", "host", "stage", "merges", "signals", "options (defaults)"], rows, align="llllll"))
    return 0


# -- entry point -----------------------------------------------------------------------------------------------------
#: every subcommand: a function that adds its parser to the subparsers (and sets ``func``)
_COMMANDS: tuple[Callable, ...] = (
    _add_demo,
    _add_sweep,
    _add_table,
    _add_plot,
    _add_calibrate,
    _add_bench,
    _add_robustness,
    _add_methods,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vtprune", description="Training-free visual-token pruning for Hugging Face VLMs."
    )

    parser.add_argument("--version", action="version", version=f"vtprune {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error instead of one line (also: VTPRUNE_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: ``vtprune <command> ...``. Returns the exit status; argparse errors exit with 2, and so
    does bad input to any command (:data:`USER_ERRORS`, printed as one line)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        if args.debug or os.environ.get("VTPRUNE_DEBUG", "") not in ("", "0"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__  # one line
        print(f"vtprune {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
