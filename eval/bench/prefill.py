"""Prefill latency of a patched LLaVA-1.5-shaped model against the unpatched model and against the ideal.

A random-weight LLaVA (576 visual tokens: CLIP-shaped tower 336 px / patch 14 but narrow, 256 wide x 4 layers, so
the CPU time goes to the LM; Llama LM 1024 wide x 8 layers, intermediate 2816, 16 heads), 576 visual + 40 text
tokens, batch 1, fp32, no grad, ``logits_to_keep=1`` (as ``generate``'s prefill). Variants, timed in interleaved
rounds (every variant once per round, order reversed every other round, so drift hits all alike):

  a. ``unpatched``
  b. ``cls keep=576`` (keeps everything)                goal: within 3% of (a)
  c. ``cls keep=<keep>``
  d. ``ideal``: the unpatched vision tower + projector on the full image, then the unpatched model fed only the kept
     tokens (``inputs_embeds``, their original position ids, mask of ones) — the limit for (c)
                                                           goal: (c) within 10% of (d)
  e. every other registered method at ``keep=<keep>``, and a schedule (divprune keep=3*keep at the vision entry,
     then fastv keep=<keep> before layer 2) (informative)

    PYTHONPATH=. .venv/bin/python eval/bench/prefill.py --threads 1 --repeats 15 --out eval/results/prefill.md
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time

import torch

import vtprune
from vtprune.latency import build_random_llava, prefill
from vtprune.registry import get_method
from vtprune.timing import interleaved_times_ms, num_threads, provenance

GOAL_KEEP_ALL = 3.0  # % over unpatched allowed for keep-all
GOAL_IDEAL = 10.0  # % over the ideal allowed for the pruned model


def build(seed: int = 0):
    return build_random_llava(
        image_size=336,
        patch_size=14,
        vision_hidden=256,
        vision_intermediate=1024,
        vision_layers=4,
        vision_heads=4,
        text_hidden=1024,
        text_intermediate=2816,
        text_layers=8,
        text_heads=16,
        text_before=5,
        text_after=35,
        seed=seed,
    )


def ideal_variant(model, inputs, kept: torch.Tensor):
    """(d): what a pruned prefill cannot beat — the full vision tower + projector, then the unpatched model on the
    kept tokens only (their original positions). Returns the timed callable."""
    ids = inputs["input_ids"][0]
    image = (ids == model.config.image_token_id).nonzero().squeeze(1)
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[image] = False
    keep[image[kept]] = True
    positions = keep.nonzero().squeeze(1)
    ids_kept = ids[positions][None]
    slots = (ids_kept[0] == model.config.image_token_id).nonzero().squeeze(1)
    position_ids = positions[None]
    mask = torch.ones_like(ids_kept)
    pixel_values = inputs["pixel_values"]
    cfg = model.config

    def run():
        with torch.no_grad():
            feats = model.model.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            ).pooler_output[0]
            embeds = model.get_input_embeddings()(ids_kept)
            embeds[0, slots] = feats[kept].to(embeds.dtype)
            return model(inputs_embeds=embeds, position_ids=position_ids, attention_mask=mask, logits_to_keep=1)

    return run


def _command_line(argv) -> str:
    words = [os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable]
    words += sys.argv if argv is None else ["eval/bench/prefill.py", *argv]
    env = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} " if os.environ.get("PYTHONPATH") else ""
    return env + " ".join(shlex.quote(w) for w in words)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: stable numbers)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved timing rounds (default 15)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per variant first (default 2)")
    p.add_argument("--keep", type=int, default=64, help="visual tokens kept by the pruned variants (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the Markdown report to this path")
    args = p.parse_args(argv)
    command = _command_line(argv)

    with num_threads(args.threads):
        t_start = time.perf_counter()
        model, inputs = build(args.seed)
        n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
        seq = inputs["input_ids"].shape[1]
        run = lambda: prefill(model, inputs)  # noqa: E731

        variants, contexts, tokens, ratio, notes = (
            {"unpatched": run},
            {},
            {"unpatched": n_visual},
            {"unpatched": 1.0},
            [],
        )
        checks = []
        ref = prefill(model, inputs).logits

        def add_patched(name, method, keep=None):
            """``method``: a registered name (with ``keep``) or a schedule (a list of configs)."""
            options = {} if keep is None else {"keep": keep, **get_method(method).run_options}
            try:
                vtprune.patch(model, method, **options)
            except ValueError as err:
                notes.append(f"skipped {name}: {err}")
                return None
            try:
                out = prefill(model, inputs).logits
                st = vtprune.stats(model)
            finally:
                vtprune.unpatch(model)
            variants[name] = run
            contexts[name] = lambda: vtprune.patched(model, method, **options)
            tokens[name] = st.visual_tokens_kept[0]
            ratio[name] = st.flops_ratio
            return out, st

        keep_all = f"cls keep={n_visual} (keep-all)"
        pruned = f"cls keep={args.keep}"
        out_all, _ = add_patched(keep_all, "cls", n_visual)
        checks.append(f"keep-all logits bit-identical to unpatched: {torch.equal(out_all, ref)}")
        out_cls, st_cls = add_patched(pruned, "cls", args.keep)
        ideal = f"ideal for cls keep={args.keep} (vision + LM on kept tokens)"
        variants[ideal] = ideal_variant(model, inputs, st_cls.kept_indices[0])
        tokens[ideal], ratio[ideal] = args.keep, st_cls.flops_ratio
        out_ideal = variants[ideal]().logits
        diff = (out_ideal - out_cls).abs().max().item()
        checks.append(f"ideal logits vs cls keep={args.keep} logits: max |diff| = {diff:.2e}")
        for method in vtprune.list_methods(host="vlm", modality="image"):
            if method != "cls":
                add_patched(f"{method} keep={args.keep}", method, args.keep)
        first = min(3 * args.keep, n_visual)  # a schedule: divprune at the vision entry, then fastv before layer 2
        add_patched(
            f"divprune keep={first} + fastv keep={args.keep} (schedule)",
            [vtprune.DivPruneConfig(keep=first), vtprune.FastVConfig(keep=args.keep, layer=2)],
        )

        times = interleaved_times_ms(variants, repeats=args.repeats, warmup=args.warmup, contexts=contexts)
        elapsed = time.perf_counter() - t_start
        threads = torch.get_num_threads()

    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["unpatched"]
    rows = []
    for name in variants:
        t = sorted(times[name])
        q1, q3 = statistics.quantiles(t, n=4)[0::2] if len(t) > 1 else (t[0], t[0])
        rows.append(
            f"| {name} | {tokens[name]} | {med[name]:.1f} | {q1:.1f}–{q3:.1f} | {med[name] / base:.3f} "
            f"| {base / med[name]:.2f}x | {ratio[name]:.3f} |"
        )
    over_all = (med[keep_all] / base - 1) * 100
    over_ideal = (med[pruned] / med[ideal] - 1) * 100
    goals = [
        f"- (b) keep-all within {GOAL_KEEP_ALL:.0f}% of unpatched: "
        f"**{'PASS' if over_all <= GOAL_KEEP_ALL else 'FAIL'}** "
        f"({over_all:+.1f}%: {med[keep_all]:.1f} ms vs {base:.1f} ms)",
        f"- (c) cls keep={args.keep} within {GOAL_IDEAL:.0f}% of the ideal (d): "
        f"**{'PASS' if over_ideal <= GOAL_IDEAL else 'FAIL'}** ({over_ideal:+.1f}%: {med[pruned]:.1f} ms vs "
        f"{med[ideal]:.1f} ms)",
    ]
    table = "\n".join(
        [
            "| variant | visual tokens to LLM | prefill ms (median) | p25–p75 ms | vs unpatched (time) | speed-up "
            "| analytic FLOPs ratio |",
            "|:--|--:|--:|--:|--:|--:|--:|",
            *rows,
        ]
    )
    cfg = model.config
    setup = (
        f"Random-weight LLaVA-1.5 layout: CLIP tower {cfg.vision_config.image_size} px / patch "
        f"{cfg.vision_config.patch_size} ({n_visual} patches + CLS), {cfg.vision_config.hidden_size} wide x "
        f"{cfg.vision_config.num_hidden_layers} layers; Llama LM {cfg.text_config.hidden_size} wide x "
        f"{cfg.text_config.num_hidden_layers} layers (intermediate {cfg.text_config.intermediate_size}, "
        f"{cfg.text_config.num_attention_heads} heads); {n_visual} visual + {seq - n_visual} text tokens, batch 1, "
        f"fp32, SDPA, no grad, logits_to_keep=1. Median of {args.repeats} interleaved rounds after {args.warmup} "
        f"warm-up runs per variant."
    )
    body = "\n\n".join(
        [
            table,
            "Goals:\n" + "\n".join(goals),
            "Checks:\n"
            + "\n".join(f"- {c}" for c in checks)
            + ("\n" + "\n".join(f"- {n}" for n in notes) if notes else ""),
        ]
    )
    print(setup + "\n\n" + body)
    print(f"\n({elapsed:.0f} s)")
    if args.out:
        meta = "\n".join(provenance(command, str(threads)))
        with open(args.out, "w") as f:
            f.write(f"# Prefill latency: patched vs unpatched vs ideal\n\n{setup}\n\n{meta}\n\n{body}\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
