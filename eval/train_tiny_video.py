"""Train the bundled tiny video VLM (``models/tiny-qwen2vl-video-shapes``) from scratch on CPU.

A stock ``Qwen2VLForConditionalGeneration`` (16-pixel patches, merge size 1, one frame per temporal patch: 16 tokens per
64x64 frame, 128 per 8-frame video; vision 2 layers x 64, LM 3 layers x 128) learns the synthetic video task of
``vtprune/video_shapes.py`` (task ``eval/tasks/vtprune_video_shapes``). One stage, every parameter trained:

* loss on the answer word and the ``<|im_end|>`` after it (cross-entropy), fresh videos every step;
* a dense auxiliary loss on the merger's output (what the LLM reads): per merged token, through training-only linear
  heads, the colour (or background) and the shape of the object in that grid cell (``video_shapes.cell_targets``).
  The heads are not saved: the checkpoint is a plain Qwen2-VL.

AdamW, linear warm-up then cosine decay; stops at ``--steps`` or ``--max-minutes``, whichever comes first; then
evaluates on the test split through ``AutoProcessor`` + ``generate`` and writes the model card data
(``training_info.json``, ``training_log.txt``).

    python eval/train_tiny_video.py --out models/tiny-qwen2vl-video-shapes
    python eval/train_tiny_video.py --out models/tiny-qwen2vl-video-shapes --eval-only
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vtprune import video_shapes as V  # noqa: E402

TEST = ROOT / "eval" / "tasks" / "vtprune_video_shapes" / "test.jsonl"


def build_model(processor, args):
    from transformers import Qwen2VLForConditionalGeneration

    cfg = V.model_config(args.width, args.layers, args.vision_width, args.vision_layers)
    torch.manual_seed(args.seed)
    model = Qwen2VLForConditionalGeneration(cfg)
    tok = processor.tokenizer
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.do_sample = False
    return model


class Heads(torch.nn.Module):
    """Training-only read-outs of the merged tokens: colour (7 classes) and shape (4 classes)."""

    def __init__(self, width: int):
        super().__init__()
        self.color = torch.nn.Linear(width, len(V.COLOR_NAMES) + 1)
        self.shape = torch.nn.Linear(width, len(V.SHAPES) + 1)


def make_batch(processor, videos: list[V.Video]):
    texts = [
        processor.apply_chat_template(V.chat(v.question), add_generation_prompt=True) + f" {v.answer} <|im_end|>"
        for v in videos
    ]
    inputs = processor(text=texts, videos=[V.frames(v) for v in videos], padding=True, return_tensors="pt")
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -2:] = inputs["input_ids"][:, -2:]  # left padding: every row ends with "ANSWER <|im_end|>"
    targets = [V.cell_targets(v) for v in videos]
    color = torch.from_numpy(np.concatenate([c.reshape(-1) for c, _ in targets]))
    shape = torch.from_numpy(np.concatenate([s.reshape(-1) for _, s in targets]))
    return inputs, labels, color, shape


def lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


def evaluate(model, processor, rows: list[dict], batch: int = 32) -> dict:
    model.eval()
    correct: Counter = Counter()
    total: Counter = Counter()
    t0 = time.time()
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        texts = [processor.apply_chat_template(V.chat(r["question"]), add_generation_prompt=True) for r in chunk]
        inputs = processor(text=texts, videos=[V.video(r) for r in chunk], padding=True, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        for r, seq in zip(chunk, out[:, inputs["input_ids"].shape[1] :]):
            words = processor.decode(seq, skip_special_tokens=True).split()
            total[r["type"]] += 1
            correct[r["type"]] += int(bool(words) and words[0] == r["answer"])
    per_type = {t: round(correct[t] / total[t], 4) for t in total}
    n = sum(total.values())
    return {
        "n": n,
        "accuracy": round(sum(correct.values()) / n, 4),
        "per_type": per_type,
        "per_type_n": dict(total),
        "seconds": round(time.time() - t0, 1),
    }


def train(model, processor, args, log) -> dict:
    heads = Heads(args.width)
    params = [
        {"params": [p for n, p in model.named_parameters() if "visual" in n], "lr": args.lr * args.vision_lr_scale},
        {"params": [p for n, p in model.named_parameters() if "visual" not in n], "lr": args.lr},
        {"params": list(heads.parameters()), "lr": args.lr},
    ]
    for g in params:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(params, weight_decay=0.01)
    merged: list[torch.Tensor] = []
    hook = model.model.visual.merger.register_forward_hook(lambda m, a, out: merged.append(out))
    start, index, step = time.time(), 0, 0
    budget = args.max_minutes * 60
    model.train()
    run = Counter()
    while step < args.steps and time.time() - start < budget:
        videos = [V.sample(args.seed, "train", index + i) for i in range(args.batch)]
        index += args.batch
        inputs, labels, color, shape = make_batch(processor, videos)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, args.steps, args.warmup)
        merged.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16)):
            out = model(**inputs)
            feats = merged[-1].float()
            logits = out.logits[:, -3:-1].float()  # predicts ANSWER and <|im_end|>
            lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, -2:].reshape(-1))
            aux = F.cross_entropy(heads.color(feats), color) + F.cross_entropy(heads.shape(feats), shape)
            loss = lm + args.aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        pred = logits[:, 0].argmax(-1)
        run["lm"] += float(lm.detach())
        run["aux"] += float(aux.detach())
        run["acc"] += float((pred == labels[:, -2]).float().mean())
        run["n"] += 1
        step += 1
        if step % args.log_every == 0:
            n = run.pop("n")
            log(
                f"step {step} videos {index} lm {run['lm'] / n:.3f} aux {run['aux'] / n:.3f} "
                f"train-acc {run['acc'] / n:.3f} lr {opt.param_groups[1]['lr']:.2e} {time.time() - start:.0f}s"
            )
            run.clear()
    hook.remove()
    model.eval()
    return {"steps_done": step, "train_videos": index, "train_seconds": round(time.time() - start)}


def write_card(out: Path, info: dict) -> None:
    """The model card (README.md): architecture, use, test accuracy per question type, the recipe and its run."""
    a, t = info["args"], info["test"]
    chance = {"move": "25%", "appear": "33%", "disappear": "33%", "color": "about 20%"}
    rows = "\n".join(
        f"| {k} | {100 * v:.1f}% | {t['per_type_n'][k]} | {chance.get(k, '')} |"
        for k, v in sorted(t["per_type"].items())
    )
    text = f"""---
library_name: transformers
pipeline_tag: video-text-to-text
license: apache-2.0
---

# tiny-qwen2vl-video-shapes

A {info["parameters"] / 1e6:.2f} M-parameter `Qwen2VLForConditionalGeneration` trained from scratch on CPU on the
synthetic video task of vtprune (`vtprune/video_shapes.py`, task `eval/tasks/vtprune_video_shapes`): 8 frames of
64x64 pixels, 16-pixel patches, merge size 1, one frame per temporal patch: 16 visual tokens per frame, 128 per video.
Vision tower {a["vision_layers"]} x {a["vision_width"]}; LM {a["layers"]} layers x {a["width"]} (4 heads, M-RoPE);
word-level vocabulary of the task. **Not a general VLM.**

## Test accuracy

Exact match of the first generated word on {t["n"]} questions of `eval/tasks/vtprune_video_shapes/test.jsonl`
(`python eval/train_tiny_video.py --eval-only`):

| type | accuracy | questions | chance |
|---|---|---|---|
{rows}
| **all** | **{100 * t["accuracy"]:.1f}%** | {t["n"]} | |

## Training recipe (`eval/train_tiny_video.py`, seed {a["seed"]})

    python eval/train_tiny_video.py {" ".join(info["argv"])}

One stage, every parameter trained on fresh `train` videos (batch {a["batch"]}, AdamW lr {a["lr"]}, warm-up
{a["warmup"]} steps then cosine over {a["steps"]} steps or `--max-minutes` {a["max_minutes"]}): cross-entropy on the
answer word and `<|im_end|>`, plus (weight {a["aux_weight"]}) a dense auxiliary loss on the merger output through
training-only linear heads (per token: the colour and the shape of the object in that cell, or background). The heads
are not saved. This run: {info["steps_done"]} steps, {info["train_videos"]} videos, {info["train_seconds"]} s wall
clock, {info["cpu_seconds"]} s process CPU time, `torch.set_num_threads({a["threads"]})`, on {info["date"]}
(log: `training_log.txt`).
"""
    (out / "README.md").write_text(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "models" / "tiny-qwen2vl-video-shapes"))
    p.add_argument("--test", default=str(TEST))
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--vision-width", type=int, default=64)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--vision-lr-scale", type=float, default=1.0)
    p.add_argument("--aux-weight", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--bf16", type=int, default=0)  # bf16 autocast: measured 7x slower per step on this CPU
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--max-minutes", type=float, default=40)
    p.add_argument("--no-save", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    rows = V.load_split(args.test)[: args.eval_limit]
    if args.eval_only:
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

        model = Qwen2VLForConditionalGeneration.from_pretrained(out)
        print(json.dumps(evaluate(model, AutoProcessor.from_pretrained(out), rows), indent=1))
        return
    processor = V.build_processor()
    model = build_model(processor, args)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"parameters {n_params}")
    cpu0 = time.process_time()
    info = train(model, processor, args, log)
    info["test"] = evaluate(model, processor, rows)
    log(f"test {json.dumps(info['test'])}")
    info.update(parameters=n_params, cpu_seconds=round(time.process_time() - cpu0), argv=sys.argv[1:], args=vars(args))
    info["date"] = time.strftime("%Y-%m-%d")
    if not args.no_save:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        processor.save_pretrained(out)
        (out / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")
        (out / "training_log.txt").write_text("\n".join(lines) + "\n")
        write_card(out, info)


if __name__ == "__main__":
    main()
