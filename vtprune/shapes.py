"""Synthetic shapes benchmark: seeded scenes of small coloured shapes on a grey cluttered background.

Every scene is a 224x224 RGB image (a 16x16 grid of 14-pixel CLIP patches) holding 1-4 small objects
(circle, square, triangle; six colours; 20-26 px, centred within 2 px of a patch-grid corner so that each
object covers about 2x2 of the 256 patches and every such patch shows a recognisable quarter of it) over
grey clutter (lines, dots, rectangles, grey outline decoys of the shapes), so most visual tokens are
background and a pruning method that drops the object patches loses the answer.

Question types (each answer is one lowercase word):

* ``color``    -- "what color is the circle ?"                  -> red | green | blue | yellow | purple | orange
                  (asked only about a shape that occurs exactly once)
* ``count``    -- "how many squares are there ?"                 -> zero | one | two | three
* ``exists``   -- "is there a red triangle ?" ("an orange ...")  -> yes | no (balanced; half of the "no"
                  questions are POPE-style adversarial: the shape or the colour is in the scene)
* ``position`` -- "is the circle left or right of the square ?" -> left | right
                  (both shapes unique, centres at least ``MIN_DX`` pixels apart horizontally)

Everything is a pure function of ``(seed, split, index)``: ``make_scene`` draws the scene, ``render``
draws it, ``ask`` draws questions about it. ``build_processor`` builds the matching ``LlavaProcessor``
offline (word-level tokenizer, CLIP image processor, chat template). ``python -m vtprune.shapes
write-test`` writes the shipped test split.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 224
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 16 patches per side, 256 per image
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 135, 30),
}
COLOR_NAMES = tuple(COLORS)
COUNT_WORDS = ("zero", "one", "two", "three")
QUESTION_TYPES = ("color", "count", "exists", "position")
MAX_OBJECTS = 4
MAX_PER_SHAPE = 3
SIZE_RANGE = (20, 26)  # object extent in pixels
JITTER = 2  # object centres lie within this many pixels of a patch-grid corner: each covers about 2x2 patches
MIN_DX = 2 * PATCH  # horizontal centre distance for position questions
SPLITS = {"train": 0, "test": 1}
DEFAULT_SEED = 1234

# Tokenizer vocabulary: special tokens, template words, question words, answer words.
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
TEMPLATE_WORDS = ("user", "assistant", ":")
QUESTION_WORDS = (
    "what",
    "color",
    "is",
    "the",
    "how",
    "many",
    "are",
    "there",
    "a",
    "an",
    "left",
    "or",
    "right",
    "of",
    "?",
)
ANSWER_WORDS = COLOR_NAMES + COUNT_WORDS + ("yes", "no", "left", "right")


def vocabulary() -> list[str]:
    """Every token of the word-level tokenizer, special tokens first (ids 0..4)."""
    words = list(SPECIAL_TOKENS)
    for w in TEMPLATE_WORDS + QUESTION_WORDS + SHAPES + tuple(PLURALS.values()) + ANSWER_WORDS:
        if w not in words:
            words.append(w)
    return words


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    cx: int  # centre, pixels
    cy: int
    size: int  # extent, pixels

    def box(self) -> tuple[int, int, int, int]:
        h = self.size / 2
        return (round(self.cx - h), round(self.cy - h), round(self.cx + h), round(self.cy + h))


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: int  # grey level
    clutter_seed: int

    def count(self, shape: str) -> int:
        return sum(o.shape == shape for o in self.objects)

    def has(self, color: str, shape: str) -> bool:
        return any(o.shape == shape and o.color == color for o in self.objects)

    def unique(self, shape: str) -> Obj | None:
        found = [o for o in self.objects if o.shape == shape]
        return found[0] if len(found) == 1 else None


def _check_split(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return SPLITS[split]


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of ``split``: independent streams per (seed, split, index)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be an int >= 0, got {index!r}")
    return np.random.default_rng([seed, _check_split(split), index])


def make_scene(rng: np.random.Generator, num_objects: int | None = None) -> Scene:
    """Draw 1-4 non-overlapping objects (at most three of one shape) and the clutter parameters."""
    if num_objects is None:
        num_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    if isinstance(num_objects, bool) or not isinstance(num_objects, int) or not 1 <= num_objects <= MAX_OBJECTS:
        raise ValueError(f"num_objects must be an int in 1..{MAX_OBJECTS}, got {num_objects!r}")
    objects: list[Obj] = []
    while len(objects) < num_objects:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        if sum(o.shape == shape for o in objects) >= MAX_PER_SHAPE:
            continue
        size = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
        for _ in range(100):
            # centre near a patch-grid corner (jittered): the object spans about 2x2 patches
            gx, gy = (int(v) for v in rng.integers(1, GRID, size=2))
            cx, cy = (int(g * PATCH + j) for g, j in zip((gx, gy), rng.integers(-JITTER, JITTER + 1, size=2)))
            # at least one free patch between objects
            if all(max(abs(cx - o.cx), abs(cy - o.cy)) >= 3 * PATCH for o in objects):
                break
        else:
            continue
        color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
        objects.append(Obj(shape, color, cx, cy, size))
    return Scene(tuple(objects), background=int(rng.integers(95, 165)), clutter_seed=int(rng.integers(2**31)))


def _draw_object(draw: ImageDraw.ImageDraw, obj: Obj, fill=None) -> None:
    fill = COLORS[obj.color] if fill is None else fill
    x0, y0, x1, y1 = obj.box()
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        inset = round(obj.size * 0.08)  # equal area feel: a square looks bigger than a circle of the same extent
        draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=fill)
    else:
        draw.polygon([(obj.cx, y0), (x1, y1), (x0, y1)], fill=fill)


def render(scene: Scene) -> Image.Image:
    """The scene as a 224x224 RGB image: grey background, grey clutter, then the objects.

    Only a few grey levels and the six object colours are used (no anti-aliasing), so PNGs stay small."""
    rng = np.random.default_rng(scene.clutter_seed)
    bg = scene.background
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (bg, bg, bg))
    draw = ImageDraw.Draw(img)
    greys = [int(g) for g in np.clip(bg + rng.choice([-60, -40, -25, 25, 40, 60], size=4), 0, 255)]

    def grey() -> tuple[int, int, int]:
        g = greys[int(rng.integers(len(greys)))]
        return (g, g, g)

    for _ in range(int(rng.integers(3, 7))):  # large faint rectangles (texture regions)
        x, y = rng.integers(0, IMAGE_SIZE, size=2)
        w, h = rng.integers(20, 90, size=2)
        draw.rectangle((int(x), int(y), int(x + w), int(y + h)), outline=grey(), width=1)
    for _ in range(int(rng.integers(6, 14))):  # lines
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, IMAGE_SIZE, size=4))
        draw.line((x0, y0, x1, y1), fill=grey(), width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(30, 70))):  # dots
        x, y = (int(v) for v in rng.integers(0, IMAGE_SIZE, size=2))
        r = int(rng.integers(1, 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=grey())
    for _ in range(int(rng.integers(2, 5))):  # grey outline decoys of the object shapes
        size = int(rng.integers(*SIZE_RANGE))
        x, y = (int(v) for v in rng.integers(size, IMAGE_SIZE - size, size=2))
        box = (x - size // 2, y - size // 2, x + size // 2, y + size // 2)
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse(box, outline=grey(), width=2)
        elif kind == 1:
            draw.rectangle(box, outline=grey(), width=2)
        else:
            draw.polygon([(x, box[1]), (box[2], box[3]), (box[0], box[3])], outline=grey(), width=2)
    for obj in scene.objects:
        _draw_object(draw, obj)
    return img


def object_masks(scene: Scene) -> np.ndarray:
    """``[num_objects, 224, 224]`` bool: the pixels each object covers (objects never overlap)."""
    masks = np.zeros((len(scene.objects), IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for i, obj in enumerate(scene.objects):
        layer = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        _draw_object(ImageDraw.Draw(layer), obj, fill=255)
        masks[i] = np.asarray(layer) > 0
    return masks


def object_patches(scene: Scene, min_pixels: int = 1) -> list[list[int]]:
    """For each object, the row-major indices (0..255) of the 14x14 patches holding >= ``min_pixels`` of it."""
    masks = object_masks(scene)
    per_patch = (
        masks.reshape(len(scene.objects), GRID, PATCH, GRID, PATCH)
        .sum(axis=(2, 4))
        .reshape(len(scene.objects), GRID * GRID)
    )
    return [np.flatnonzero(row >= min_pixels).tolist() for row in per_patch]


# ----------------------------------------------------------------------------------------------------------
# Questions


@dataclass(frozen=True)
class Question:
    type: str
    question: str
    answer: str


def color_question(scene: Scene, shape: str) -> Question:
    obj = scene.unique(shape)
    if obj is None:
        raise ValueError(f"a color question needs exactly one {shape}; the scene has {scene.count(shape)}")
    return Question("color", f"what color is the {shape} ?", obj.color)


def count_question(scene: Scene, shape: str) -> Question:
    return Question("count", f"how many {PLURALS[shape]} are there ?", COUNT_WORDS[scene.count(shape)])


def exists_question(scene: Scene, color: str, shape: str) -> Question:
    article = "an" if color[0] in "aeiou" else "a"
    return Question("exists", f"is there {article} {color} {shape} ?", "yes" if scene.has(color, shape) else "no")


def position_question(scene: Scene, first: str, second: str) -> Question:
    a, b = scene.unique(first), scene.unique(second)
    if a is None or b is None or first == second or abs(a.cx - b.cx) < MIN_DX:
        raise ValueError(
            f"a position question needs two different unique shapes {MIN_DX}+ px apart; got {first!r}, {second!r}"
        )
    return Question("position", f"is the {first} left or right of the {second} ?", "left" if a.cx < b.cx else "right")


def askable(scene: Scene) -> dict[str, list]:
    """Every question argument allowed for this scene, per type."""
    uniques = [s for s in SHAPES if scene.unique(s) is not None]
    pairs = [
        (a, b) for a in uniques for b in uniques if a != b and abs(scene.unique(a).cx - scene.unique(b).cx) >= MIN_DX
    ]
    return {
        "color": uniques,
        "count": list(SHAPES),
        "exists": [(c, s) for c in COLOR_NAMES for s in SHAPES],
        "position": pairs,
    }


def ask(scene: Scene, qtype: str, rng: np.random.Generator, target: str | None = None) -> Question | None:
    """One random question of ``qtype`` about ``scene`` (None if the scene allows none).

    ``target`` steers the answer where the scene allows it: "yes"/"no" for ``exists`` (None: 50/50),
    a count word for ``count``; otherwise it is ignored."""
    if qtype not in QUESTION_TYPES:
        raise ValueError(f"question type must be one of {QUESTION_TYPES}, got {qtype!r}")
    options = askable(scene)[qtype]
    if not options:
        return None
    if qtype == "color":
        return color_question(scene, options[int(rng.integers(len(options)))])
    if qtype == "position":
        return position_question(scene, *options[int(rng.integers(len(options)))])
    if qtype == "count":
        wanted = [s for s in SHAPES if target is not None and COUNT_WORDS[scene.count(s)] == target]
        pool = wanted or list(SHAPES)
        return count_question(scene, pool[int(rng.integers(len(pool)))])
    # exists: balanced yes/no; half of the "no" questions share the shape or the colour with an object
    want_yes = bool(rng.integers(2)) if target is None else target == "yes"
    present = [(o.color, o.shape) for o in scene.objects]
    if want_yes:
        color, shape = present[int(rng.integers(len(present)))]
        return exists_question(scene, color, shape)
    absent = [(c, s) for c, s in options if not scene.has(c, s)]
    near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
    pool = near if near and rng.random() < 0.5 else absent
    color, shape = pool[int(rng.integers(len(pool)))]
    return exists_question(scene, color, shape)


def sample(seed: int, split: str, index: int) -> tuple[Scene, Image.Image]:
    """Scene ``index`` of ``split`` and its image."""
    scene = make_scene(scene_rng(seed, split, index))
    return scene, render(scene)


def test_records(seed: int = DEFAULT_SEED, per_type: int = 150) -> list[tuple[int, Scene, Question]]:
    """The test split: ``per_type`` questions of each type, at most one of each type per image.

    Answers are balanced where the scene allows: ``exists`` alternates yes/no; ``count`` cycles through
    zero..three. Returns ``(image index, scene, question)`` in image order."""
    if isinstance(per_type, bool) or not isinstance(per_type, int) or per_type < 1:
        raise ValueError(f"per_type must be an int >= 1, got {per_type!r}")
    done = {t: 0 for t in QUESTION_TYPES}
    records: list[tuple[int, Scene, Question]] = []
    index = 0
    while min(done.values()) < per_type:
        scene = make_scene(scene_rng(seed, "test", index))
        qrng = np.random.default_rng([seed, SPLITS["test"], index, 1])
        for qtype in QUESTION_TYPES:
            if done[qtype] >= per_type:
                continue
            target = {
                "exists": ("yes", "no")[done["exists"] % 2],
                "count": COUNT_WORDS[done["count"] % len(COUNT_WORDS)],
            }.get(qtype)
            q = ask(scene, qtype, qrng, target)
            if q is None or (qtype == "count" and q.answer != target):
                continue  # keep the answer mix balanced: only take the targeted count
            records.append((index, scene, q))
            done[qtype] += 1
        index += 1
    return records


def write_test_split(out_dir: str | Path, seed: int = DEFAULT_SEED, per_type: int = 150) -> Path:
    """Write ``test.jsonl`` and ``images/test_XXXXX.png`` under ``out_dir``; returns the jsonl path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    written: set[int] = set()
    for n, (index, scene, q) in enumerate(test_records(seed, per_type)):
        name = f"images/test_{index:05d}.png"
        if index not in written:
            render(scene).save(out / name, optimize=True)
            written.add(index)
        lines.append(
            json.dumps(
                {"id": f"shapes-{n:04d}", "image": name, "question": q.question, "answer": q.answer, "type": q.type}
            )
        )
    path = out / "test.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def load_split(path: str | Path) -> list[dict]:
    """Read a ``test.jsonl`` written by ``write_test_split``."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------------------
# Processor

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}user : {% elif message['role'] == 'assistant' %}assistant : {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> {% elif item['type'] == 'text' %}{{ item['text'] }} {% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def build_tokenizer():
    """Word-level ``PreTrainedTokenizerFast`` over ``vocabulary()`` (lower-cased, punctuation split)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor():
    """The benchmark's ``LlavaProcessor``: word-level tokenizer, 224px CLIP image processor (14px patches:
    256 patch tokens; the CLS token is dropped), chat template. Built offline; ``save_pretrained`` /
    ``AutoProcessor.from_pretrained`` round-trip it."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=CHAT_TEMPLATE,
    )


def chat(question: str) -> list[dict]:
    """The one-turn conversation of a benchmark question (image first, then the question)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def answer(model, processor, image, question: str, max_new_tokens: int = 4) -> str:
    """The model's answer word through the plain Hugging Face route (chat template, processor, ``generate``)."""
    import torch

    text = processor.apply_chat_template(chat(question), add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    words = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).split()
    return words[0].lower() if words else ""


def evaluate(
    model_dir: str | Path,
    test_path: str | Path,
    limit: int | None = None,
    log=None,
    prune: tuple[str, int] | None = None,
) -> dict:
    """Exact-match accuracy of the model in ``model_dir`` on a split file, overall and per question type,
    through ``AutoProcessor`` + ``LlavaForConditionalGeneration.generate`` one question at a time.

    ``prune=(method, keep)`` evaluates under ``vtprune.patched(model, method, keep=keep)``."""
    import contextlib
    import time

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from . import api

    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    rows = load_split(test_path)[:limit]
    root = Path(test_path).parent
    hits: dict[str, list[bool]] = {t: [] for t in QUESTION_TYPES}
    t0 = time.time()
    ctx = api.patched(model, prune[0], keep=prune[1]) if prune is not None else contextlib.nullcontext()
    with ctx:
        for n, row in enumerate(rows):
            image = Image.open(root / row["image"]).convert("RGB")
            hits[row["type"]].append(answer(model, processor, image, row["question"]) == row["answer"])
            if log is not None and (n + 1) % 100 == 0:
                log(f"evaluated {n + 1}/{len(rows)}")
    flat = [h for v in hits.values() for h in v]
    return {
        "n": len(flat),
        "accuracy": round(sum(flat) / max(1, len(flat)), 4),
        "per_type": {t: round(sum(v) / len(v), 4) for t, v in hits.items() if v},
        "per_type_n": {t: len(v) for t, v in hits.items() if v},
        "seconds": round(time.time() - t0, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vtprune.shapes", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write-test", help="write test.jsonl + images/ of the test split")
    w.add_argument("--out", default="eval/tasks/vtprune_shapes")
    w.add_argument("--seed", type=int, default=DEFAULT_SEED)
    w.add_argument("--per-type", type=int, default=150)
    args = parser.parse_args(argv)
    path = write_test_split(args.out, args.seed, args.per_type)
    rows = load_split(path)
    print(f"wrote {len(rows)} questions to {path}")


if __name__ == "__main__":
    main()
