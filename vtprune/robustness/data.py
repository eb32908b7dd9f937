"""The audited questions: each with its image and the patches of the objects it is about."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import shapes


@dataclass
class Item:
    """One question of the task with its image (``[3, H, W]`` float in [0, 1], on the 1/255 grid) and the visual
    tokens (row-major patch indices) of the objects it is about."""

    id: str
    image: torch.Tensor
    question: str
    answer: str
    type: str
    critical: list[int]


def critical_patches(scene: shapes.Scene, question: str) -> list[int]:
    """Patches of the objects a question is about: the objects of the shape(s) it names (``exists``: of the named
    colour and shape, else of either); all objects when none matches (a count of zero, an absent object)."""
    words = question.replace("?", " ").split()
    named = {s for s in shapes.SHAPES if s in words or shapes.PLURALS[s] in words}
    colors = {c for c in shapes.COLOR_NAMES if c in words}
    objs = list(scene.objects)
    if colors:  # exists: the named object, else the ones sharing its shape or colour
        chosen = [o for o in objs if o.shape in named and o.color in colors]
        chosen = chosen or [o for o in objs if o.shape in named or o.color in colors]
    else:
        chosen = [o for o in objs if o.shape in named]
    chosen = chosen or objs
    patches = shapes.object_patches(scene)
    return sorted({p for o in chosen for p in patches[objs.index(o)]})


def load_items(task: str | Path, scene_seed: int = shapes.DEFAULT_SEED, limit: int | None = None) -> list[Item]:
    """The first ``limit`` questions of ``task``/test.jsonl with their scenes regenerated from ``scene_seed`` (each
    re-rendered scene must equal the stored image, else ``ValueError``)."""
    from PIL import Image

    task = Path(task)
    split = task / "test.jsonl"
    if not split.is_file():
        raise ValueError(f"task folder {str(task)!r} has no test.jsonl (expected eval/tasks/vtprune_shapes)")
    rows = shapes.load_split(split)[:limit]
    items, scenes = [], {}
    for row in rows:
        name = Path(row["image"]).stem
        index = int(name.rsplit("_", 1)[1])
        if index not in scenes:
            scene = shapes.make_scene(shapes.scene_rng(scene_seed, "test", index))
            with Image.open(task / row["image"]) as im:
                stored = np.asarray(im.convert("RGB"))
            if not np.array_equal(np.asarray(shapes.render(scene)), stored):
                raise ValueError(
                    f"{row['image']} is not scene {index} of seed {scene_seed}: the generator cannot "
                    "say which patches hold its objects (pass the scene_seed the split was written with)"
                )
            scenes[index] = (scene, torch.from_numpy(stored.copy()).permute(2, 0, 1).float() / 255)
        scene, image = scenes[index]
        items.append(
            Item(
                row["id"], image, row["question"], row["answer"], row["type"], critical_patches(scene, row["question"])
            )
        )
    return items
