"""Train the bundled tiny timm ViT (``models/tiny-vit-shapes``) from scratch on CPU: shapes classification.

Task: a classification version of the shapes benchmark (``vtprune/shapes.py``): a scene with exactly one object
(circle / square / triangle in one of six colours) on the benchmark's grey clutter (lines, dots, rectangles, grey
outline decoys), rendered at 224x224 and box-downsampled to ``--image-size`` (default 112: the object is 10-13 px,
within 1-4 of the 49 16-pixel patches); the label is the object's (colour, shape) pair, 18 classes. Most patches
are background, so a token-reduction method that loses the object's patches loses the answer. (112 px keeps a CPU
run to minutes on a shared 2-core machine; ``--image-size 224`` gives 196 patches.)

Model: a stock ``timm.models.vision_transformer.VisionTransformer`` (patch 16, CLS token, class-token pooling),
trained with AdamW on a fresh scene per image (``train`` split) and scored on the first ``--test-images`` scenes of
the ``test`` split. Training ends at ``--steps`` or ``--max-minutes`` of wall clock, whichever comes first (the
learning-rate schedule follows the further along of the two).

    python eval/train_tiny_vit.py --out models/tiny-vit-shapes
    python eval/train_tiny_vit.py --eval-only --out models/tiny-vit-shapes
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vtprune import shapes as S  # noqa: E402

# the model's definition, loader and test scenes live in the package (vtprune.tiny_vit); this script trains it
from vtprune.tiny_vit import (  # noqa: E402,F401
    CLASSES,
    PATCH,
    accuracy,
    build_vit,
    load,
    pixels,
    scene_and_label,
    test_set,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "models" / "tiny-vit-shapes"))
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=S.DEFAULT_SEED)
    p.add_argument("--threads", type=int, default=1, help="1: OpenMP threads spin badly on a loaded shared machine")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--max-minutes", type=float, default=20.0)
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument(
        "--dense-weight",
        type=float,
        default=1.0,
        help="weight of the training-only per-patch loss (which object class covers each patch)",
    )
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.eval_only:
        model, config = load(out)
        x, y = test_set(args.test_images, args.data_seed, config["timm_kwargs"]["img_size"])
        print(f"test accuracy {accuracy(model, x, y):.4f} on {len(y)} images")
        return
    torch.manual_seed(args.seed)
    config = {
        "architecture": "timm.models.vision_transformer.VisionTransformer",
        "timm_kwargs": dict(
            img_size=args.image_size,
            patch_size=PATCH,
            embed_dim=args.width,
            depth=args.depth,
            num_heads=args.heads,
            mlp_ratio=2.0,
            num_classes=len(CLASSES),
            global_pool="token",
        ),
        "classes": CLASSES,
        "normalization": f"(x / 255 - 0.5) / 0.25, x uint8 RGB {args.image_size}x{args.image_size} (the 224x224 "
        "scene box-downsampled: PIL Image.reduce)",
        "task": "shapes classification: the (colour, shape) of the single object of a vtprune.shapes scene",
    }
    model = build_vit(config)
    params = sum(p.numel() for p in model.parameters())
    dense_head = torch.nn.Linear(args.width, len(CLASSES) + 1)  # training-only, not saved
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n and "token" not in n]
    no_decay = [
        p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n and "token" not in n)
    ]
    opt = torch.optim.AdamW(
        [
            {"params": decay + [dense_head.weight], "weight_decay": args.weight_decay},
            {"params": no_decay + [dense_head.bias], "weight_decay": 0.0},
        ],
        lr=args.lr,
    )
    x_test, y_test = test_set(args.test_images, args.data_seed, args.image_size)
    budget = args.max_minutes * 60.0
    out.mkdir(parents=True, exist_ok=True)
    log_lines = [f"parameters: {params / 1e6:.3f} M"]
    print(log_lines[0], flush=True)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    index = 0
    step = 0
    run_loss = run_acc = 0.0
    while step < args.steps:
        elapsed = time.perf_counter() - start
        frac = max(step / args.steps, elapsed / budget)
        if frac >= 1.0:
            break
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1.0 + math.cos(math.pi * frac))
        for group in opt.param_groups:
            group["lr"] = lr
        items = [
            scene_and_label("train", index + i, args.data_seed, args.image_size, dense=True) for i in range(args.batch)
        ]
        index += args.batch
        images = np.stack([it[0] for it in items])
        dense = np.stack([it[2] for it in items])
        flip = rng.random(args.batch) < 0.5  # a mirrored scene keeps its label (patch columns mirror exactly)
        images[flip] = images[flip, :, ::-1]
        dense[flip] = dense[flip, :, ::-1]
        x, y = pixels(np.ascontiguousarray(images)), torch.tensor([it[1] for it in items])
        model.train()
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
        loss = F.cross_entropy(logits, y)
        if args.dense_weight:
            target = torch.from_numpy(np.ascontiguousarray(dense)).reshape(args.batch, -1).long()
            patch_logits = dense_head(feats[:, model.num_prefix_tokens :])
            loss = loss + args.dense_weight * F.cross_entropy(patch_logits.flatten(0, 1), target.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        run_loss += float(loss.detach())
        run_acc += float((logits.argmax(-1) == y).float().mean())
        if step % args.log_every == 0:
            line = (
                f"step {step:5d} {time.perf_counter() - start:7.1f}s lr {lr:.2e} loss {run_loss / args.log_every:.4f} "
                f"train_acc {run_acc / args.log_every:.3f}"
            )
            if step % (args.log_every * 10) == 0:
                line += f" test_acc {accuracy(model, x_test[:300], y_test[:300]):.3f} (first 300)"
            print(line, flush=True)
            log_lines.append(line)
            run_loss = run_acc = 0.0
    train_s = time.perf_counter() - start
    acc = accuracy(model, x_test, y_test)
    line = f"done: {step} steps, {index} images, {train_s:.0f}s; test accuracy {acc:.4f} on {len(y_test)} images"
    print(line, flush=True)
    log_lines.append(line)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    (out / "training_log.txt").write_text("\n".join(log_lines) + "\n")
    info = {
        "train_seconds": round(train_s),
        "steps": step,
        "train_images": index,
        "parameters": params,
        "test_accuracy": acc,
        "test_images": len(y_test),
        "argv": sys.argv[1:],
        "args": vars(args),
        "torch": torch.__version__,
        "timm": __import__("timm").__version__,
    }
    (out / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")


if __name__ == "__main__":
    main()
