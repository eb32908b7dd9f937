"""Real-width prefill timing on a GPU: a random-weight model of LLaVA-1.5-7B's exact shapes (CLIP ViT-L/14 at 336 px:
1024 wide x 24 layers, 576 patches + CLS, layer -2; 2-layer GELU projector; Llama 4096 wide x 32 layers, 32 heads,
intermediate 11008, vocabulary 32064), built from configs directly on the GPU in bf16, no download.

One prompt: BOS + 4 text tokens, 576 image tokens, 35 text tokens (616), repeated per batch row. Variants: the
unpatched model, then every method of ``vtprune.list_methods(host="vlm", modality="image")`` at ``keep`` = 64 / 128 /
192 visual tokens.
Each
variant first runs once untimed (its stats, analytic FLOPs ratio, selection time and peak memory are read there;
a method that fails reports its error on its row and is left out of the timing), then all variants are timed in
interleaved rounds (each variant once per round, order reversed every other round; ``vtprune.timing``, which reads the
clock after CUDA synchronises) around each prefill (``logits_to_keep=1``, no grad, SDPA), the patch entered and left
outside the timed region; medians
reported. The report is rewritten after each batch size, so a stage killed by its time limit keeps what it had.

    VTPRUNE_CUDA=1 python eval/gpu/prefill_7b.py --out eval/results/gpu/prefill_7b.md     # on a GPU (~1-2 min)
    python eval/gpu/prefill_7b.py --device cpu --smoke                                     # CPU: tiny shapes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback

import common
import torch

import vtprune
from vtprune import timing
from vtprune.latency import IMAGE_TOKEN_ID, VOCAB_SIZE, build_random_llava

REAL = dict(
    image_size=336,
    patch_size=14,
    vision_hidden=1024,
    vision_intermediate=4096,
    vision_layers=24,
    vision_heads=16,
    text_hidden=4096,
    text_intermediate=11008,
    text_layers=32,
    text_heads=32,
    text_before=5,
    text_after=35,
)
SMOKE = dict(
    image_size=112,
    patch_size=14,
    vision_hidden=64,
    vision_intermediate=128,
    vision_layers=2,
    vision_heads=4,
    text_hidden=128,
    text_intermediate=256,
    text_layers=6,
    text_heads=4,
    text_before=5,
    text_after=11,
)


def build(shape: dict, device, dtype, attn: str, seed: int):
    """Random-weight LLaVA-1.5 of ``shape`` (:func:`vtprune.latency.build_random_llava`), created on ``device`` in
    ``dtype`` (no fp32 copy on the host): the model, the prompt's ids ``[1, S]``, its image and its image tokens."""
    model, inputs = build_random_llava(**shape, seed=seed, dtype=dtype, device=device, attn=attn)
    ids = inputs["input_ids"].cpu()
    return model, ids, inputs["pixel_values"].cpu(), int((ids == IMAGE_TOKEN_ID).sum())


def inputs_for(ids, pixels, batch: int, device, dtype) -> dict:
    ids = ids.repeat(batch, 1).to(device)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixels.repeat(batch, 1, 1, 1).to(device=device, dtype=dtype),
    }


def prefill(model, inputs):
    with torch.no_grad():
        return model(**inputs, logits_to_keep=1)


def peak_run(model, inputs, device):
    """One untimed prefill: (logits, peak memory GiB or None)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    out = prefill(model, inputs).logits
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return out, peak


def run_batch(model, inputs, n_visual, budgets, methods, device, repeats, warmup) -> list[dict]:
    """Check pass + interleaved timing of every variant for one batch size; rows in variant order."""
    rows = []
    out, peak = peak_run(model, inputs, device)
    rows.append(
        {
            "variant": "unpatched",
            "method": None,
            "keep": n_visual,
            "stage": "-",
            "kept": n_visual,
            "flops_ratio": 1.0,
            "select_ms": None,
            "peak_gib": peak,
            "status": "ok",
            "finite": bool(torch.isfinite(out).all()),
        }
    )
    variants, contexts = {"unpatched": lambda: prefill(model, inputs)}, {}
    for method in methods:
        # cdpruner's default on this CLIP tower is the paper's text="clip", which needs a CLIP checkpoint the
        # random model has no text tower for: its text="llm" variant is timed
        options = {"text": "llm"} if method == "cdpruner" else {}
        for keep in budgets:
            name = f"{method} keep={keep}"
            row = {"variant": name, "method": method, "keep": keep, "status": "ok"}
            try:
                with vtprune.patched(model, method, keep=keep, **options):
                    out, row["peak_gib"] = peak_run(model, inputs, device)
                    st = vtprune.stats(model)
                row.update(
                    stage=st.stage + (f" (layer {st.layer})" if st.layer is not None else ""),
                    kept=st.visual_tokens_kept[0],
                    flops_ratio=st.flops_ratio,
                    select_ms=st.select_ms,
                    finite=bool(torch.isfinite(out).all()),
                )
                if not row["finite"]:
                    row["status"] = "non-finite logits"
            except Exception as exc:  # noqa: BLE001  (report the method, time the others)
                row["status"] = "FAIL: " + common.short_error(exc)
                row["traceback"] = traceback.format_exc(limit=6)
                if vtprune.is_patched(model):
                    vtprune.unpatch(model)
                print(f"  {name}: {row['status']}", flush=True)
                rows.append(row)
                continue
            variants[name] = variants["unpatched"]
            contexts[name] = lambda m=method, k=keep, o=options: vtprune.patched(model, m, keep=k, **o)
            rows.append(row)
    print(f"  timing {len(variants)} variants x {repeats} rounds ...", flush=True)
    times = timing.interleaved_times_ms(variants, repeats=repeats, warmup=warmup, contexts=contexts)
    base = statistics.median(times["unpatched"])
    for row in rows:
        t = sorted(times.get(row["variant"], []))
        if not t:
            continue
        q = statistics.quantiles(t, n=4, method="inclusive") if len(t) > 1 else [t[0], t[0], t[0]]
        row.update(ms=statistics.median(t), p25=q[0], p75=q[2], speedup=base / statistics.median(t), times=t)
    return rows


def table(rows) -> list[str]:
    lines = [
        "| variant | stage | visual tokens to LLM | prefill ms (median) | p25–p75 ms | speed-up | analytic FLOPs "
        "ratio | select ms | peak GiB | status |",
        "|:--|:--|--:|--:|--:|--:|--:|--:|--:|:--|",
    ]
    f = lambda v, s: "-" if v is None else format(v, s)
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r.get('stage', '-')} | {r.get('kept', '-')} | {f(r.get('ms'), '.2f')} | "
            f"{f(r.get('p25'), '.2f')}–{f(r.get('p75'), '.2f')} | "
            f"{f(r.get('speedup'), '.2f')}{'x' if r.get('speedup') else ''} | {f(r.get('flops_ratio'), '.3f')} | "
            f"{f(r.get('select_ms'), '.2f')} | {f(r.get('peak_gib'), '.1f')} | "
            f"{r['status'].replace('|', '/')} |"
        )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(common.DTYPES))
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--keep", default=None, help="comma-separated budgets (default 64,128,192; --smoke 8,16,24)")
    p.add_argument("--batch", default=None, help="comma-separated batch sizes (default 1,8; --smoke 1,2)")
    p.add_argument(
        "--methods", default=None, help="comma-separated (default: vtprune.list_methods(host='vlm', modality='image'))"
    )
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10; --smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per variant first (default 2; --smoke 1)")
    p.add_argument(
        "--budget-s", type=float, default=240.0, help="start no further batch size once this many seconds have passed"
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes, fp32-friendly, few repeats (CPU test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev, dtype = common.pick_device(args.device), common.DTYPES[args.dtype]
    shape = SMOKE if args.smoke else REAL
    budgets = [int(b) for b in (args.keep or ("8,16,24" if args.smoke else "64,128,192")).split(",")]
    batches = [int(b) for b in (args.batch or ("1,2" if args.smoke else "1,8")).split(",")]
    methods = args.methods.split(",") if args.methods else vtprune.list_methods(host="vlm", modality="image")
    repeats = args.repeats if args.repeats is not None else (2 if args.smoke else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    if args.attn == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            common.summary("FAIL: --attn flash_attention_2 but the flash_attn package is not importable")
            return 1
    t0 = time.monotonic()
    command = common.command_line()
    info = common.machine(dev)

    model, ids, pixels, n_visual = build(shape, dev, dtype, args.attn, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    built_s = time.monotonic() - t0
    print(f"built {n_params / 1e9:.2f} B parameters on {dev} in {built_s:.0f} s", flush=True)
    seq = ids.shape[1]
    setup = (
        f"Random-weight LLaVA-1.5 shapes: CLIP tower {shape['image_size']} px / patch {shape['patch_size']} "
        f"({n_visual} patches + CLS), {shape['vision_hidden']} wide x {shape['vision_layers']} layers; Llama LM "
        f"{shape['text_hidden']} wide x {shape['text_layers']} layers ({shape['text_heads']} heads, intermediate "
        f"{shape['text_intermediate']}, vocabulary {VOCAB_SIZE}); {n_params / 1e9:.2f} B parameters, "
        f"{str(dtype)[6:]}, attn_implementation={args.attn}. Prompt: {n_visual} visual + {seq - n_visual} text "
        "tokens per row, rows identical. Prefill = "
        f"one forward with `logits_to_keep=1`, no grad; "
        + ("CUDA-event time" if dev.type == "cuda" else "host-clock time")
        + f", median of {repeats} interleaved rounds after {warmup} warm-up run(s) per variant; the patch is "
        "entered and left outside the timed region. speed-up = unpatched median / variant median. select ms: "
        "`PruneStats.select_ms` of the untimed check run; peak GiB: `torch.cuda.max_memory_allocated` in it."
    )
    sections, data, failed, timed = [], [], set(), 0
    text = ""
    for batch in batches:
        if time.monotonic() - t0 > args.budget_s:
            sections.append(f"## batch {batch}\n\nnot run: the {args.budget_s:.0f} s budget was spent.\n")
            continue
        print(f"batch {batch}:", flush=True)
        inputs = inputs_for(ids, pixels, batch, dev, dtype)
        try:
            rows = run_batch(model, inputs, n_visual, budgets, methods, dev, repeats, warmup)
        except Exception as exc:  # noqa: BLE001  (e.g. out of memory at a large batch)
            msg = common.short_error(exc)
            sections.append(f"## batch {batch}\n\nFAILED: {msg}\n")
            data.append({"batch": batch, "error": msg, "traceback": traceback.format_exc(limit=8)})
            failed.add(f"batch {batch}")
            continue
        timed += 1
        failed |= {r["method"] for r in rows if r["status"] != "ok"}
        data.append({"batch": batch, "rows": rows})
        sections.append(f"## batch {batch}\n\n" + "\n".join(table(rows)) + "\n")
        elapsed = time.monotonic() - t0
        text = "\n".join(
            [
                "# Prefill at LLaVA-1.5-7B width: every method at "
                + "/".join(map(str, budgets))
                + " tokens vs unpatched"
                if not args.smoke
                else "# Prefill timing (smoke: tiny shapes)",
                "",
                *common.provenance_lines(info, command),
                "",
                setup,
                f"Model built in {built_s:.0f} s; whole run {elapsed:.0f} s.",
                "",
                *sections,
            ]
        )
        common.write_outputs(
            args.out,
            text,
            {
                "machine": info,
                "command": command,
                "shape": shape,
                "dtype": str(dtype),
                "attn": args.attn,
                "batches": data,
            },
        )
        for r in rows:
            print(f"  {r['variant']:22s} {r.get('ms', float('nan')):9.2f} ms  {r['status']}", flush=True)
    elapsed = time.monotonic() - t0
    verdict = "PASS" if timed == len(batches) and not failed else "FAIL" if timed == 0 else "PARTIAL"
    fails = f"; failed: {', '.join(sorted(map(str, failed)))}" if failed else ""
    best = ""
    for entry in data:  # first batch size timed: best and worst speed-up at the smallest budget
        cells = sorted(
            (r["speedup"], r["method"])
            for r in entry.get("rows", [])
            if r.get("method") and r.get("speedup") and r["keep"] == budgets[0]
        )
        if cells:
            best = (
                f"; batch {entry['batch']} keep={budgets[0]}: best {cells[-1][1]} {cells[-1][0]:.2f}x, "
                f"worst {cells[0][1]} {cells[0][0]:.2f}x"
            )
            break
    common.summary(
        f"{verdict}: {len(methods)} methods x {budgets} at batch {batches} on "
        f"{info['device'].split(' (')[0]}{fails}{best} ({elapsed:.0f} s)"
    )
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
