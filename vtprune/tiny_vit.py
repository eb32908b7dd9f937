"""The bundled tiny ViT (``models/tiny-vit-shapes``): a stock timm ``VisionTransformer`` that classifies the
shapes scenes (one object, "colour shape", 18 classes), its loader and its test scenes (needs ``timm``: the
``vit`` extra). Trained by ``eval/train_tiny_vit.py``; benchmarked by ``eval/bench_vit.py``.

    from vtprune import tiny_vit
    model, config = tiny_vit.load()                      # from a clone: models/tiny-vit-shapes
    x, y = tiny_vit.test_set(1000)
    tiny_vit.accuracy(model, x, y)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from . import shapes as S

__all__ = ["CLASSES", "DEFAULT_PATH", "accuracy", "build_vit", "load", "pixels", "scene_and_label", "test_set"]

#: where the bundled model lives in a clone of the repository (model files are not package data)
DEFAULT_PATH = Path(__file__).resolve().parents[1] / "models" / "tiny-vit-shapes"

CLASSES = [f"{c} {s}" for s in S.SHAPES for c in S.COLOR_NAMES]
PATCH = 16


def scene_and_label(split: str, index: int, seed: int, size: int = 112, dense: bool = False):
    """``(image uint8 [size, size, 3], label)``, and with ``dense`` the per-patch target ``[G, G]`` (``G = size //
    16``; label + 1 where a patch holds >= 16 of the object's pixels at that size, else 0)."""
    if S.IMAGE_SIZE % size:
        raise ValueError(f"size must divide {S.IMAGE_SIZE}, got {size}")
    f = S.IMAGE_SIZE // size
    scene = S.make_scene(S.scene_rng(seed, split, index), num_objects=1)
    obj = scene.objects[0]
    label = CLASSES.index(f"{obj.color} {obj.shape}")
    image = S.render(scene)
    image = np.asarray(image.reduce(f) if f > 1 else image)
    if not dense:
        return image, label
    g, p = size // PATCH, PATCH * f
    cover = S.object_masks(scene)[0].reshape(g, p, g, p).sum(axis=(1, 3)) / (f * f)
    return image, label, np.where(cover >= 16, label + 1, 0)


def pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> the model's input ``[B, 3, H, W]`` (x / 255 - 0.5) / 0.25."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.25


def build_vit(config: dict):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**config["timm_kwargs"])


def load(path: str | Path = DEFAULT_PATH):
    """The bundled model (eval mode) and its config (a dict: ``timm_kwargs``, ``classes``, ...) from ``path``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"no tiny ViT at {str(path)!r} (a folder with config.json and model.safetensors); the "
            "bundled one is models/tiny-vit-shapes in a clone of the vtprune repository"
        )
    config = json.loads((path / "config.json").read_text())
    model = build_vit(config)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval(), config


def test_set(n: int, seed: int = S.DEFAULT_SEED, size: int = 112) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` test scenes as the model's input ``[n, 3, size, size]`` and their labels ``[n]``."""
    items = [scene_and_label("test", i, seed, size) for i in range(n)]
    return pixels(np.stack([im for im, _ in items])), torch.tensor([lab for _, lab in items])


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch: int = 100) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, in batches of ``batch``."""
    model.eval()
    pred = torch.cat([model(x[i : i + batch]).argmax(-1) for i in range(0, len(x), batch)])
    return float((pred == y).float().mean())
