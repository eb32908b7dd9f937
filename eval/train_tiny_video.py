"""Train the bundled tiny video VLM (``models/tiny-qwen2vl-video-shapes``) from scratch on CPU.

A stock ``Qwen2VLForConditionalGeneration`` (16-pixel patches, merge size 1, one frame per temporal patch: 16 tokens per
64x64 frame, 128 per 8-frame video; vision 2 layers x 64, LM 3 layers x 128) learns the synthetic video task of
``vtprune/video_shapes.py`` (task ``eval/tasks/vtprune_video_shapes``). One stage, every parameter trained:

* loss on the answer word and the ``<|im_end|>`` after it (cross-entropy), fresh videos every step;
* a dense auxiliary loss on the merger's output (what the LLM reads): per merged token, through training-only linear
  heads, the colour (or background) and the shape of the object in that grid cell (``video_shapes.cell_targets``).
* attention grounding (``--ground-weight``), from the generator's ground truth, as in ``eval/train_tiny.py``: each of
  the LM's layer-0 heads, at every video token, is trained (cross-entropy against a one-hot target) to look at one cell
  of the previous frame (:data:`LAYER0_OFFSETS`: the same cell, the left, right and upper neighbour), so a token's
  state holds what changed in its cell and where an object came from; layer 1's heads 0 and 1, at the answer
  position, look at the event tokens (:func:`answer_tokens`: where the object appeared, vanished, changed colour or
  arrived); training-only linear read-outs of the states after layer 0 (each token's event class, :data:`EVENTS`, and
  the shape its cell held in the previous frame) and of the answer position after layer 1 (the answer word).
* a small M-RoPE base (``--rope-theta 4``): at the default 10000, M-RoPE gives the row and column the lowest
  frequencies (one cell turns them by at most 0.1 rad) and the layer-0 heads could not single out one cell.

The heads are not saved: the checkpoint is a plain Qwen2-VL (eager attention only while training, to read the
attention probabilities).

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

    cfg = V.model_config(args.width, args.layers, args.vision_width, args.vision_layers, args.rope_theta)
    torch.manual_seed(args.seed)
    model = Qwen2VLForConditionalGeneration(cfg)
    tok = processor.tokenizer
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.do_sample = False
    return model


class Heads(torch.nn.Module):
    """Training-only read-outs: of the merged tokens, colour (7 classes) and shape (4 classes); of the video tokens'
    LM states after layer 0, the event class (:data:`EVENTS`) and the shape there in the previous frame; of the answer
    position's state after layer 1 (where the grounded heads have read the event tokens), the answer word."""

    def __init__(self, width: int, vocab: int):
        super().__init__()
        self.color = torch.nn.Linear(width, len(V.COLOR_NAMES) + 1)
        self.shape = torch.nn.Linear(width, len(V.SHAPES) + 1)
        self.event = torch.nn.Linear(width, len(EVENTS))
        self.prev_shape = torch.nn.Linear(width, len(V.SHAPES) + 1)
        self.answer = torch.nn.Linear(width, vocab)


# Grounding (training only). Per video token (frame t, cell r, c), what changed since frame t - 1 in its cell:
EVENTS = ("none", "appeared", "vanished", "recoloured", "from-left", "from-right", "from-above", "from-below")
# the cell the object came from, relative to where it is now, for each "from-*" event
FROM = {"from-left": (0, -1), "from-right": (0, 1), "from-above": (-1, 0), "from-below": (1, 0)}
# Layer-0 heads of the LM, each supervised to look at one cell of the previous frame, relative to the query's cell
# (frame, row, col): head 0 the same cell, heads 1-3 the left, right and upper neighbours (an object coming from
# below is the one left over). Where that cell does not exist (frame 0, the grid's edge) the target is the first
# token of the sequence (an attention sink).
LAYER0_OFFSETS = ((-1, 0, 0), (-1, 0, -1), (-1, 0, 1), (-1, -1, 0))


def events(v: V.Video) -> tuple[np.ndarray, np.ndarray]:
    """``int64 [FRAMES, GRID * GRID]`` each: the event class (index in :data:`EVENTS`) of every video token, and the
    shape index + 1 (0: background) of its cell in the previous frame (0 in frame 0). Only the video's actor has
    events: it appears, vanishes, changes colour, or arrives in a cell from a neighbour (a move)."""
    ev = np.zeros((V.FRAMES, V.GRID * V.GRID), dtype=np.int64)
    prev = np.zeros_like(ev)
    for f in range(1, V.FRAMES):
        for tr in v.tracks:
            before, now = tr.cells[f - 1], tr.cells[f]
            if before is not None:
                prev[f, before[0] * V.GRID + before[1]] = V.SHAPES.index(tr.shape) + 1
            if before == now and (now is None or tr.colors[f] == tr.colors[f - 1]):
                continue
            if before is None:
                ev[f, now[0] * V.GRID + now[1]] = EVENTS.index("appeared")
            elif now is None:
                ev[f, before[0] * V.GRID + before[1]] = EVENTS.index("vanished")
            elif before == now:
                ev[f, now[0] * V.GRID + now[1]] = EVENTS.index("recoloured")
            else:
                d = (before[0] - now[0], before[1] - now[1])
                ev[f, now[0] * V.GRID + now[1]] = EVENTS.index(next(k for k, o in FROM.items() if o == d))
                ev[f, before[0] * V.GRID + before[1]] = EVENTS.index("vanished")
    return ev, prev


def answer_tokens(v: V.Video, ev: np.ndarray) -> np.ndarray:
    """``bool [FRAMES * GRID * GRID]``: the video tokens that hold the answer, which the answer position's grounded
    heads look at: where the actor arrived (move) or its appear / vanish / recolour event (the other types)."""
    flat = ev.reshape(-1)
    return flat >= EVENTS.index("from-left") if v.qtype == "move" else flat > 0


def layer0_keys(video_pos: torch.Tensor, sink: int) -> torch.Tensor:
    """``int64 [len(LAYER0_OFFSETS), FRAMES * GRID * GRID]``: for each supervised layer-0 head and each video token
    (raster order), the sequence position of the key it should attend to (``video_pos``: the video tokens' sequence
    positions; ``sink``: the first token's)."""
    keys = torch.full((len(LAYER0_OFFSETS), V.FRAMES * V.GRID * V.GRID), sink, dtype=torch.long)
    for h, (dt, dr, dc) in enumerate(LAYER0_OFFSETS):
        for f in range(V.FRAMES):
            for r in range(V.GRID):
                for c in range(V.GRID):
                    f2, r2, c2 = f + dt, r + dr, c + dc
                    if f2 >= 0 and 0 <= r2 < V.GRID and 0 <= c2 < V.GRID:
                        keys[h, (f * V.GRID + r) * V.GRID + c] = video_pos[(f2 * V.GRID + r2) * V.GRID + c2]
    return keys


def grounding_loss(out, inputs, videos, heads, video_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(layer-0 attention grounding loss, layer-1 attention grounding loss, read-out loss) of one batch (left padded;
    the answer word is second to last, so the position that predicts it is third to last). Attention: cross-entropy
    between the target distribution and the attention of layer 0's heads at every video token
    (:data:`LAYER0_OFFSETS`) and of layer 1's heads 0 and 1 at the answer position (uniform over
    :func:`answer_tokens`). Read-outs: :class:`Heads`."""
    att0, att1 = out.attentions[0].float(), out.attentions[1].float()  # [B, heads, L, L]
    h0 = out.hidden_states[1].float()  # the LM states after layer 0
    answer = F.cross_entropy(heads.answer(out.hidden_states[2][:, -3].float()), inputs["input_ids"][:, -2])
    ground0, ground1, readout = [], [], []
    for b, v in enumerate(videos):
        ids = inputs["input_ids"][b]
        pos = (ids == video_token_id).nonzero().squeeze(1)
        sink = int(inputs["attention_mask"][b].nonzero()[0])
        keys = layer0_keys(pos, sink)
        a0 = att0[b, : len(LAYER0_OFFSETS)][:, pos]  # [heads, 128, L]
        ground0.append(-torch.log(a0.gather(-1, keys.unsqueeze(-1)) + 1e-6).mean())
        ev, prev = events(v)
        target = pos[torch.from_numpy(answer_tokens(v, ev))]
        a1 = att1[b, :2, -3]  # [2, L]
        ground1.append(-torch.log(a1[:, target] + 1e-6).mean())
        readout.append(
            F.cross_entropy(heads.event(h0[b, pos]), torch.from_numpy(ev.reshape(-1)))
            + F.cross_entropy(heads.prev_shape(h0[b, pos]), torch.from_numpy(prev.reshape(-1)))
        )
    return torch.stack(ground0).mean(), torch.stack(ground1).mean(), torch.stack(readout).mean() + answer


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
    heads = Heads(args.width, model.config.text_config.vocab_size)
    params = [
        {"params": [p for n, p in model.named_parameters() if "visual" in n], "lr": args.lr * args.vision_lr_scale},
        {"params": [p for n, p in model.named_parameters() if "visual" not in n], "lr": args.lr},
        {"params": list(heads.parameters()), "lr": args.lr},
    ]
    for g in params:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(params, weight_decay=0.01)
    video_token_id = model.config.video_token_id
    if args.ground_weight:
        model.set_attn_implementation("eager")  # attention probabilities for the grounding loss
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
            grounded = bool(args.ground_weight)
            out = model(**inputs, output_attentions=grounded, output_hidden_states=grounded)
            feats = merged[-1].float()
            logits = out.logits[:, -3:-1].float()  # predicts ANSWER and <|im_end|>
            lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, -2:].reshape(-1))
            aux = F.cross_entropy(heads.color(feats), color) + F.cross_entropy(heads.shape(feats), shape)
            loss = lm + args.aux_weight * aux
            if grounded:
                ground0, ground1, readout = grounding_loss(out, inputs, videos, heads, video_token_id)
                loss = loss + args.ground_weight * (ground0 + ground1 + readout)
                run["ground0"] += float(ground0.detach())
                run["ground1"] += float(ground1.detach())
                run["readout"] += float(readout.detach())
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
                f"ground0 {run['ground0'] / n:.3f} ground1 {run['ground1'] / n:.3f} readout {run['readout'] / n:.3f} "
                f"train-acc {run['acc'] / n:.3f} lr {opt.param_groups[1]['lr']:.2e} {time.time() - start:.0f}s"
            )
            run.clear()
    hook.remove()
    model.set_attn_implementation("sdpa")
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
Vision tower {a["vision_layers"]} x {a["vision_width"]}; LM {a["layers"]} layers x {a["width"]} (4 heads,
M-RoPE with base {a.get("rope_theta", 10000.0)}); word-level vocabulary of the task. **Not a general VLM.**

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
training-only linear heads (per token: the colour and the shape of the object in that cell, or background), plus
(weight {a.get("ground_weight", 0)}) attention grounding from the generator's ground truth: every layer-0 head of the
LM, at every video token, is trained to look at one cell of the previous frame (head 0 the same cell, heads 1-3 the
left, right and upper neighbour; the first token where there is none), so a token knows what changed in its cell and
where an object came from; layer 1's heads 0 and 1, at the answer position, look at the tokens of the event (where the
object appeared, vanished, changed colour or arrived); training-only linear read-outs predict each video token's event
class and the shape its cell held one frame earlier (after layer 0) and the answer word (after layer 1). The heads are
not saved; the checkpoint is a plain Qwen2-VL. This run: {info["steps_done"]} steps, {info["train_videos"]} videos,
{info["train_seconds"]} s wall clock, {info["cpu_seconds"]} s process CPU time,
`torch.set_num_threads({a["threads"]})`, on {info["date"]}
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
    p.add_argument("--rope-theta", type=float, default=4.0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--vision-lr-scale", type=float, default=1.0)
    p.add_argument("--aux-weight", type=float, default=1.0)
    p.add_argument("--ground-weight", type=float, default=1.0)
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
