"""Accuracy x FLOPs x images/s of the token-reduction methods inside the bundled tiny ViT (``models/tiny-vit-shapes``).

For the unreduced model and each method of ``vtprune.list_vit_methods()`` at each ``--ratios`` budget (the share of
the patch tokens that reach the last block): top-1 accuracy on the first ``--images`` scenes of the shapes
classification test split, analytic GFLOPs per image (``vtprune.flops.vit_flops`` on the per-block token counts of
the run: patch embedding + blocks), and images/s of a forward on a batch of ``--batch`` images
(``torch.utils.benchmark.Timer.blocked_autorange``, median). Writes ``OUT.md`` (table + the exact command),
``OUT.json`` and ``OUT.png`` (accuracy against GFLOPs).

    python eval/bench_vit.py --out eval/results/vit/tiny_vit_shapes
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.utils.benchmark as benchmark

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "eval"))

import train_tiny_vit as T  # noqa: E402

import vtprune  # noqa: E402
from vtprune.flops import vit_flops  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "tiny-vit-shapes"))
    p.add_argument("--out", default=str(ROOT / "eval" / "results" / "vit" / "tiny_vit_shapes"))
    p.add_argument("--methods", nargs="*", default=None, help="default: every ViT method")
    p.add_argument("--ratios", nargs="*", type=float, default=[0.75, 0.5, 0.25, 0.1])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--variants",
        nargs="*",
        default=[],
        metavar="METHOD:OPTION=VALUE",
        help="extra table rows (not plotted): a method with one option changed, at every ratio",
    )
    p.add_argument("--min-run-time", type=float, default=3.0, help="seconds of timing per row")
    return p.parse_args(argv)


def measure(model, x, y, xb, args, label):
    t0 = time.perf_counter()
    acc = T.accuracy(model, x, y)
    with torch.no_grad():
        model(xb[:1])
        stats = vtprune.stats(model) if vtprune.is_patched(model) else None
        flops = stats.flops if stats is not None else vit_flops(model)
        last = stats.patch_tokens_last if stats is not None else model.patch_embed.num_patches
        timer = benchmark.Timer(stmt="model(xb)", globals={"model": model, "xb": xb}, num_threads=args.threads)
        m = timer.blocked_autorange(min_run_time=args.min_run_time)
    row = {
        "method": label[0],
        "ratio": label[1],
        "accuracy": acc,
        "gflops": flops / 1e9,
        "patch_tokens_last_block": last,
        "images_per_s": args.batch / m.median,
        "block_tokens": stats.block_tokens if stats is not None else None,
    }
    print(
        f"{label[0]:>10} {label[1]!s:>5} acc {acc:.4f} gflops {row['gflops']:.4f} last {last:4d} "
        f"img/s {row['images_per_s']:.1f} ({time.perf_counter() - t0:.0f}s)",
        flush=True,
    )
    return row


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, config = T.load(args.model)
    x, y = T.test_set(args.images, T.S.DEFAULT_SEED, config["timm_kwargs"]["img_size"])
    xb = x[: args.batch]
    methods = args.methods or vtprune.list_vit_methods()
    rows = [measure(model, x, y, xb, args, ("none", 1.0))]
    for method in methods:
        for ratio in args.ratios:
            with vtprune.patched(model, method, ratio=ratio):
                rows.append(measure(model, x, y, xb, args, (method, ratio)))
    for variant in args.variants:
        method, _, option = variant.partition(":")
        key, _, value = option.partition("=")
        for ratio in args.ratios:
            with vtprune.patched(model, method, ratio=ratio, **{key: json.loads(value)}):
                rows.append(measure(model, x, y, xb, args, (f"{method} ({key}={value})", ratio)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(
        [str(Path(sys.argv[0]).relative_to(ROOT)) if Path(sys.argv[0]).is_absolute() else sys.argv[0]] + sys.argv[1:]
    )
    meta = {
        "command": command,
        "model": str(Path(args.model).resolve()).replace(str(ROOT) + "/", ""),
        "test_images": args.images,
        "batch": args.batch,
        "threads": args.threads,
        "torch": torch.__version__,
        "timm": __import__("timm").__version__,
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    (out.with_suffix(".json")).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [
        f"# Token reduction inside the bundled tiny ViT ({meta['model']})",
        "",
        f"Command: `{command}` ({meta['date']}; torch {meta['torch']}, timm {meta['timm']}, "
        f"{args.threads} CPU threads on a shared 2-core machine: images/s is noisy, compare within a run).",
        "",
        f"Accuracy: top-1 on the first {args.images} scenes of the shapes classification test split (18 classes: "
        "the colour and shape of the single object). GFLOPs per image: analytic (`vtprune.flops.vit_flops`, "
        "patch embedding + blocks, the methods' own similarity / attention-row products not counted). "
        f"images/s: forward of a batch of {args.batch}, median of `torch.utils.benchmark`. `ratio`: share of "
        "the patch tokens that reach the last block.",
        "",
        "| method | ratio | patch tokens at last block | accuracy | GFLOPs / image | images/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['ratio']:g} | {r['patch_tokens_last_block']} | {r['accuracy']:.3f} | "
            f"{r['gflops']:.4f} | {r['images_per_s']:.0f} |"
        )
    (out.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    base = rows[0]
    for method in methods:
        pts = [base] + [r for r in rows if r["method"] == method]  # variants have other names: not plotted
        ax.plot([p["gflops"] for p in pts], [p["accuracy"] for p in pts], marker="o", label=method)
    ax.scatter([base["gflops"]], [base["accuracy"]], color="black", zorder=5, label="unreduced")
    ax.set_xlabel("GFLOPs / image (analytic)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title("tiny ViT on shapes: token reduction inside the ViT")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.md')}, .json, .png")


if __name__ == "__main__":
    main()
