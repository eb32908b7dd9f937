"""The model contract on a GPU in bf16, per attention implementation (SDPA, FlashAttention-2 where importable):

* keep-all == unpatched: ``vtprune.patched(model, m, ratio=1.0)`` gives the unpatched last-position logits within
  bf16 tolerance (bit-identical is reported too) and the same greedy tokens;
* batch == rows alone: a left-padded batch of rows with different prompts and images, ``ratio=0.3``, gives per row
  the kept-token count, the selection and the logits (within bf16 tolerance) of that row run alone, and the same
  greedy tokens (``generate`` with KV cache).

Every registered method x every tiny model family of tests/tiny.py (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL),
widened (LM 256 wide, CLIP 128 wide) unless ``--smoke``. Random weights, built from configs. Each (method, family)
is reported on its own line; a crash is that line's FAIL, never the end of the run. In bf16 two rows can part on
a near-tie of scores: a different selection with equal counts, or different greedy tokens (where the unpatched
model's rows agree), is a WARN. The noise floor is the unpatched model's own batch-vs-alone difference, shown per
family.

    VTPRUNE_CUDA=1 python eval/gpu/contract.py --out eval/results/gpu/contract.md      # on a GPU
    python eval/gpu/contract.py --device cpu --smoke                                    # CPU: tiny, 2 families
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import traceback

import common
import torch

sys.path.insert(0, os.path.join(common.ROOT, "tests"))
import tiny

import vtprune

ROWS_SAME = [(5, 1, 4), (2, 1, 9)]  # keep-all check rows (text before, images, text after)
ROWS_BATCH = {"llava_next": [(3, 1, 4), (2, 1, 9)]}  # batch-vs-alone rows per family (default below)
ROWS_BATCH_DEFAULT = [(3, 1, 4), (9, 2, 2), (2, 1, 12)]
WIDE_TEXT = dict(hidden_size=256, intermediate_size=512, num_attention_heads=16, num_key_value_heads=8)  # head 16
WIDE_CLIP = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8)
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4, torch.float64: 1e-8}


def attn_available(attn: str, device: torch.device) -> str | None:
    """None if ``attn`` can run here, else why not."""
    if attn == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if device.type != "cuda":
            return "needs a CUDA device"
        if not is_flash_attn_2_available():
            return "the flash_attn package (FlashAttention-2) is not installed (PyPI has no wheel of it)"
    return None


def to_device(inputs: dict, device, dtype) -> dict:
    return {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}


def last_logits(model, inputs) -> torch.Tensor:
    if "mm_token_type_ids" not in inputs and "position_ids" not in inputs:
        # positions from the mask, as generate() numbers them (tests/engine/test_patch.py does the same)
        mask = inputs["attention_mask"]
        inputs = dict(inputs, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        return model(**inputs).logits[:, -1].float()


def generate(model, inputs, n: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False)[:, -n:]


def widen(model, seed: int):
    """The same family rebuilt wider (LM 256 wide, 16 heads of 16 so Qwen's M-RoPE sections still fit, 8 KV
    heads; CLIP 128 wide; Qwen's vision merger out at the LM width), random weights again."""
    cfg = copy.deepcopy(model.config)
    text, vision = cfg.text_config, cfg.vision_config
    for key, value in WIDE_TEXT.items():
        setattr(text, key, value)
    if hasattr(text, "head_dim"):
        text.head_dim = WIDE_TEXT["hidden_size"] // WIDE_TEXT["num_attention_heads"]
    if cfg.model_type.startswith("llava"):
        for key, value in WIDE_CLIP.items():
            setattr(vision, key, value)
    elif hasattr(vision, "out_hidden_size"):  # Qwen2.5-VL: merger output
        vision.out_hidden_size = text.hidden_size
    else:  # Qwen2-VL: the merger outputs vision_config.hidden_size
        vision.hidden_size = text.hidden_size
    torch.manual_seed(seed)
    return tiny._finish(type(model)(cfg))


def build(family: str, attn: str, wide: bool, device, dtype, seed: int):
    """Tiny model of ``family`` and its inputs (built on the CPU in fp32, then moved; attention set last, as
    make_inputs may run the vision tower on the CPU)."""
    model = tiny.build(family, seed=seed, attn="sdpa")
    if wide:
        model = widen(model, seed)
    same = tiny.make_inputs(model, family, ROWS_SAME, seed=seed)
    batch, singles = tiny.split_rows(model, family, ROWS_BATCH.get(family, ROWS_BATCH_DEFAULT), seed=seed + 1)
    model = model.to(device=device, dtype=dtype)
    for cfg in (model.config, model.config.text_config, model.config.vision_config):
        cfg._attn_implementation = attn  # as tiny.build sets it
    mv = lambda d: to_device(d, device, dtype)
    return model, mv(same), mv(batch), [mv(s) for s in singles]


def check_method(model, method, same, batch, singles, ref, tol, new_tokens) -> dict:
    """Run both checks for one method; returns the report row (``status`` PASS / WARN / FAIL / skip)."""
    row = {"method": method, "status": "PASS", "notes": []}
    # cdpruner's default on CLIP towers (text="clip") needs a CLIP text tower the VLM checkpoints lack
    options = {"text": "llm"} if method == "cdpruner" else {}
    spec = vtprune.registry.get_method(method)
    row["stage"] = spec.method_cls.stage

    def warn(msg):
        row["notes"].append(msg)
        if row["status"] == "PASS":
            row["status"] = "WARN"

    def fail(msg):
        row["notes"].append(msg)
        row["status"] = "FAIL"

    try:
        vtprune.patch(model, method, ratio=1.0, **options)
    except ValueError as err:
        return dict(row, status="skip", notes=[f"not supported here: {common.short_error(err, 120)}"])
    except Exception as exc:  # noqa: BLE001
        return dict(
            row, status="FAIL", notes=[f"patch: {common.short_error(exc)}"], traceback=traceback.format_exc(limit=6)
        )
    step = "keep-all"
    try:
        try:
            logits = last_logits(model, same)
            st = vtprune.stats(model)
            row["keep_all_rel"] = common.rel_err(logits, ref["same_logits"])
            row["keep_all_bitwise"] = bool(torch.equal(logits, ref["same_logits"]))
            if row["keep_all_rel"] > tol:
                fail(f"keep-all logits differ from unpatched: rel {row['keep_all_rel']:.1e} > {tol:.0e}")
            if st is not None and st.visual_tokens_kept != st.visual_tokens_in:
                fail(f"keep-all kept {st.visual_tokens_kept} of {st.visual_tokens_in}")
            step = "keep-all generate"
            row["keep_all_tokens"] = bool(torch.equal(generate(model, same, new_tokens), ref["same_tokens"]))
            if not row["keep_all_tokens"]:
                warn("keep-all greedy tokens differ from unpatched")
        finally:
            vtprune.unpatch(model)

        step = "batch (ratio=0.3)"
        with vtprune.patched(model, method, ratio=0.3, **options):
            logits = last_logits(model, batch)
            st = vtprune.stats(model)
            kept, sel = list(st.visual_tokens_kept), [k.cpu() for k in st.kept_indices]
            row["kept"] = kept
            step = "batch generate"
            tokens = generate(model, batch, new_tokens)
            rels, same_sel, same_tok = [], [], []
            for i, one in enumerate(singles):
                step = f"row {i} alone"
                alone = last_logits(model, one)[0]
                st1 = vtprune.stats(model)
                if st1.visual_tokens_kept != [kept[i]]:
                    fail(f"row {i}: kept {kept[i]} in the batch, {st1.visual_tokens_kept[0]} alone")
                same_sel.append(
                    len(sel) > i and len(st1.kept_indices) == 1 and torch.equal(sel[i], st1.kept_indices[0].cpu())
                )
                rels.append(common.rel_err(logits[i], alone))
                step = f"row {i} alone generate"
                same_tok.append(bool(torch.equal(generate(model, one, new_tokens)[0], tokens[i])))
        row["batch_rel"] = max(rels)
        row["same_selection"] = f"{sum(same_sel)}/{len(same_sel)}"
        row["same_tokens"] = f"{sum(same_tok)}/{len(same_tok)}"
        limit = max(tol, 3 * ref["noise"])
        for i, (r, s) in enumerate(zip(rels, same_sel)):
            if s and r > limit:
                fail(f"row {i}: same selection but logits differ from the row alone (rel {r:.1e} > {limit:.0e})")
        if not all(same_sel):
            warn(f"selection differs from the row alone in {len(same_sel) - sum(same_sel)} row(s) (bf16 near-ties?)")
        if not all(same_tok) and ref["tokens_agree"]:  # else the unpatched model's rows disagree too (bf16)
            warn(f"greedy tokens differ from the row alone in {len(same_tok) - sum(same_tok)} row(s)")
    except Exception as exc:  # noqa: BLE001  (report and go on with the next method)
        fail(f"{step}: {common.short_error(exc)}")
        row["traceback"] = traceback.format_exc(limit=6)
        if vtprune.is_patched(model):
            vtprune.unpatch(model)
    return row


def reference(model, same, batch, singles, new_tokens) -> dict:
    ref = {"same_logits": last_logits(model, same), "same_tokens": generate(model, same, new_tokens)}
    logits = last_logits(model, batch)
    ref["noise"] = max(common.rel_err(logits[i], last_logits(model, one)[0]) for i, one in enumerate(singles))
    tokens = generate(model, batch, new_tokens)
    agree = [bool(torch.equal(generate(model, one, new_tokens)[0], tokens[i])) for i, one in enumerate(singles)]
    ref["same_tokens_rows"] = f"{sum(agree)}/{len(agree)}"
    ref["tokens_agree"] = all(agree)
    return ref


def fmt(v, spec=".1e"):
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(common.DTYPES))
    p.add_argument("--attn", default="sdpa,flash_attention_2", help="comma-separated attn_implementation values")
    p.add_argument(
        "--families", default=None, help=f"comma-separated, of {tiny.FAMILIES} (default: all; --smoke: llava,qwen2_vl)"
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated (default: vtprune.list_methods(host='vlm', modality='image'); --smoke: random,fastv,cls)",
    )
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--smoke", action="store_true", help="the tests' tiny widths, two families (CPU test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev, dtype = common.pick_device(args.device), common.DTYPES[args.dtype]
    families = args.families.split(",") if args.families else (["llava", "qwen2_vl"] if args.smoke else tiny.FAMILIES)
    methods = (
        args.methods.split(",")
        if args.methods
        else [m for m in ("random", "fastv", "cls") if m in vtprune.list_methods(host="vlm", modality="image")]
        if args.smoke
        else vtprune.list_methods(host="vlm", modality="image")
    )
    tol = TOL[dtype]
    t0 = time.monotonic()

    sections, data, counts = [], [], {"PASS": 0, "WARN": 0, "FAIL": 0, "skip": 0}
    for attn in args.attn.split(","):
        why = attn_available(attn, dev)
        if why:
            sections.append(f"## attn_implementation={attn}\n\nnot run: {why}.\n")
            data.append({"attn": attn, "unavailable": why})
            print(f"[{attn}] unavailable: {why}", flush=True)
            continue
        lines = [
            f"## attn_implementation={attn}",
            "",
            "| family | method | stage | keep-all rel (bitwise) | batch vs alone rel (unpatched noise) | kept per row "
            "| same selection | same tokens | status | notes |",
            "|:--|:--|:--|--:|--:|:--|:-:|:-:|:-:|:--|",
        ]
        for family in families:
            try:
                model, same, batch, singles = build(family, attn, not args.smoke, dev, dtype, args.seed)
                ref = reference(model, same, batch, singles, args.new_tokens)
            except Exception as exc:  # noqa: BLE001
                msg = common.short_error(exc)
                lines.append(f"| {family} | (unpatched) | | | | | | | FAIL | {msg} |")
                data.append(
                    {
                        "attn": attn,
                        "family": family,
                        "status": "FAIL",
                        "notes": [msg],
                        "traceback": traceback.format_exc(limit=6),
                    }
                )
                counts["FAIL"] += 1
                print(f"[{attn}] {family}: model/reference failed: {msg}", flush=True)
                continue
            lines.append(
                f"| {family} | (unpatched) | | | ({ref['noise']:.1e}) | | | {ref['same_tokens_rows']} | ref "
                "| the unpatched model's own batch-vs-alone difference |"
            )
            data.append(
                {
                    "attn": attn,
                    "family": family,
                    "method": None,
                    "noise": ref["noise"],
                    "same_tokens": ref["same_tokens_rows"],
                }
            )
            for method in methods:
                row = check_method(model, method, same, batch, singles, ref, tol, args.new_tokens)
                counts[row["status"]] += 1
                row.update(attn=attn, family=family, noise=ref["noise"])
                data.append(row)
                bitwise = "" if "keep_all_bitwise" not in row else (" (=)" if row["keep_all_bitwise"] else " (≠)")
                lines.append(
                    f"| {family} | {method} | {row.get('stage', '')} | {fmt(row.get('keep_all_rel'))}{bitwise} "
                    f"| {fmt(row.get('batch_rel'))} ({ref['noise']:.1e}) | {fmt(row.get('kept'))} "
                    f"| {row.get('same_selection', '-')} | {row.get('same_tokens', '-')} | {row['status']} "
                    f"| {'; '.join(row['notes']).replace('|', '/')} |"
                )
                print(f"[{attn}] {family:11s} {method:10s} {row['status']:4s} {'; '.join(row['notes'])}", flush=True)
            del model
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        sections.append("\n".join(lines) + "\n")
    elapsed = time.monotonic() - t0

    info = common.machine(dev)
    width = (
        "tests/tiny.py widths"
        if args.smoke
        else (
            f"LM {WIDE_TEXT['hidden_size']} wide (16 heads, 8 KV heads) x 4 layers, "
            f"CLIP {WIDE_CLIP['hidden_size']} wide"
        )
    )
    head = "\n".join(
        [
            f"# Model contract on {dev.type.upper()} in {str(dtype)[6:]}",
            "",
            *common.provenance_lines(info, common.command_line()),
            "",
            f"Tiny random-weight models ({width}); families {', '.join(families)}. keep-all: `ratio=1.0` vs unpatched, "
            f"rows {ROWS_SAME}; batch vs alone: `ratio=0.3`, left-padded rows {ROWS_BATCH_DEFAULT} "
            f"(LLaVA-NeXT {ROWS_BATCH['llava_next']}), each row also run alone; {args.new_tokens} greedy tokens. "
            f"rel = ||a - b|| / ||b|| of last-position logits; FAIL above {tol:.0e} (batch: or 3x the unpatched "
            "noise). (=) bit-identical, (≠) not. "
            f"Totals: {counts['PASS']} PASS, {counts['WARN']} WARN, {counts['FAIL']} FAIL, {counts['skip']} skipped "
            f"(method not supported on that family). {elapsed:.0f} s.",
        ]
    )
    text = head + "\n\n" + "\n".join(sections)
    print(text, flush=True)
    common.write_outputs(args.out, text, {"machine": info, "dtype": str(dtype), "rows": data})
    ran = [s for s in args.attn.split(",") if not attn_available(s, dev)]
    verdict = "PASS" if counts["FAIL"] == 0 else "FAIL"
    common.summary(
        f"{verdict}: attn {','.join(ran) or 'none'} in {str(dtype)[6:]} on {dev.type}: {counts['PASS']} pass, "
        f"{counts['WARN']} warn, {counts['FAIL']} fail, {counts['skip']} skipped"
        + "".join(f"; {a} not run" for a in args.attn.split(",") if a not in ran)
        + f" ({elapsed:.0f} s)"
    )
    return 0 if counts["FAIL"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
