"""A synthetic video benchmark for visual-token pruning: shapes that move, appear, disappear or change colour on a
static cluttered background.

Each video is ``FRAMES`` frames of ``FRAME_SIZE`` x ``FRAME_SIZE`` pixels. With the bundled
``models/tiny-qwen2vl-video-shapes`` (16-pixel patches, merge size 1, one frame per temporal patch) every frame is a
``GRID`` x ``GRID`` grid of merged tokens (16), a video 128 tokens; each object fills one grid cell (one merged token).
The background (grey, lines, dots) is the same in every frame of a video: only the tokens an event touches change
over time, so temporal-redundancy pruning (keep what changed) has a real signal and ``random`` has none.

A video holds the three shapes once each, in three distinct colours; one of them takes part in the video's event:

* ``move``: it moves 2 or 3 cells in a straight line (one cell per step, steps evenly spread over the frames):
  ``which way did the red shape move ?`` -> ``left`` / ``right`` / ``up`` / ``down``;
* ``appear`` / ``disappear``: it is absent from the first (last) ``k`` frames, ``k`` in 2..5:
  ``which shape appeared ?`` -> ``circle`` / ``square`` / ``triangle``;
* ``color``: it changes colour after frame ``k``: ``what color did the square become ?`` -> a colour word.

Deterministic: video ``index`` of split ``split`` with seed ``seed`` is always the same (``np.random.SeedSequence``
of ``(seed, split id, index)``); the test split is ``test.jsonl`` (``seed`` 1234, ``per_type`` videos per question
type); its frames are regenerated from the record by :func:`video` (nothing else is stored).
``python -m vtprune.video_shapes OUT_DIR`` writes the test split.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .shapes import COLOR_NAMES, COLORS, SHAPES
from .shapes import load_split as load_split  # the same JSONL reader for both tasks

FRAMES = 8
CELL = 16  # pixels per grid cell = one visual token (one 16-pixel patch; the merger merges 1x1)
GRID = 4
FRAME_SIZE = CELL * GRID  # 64
OBJECT_SIZE = 12  # object extent in pixels, centred in its cell
QUESTION_TYPES = ("move", "appear", "disappear", "color")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
SPLITS = {"train": 0, "test": 1}
DEFAULT_SEED = 1234

SPECIAL_TOKENS = ("<pad>", "<|im_start|>", "<|im_end|>", "<unk>", "<|video_pad|>", "<|vision_start|>")
SPECIAL_TOKENS += ("<|vision_end|>", "<|image_pad|>")
ANSWER_WORDS = tuple(DIRECTIONS) + SHAPES + COLOR_NAMES
QUESTION_WORDS = ("user", "assistant", ":", "which", "way", "did", "the", "shape", "move", "appeared", "disappeared")
QUESTION_WORDS += ("what", "color", "become", "?")


def vocabulary() -> list[str]:
    """Special tokens, then the template / question words, then the answers (no duplicates)."""
    out: list[str] = []
    for w in SPECIAL_TOKENS + QUESTION_WORDS + ANSWER_WORDS:
        if w not in out:
            out.append(w)
    return out


@dataclass
class Track:
    """One object over the video: its shape, per-frame cell (row, col) and colour name, None where absent."""

    shape: str
    cells: list[tuple[int, int] | None]
    colors: list[str | None]


@dataclass
class Video:
    clutter_seed: int
    background: int
    tracks: list[Track]
    qtype: str
    question: str
    answer: str
    extra: dict = field(default_factory=dict)


def _check_split(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    return SPLITS[split]


def video_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), _check_split(split), int(index)]))


def make_video(rng: np.random.Generator, qtype: str) -> Video:
    """A random video whose event answers a question of type ``qtype`` (:data:`QUESTION_TYPES`)."""
    if qtype not in QUESTION_TYPES:
        raise ValueError(f"qtype must be one of {QUESTION_TYPES}, got {qtype!r}")
    colors = [COLOR_NAMES[i] for i in rng.permutation(len(COLOR_NAMES))[:4]]  # 3 objects + a new colour
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
    actor = 0  # the object of the event (shapes / colours are shuffled, so index 0 is random)
    cells: list[tuple[int, int]] = []
    path: list[tuple[int, int]] = []
    if qtype == "move":
        direction = list(DIRECTIONS)[int(rng.integers(4))]
        dr, dc = DIRECTIONS[direction]
        steps = int(rng.integers(2, 4))
        while True:  # a start from which the path stays on the grid
            r, c = (int(v) for v in rng.integers(0, GRID, size=2))
            if 0 <= r + dr * steps < GRID and 0 <= c + dc * steps < GRID:
                break
        path = [(r + dr * s, c + dc * s) for s in range(steps + 1)]
    free = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in path]
    picks = rng.permutation(len(free))[:3]
    cells = [free[int(i)] for i in picks]
    tracks = [Track(shapes[i], [cells[i]] * FRAMES, [colors[i]] * FRAMES) for i in range(3)]
    t = tracks[actor]
    k = int(rng.integers(2, 6))
    if qtype == "move":
        steps = len(path) - 1
        # step s happens at frame round(s * FRAMES / (steps + 1)): the first and last positions last the longest
        t.cells = [path[min(steps, f * (steps + 1) // FRAMES)] for f in range(FRAMES)]
        question, answer = f"which way did the {t.colors[0]} shape move ?", direction
    elif qtype == "appear":
        t.cells = [None] * k + t.cells[k:]
        t.colors = [None] * k + t.colors[k:]
        question, answer = "which shape appeared ?", t.shape
    elif qtype == "disappear":
        t.cells = t.cells[: FRAMES - k] + [None] * k
        t.colors = t.colors[: FRAMES - k] + [None] * k
        question, answer = "which shape disappeared ?", t.shape
    else:
        t.colors = [colors[0]] * (FRAMES - k) + [colors[3]] * k
        question, answer = f"what color did the {t.shape} become ?", colors[3]
    bg = int(rng.integers(90, 170))
    return Video(int(rng.integers(2**31)), bg, tracks, qtype, question, answer, {"k": k})


def sample(seed: int, split: str, index: int, qtype: str | None = None) -> Video:
    """Video ``index`` of ``split``; its question type cycles through :data:`QUESTION_TYPES` unless given."""
    rng = video_rng(seed, split, index)
    return make_video(rng, qtype or QUESTION_TYPES[index % len(QUESTION_TYPES)])


def _draw(draw: ImageDraw.ImageDraw, shape: str, color: str, cell: tuple[int, int]) -> None:
    r, c = cell
    x0, y0 = c * CELL + (CELL - OBJECT_SIZE) // 2, r * CELL + (CELL - OBJECT_SIZE) // 2
    x1, y1 = x0 + OBJECT_SIZE - 1, y0 + OBJECT_SIZE - 1
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def background(v: Video) -> Image.Image:
    """The static background: grey, with grey lines and dots (the same in every frame)."""
    rng = np.random.default_rng(v.clutter_seed)
    img = Image.new("RGB", (FRAME_SIZE, FRAME_SIZE), (v.background,) * 3)
    draw = ImageDraw.Draw(img)
    greys = [int(g) for g in np.clip(v.background + rng.choice([-60, -40, -25, 25, 40, 60], size=4), 0, 255)]
    for _ in range(int(rng.integers(3, 7))):
        x0, y0, x1, y1 = (int(p) for p in rng.integers(0, FRAME_SIZE, size=4))
        g = greys[int(rng.integers(4))]
        draw.line((x0, y0, x1, y1), fill=(g, g, g), width=1)
    for _ in range(int(rng.integers(10, 25))):
        x, y = (int(p) for p in rng.integers(0, FRAME_SIZE, size=2))
        g = greys[int(rng.integers(4))]
        draw.rectangle((x, y, x + 1, y + 1), fill=(g, g, g))
    return img


def frames(v: Video) -> np.ndarray:
    """The video as ``uint8 [FRAMES, FRAME_SIZE, FRAME_SIZE, 3]``."""
    bg = background(v)
    out = []
    for f in range(FRAMES):
        img = bg.copy()
        draw = ImageDraw.Draw(img)
        for t in v.tracks:
            if t.cells[f] is not None:
                _draw(draw, t.shape, t.colors[f], t.cells[f])
        out.append(np.asarray(img))
    return np.stack(out)


def cell_targets(v: Video) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth per merged token, ``int64 [FRAMES, GRID * GRID]`` each (raster order): colour index + 1
    (0: background) and shape index + 1 (0: background). Training-only (dense auxiliary losses)."""
    color = np.zeros((FRAMES, GRID * GRID), dtype=np.int64)
    shape = np.zeros_like(color)
    for f in range(FRAMES):
        for t in v.tracks:
            if t.cells[f] is not None:
                r, c = t.cells[f]
                color[f, r * GRID + c] = COLOR_NAMES.index(t.colors[f]) + 1
                shape[f, r * GRID + c] = SHAPES.index(t.shape) + 1
    return color, shape


def record(seed: int, split: str, index: int) -> dict:
    v = sample(seed, split, index)
    return {
        "id": f"video-shapes-{index:04d}",
        "seed": seed,
        "split": split,
        "index": index,
        "question": v.question,
        "answer": v.answer,
        "type": v.qtype,
    }


def video(doc: dict) -> np.ndarray:
    """The frames of a test record (regenerated from its seed, split and index)."""
    return frames(sample(int(doc["seed"]), doc["split"], int(doc["index"])))


def write_test_split(out_dir: str | Path, seed: int = DEFAULT_SEED, per_type: int = 50) -> Path:
    path = Path(out_dir) / "test.jsonl"
    with open(path, "w") as f:
        for i in range(per_type * len(QUESTION_TYPES)):
            f.write(json.dumps(record(seed, "test", i)) + "\n")
    return path


# Processor

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|im_start|> user : {% elif message['role'] == 'assistant' %}assistant : "
    "{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|> "
    "{% elif item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% elif item['type'] == 'text' %}{{ item['text'] }} {% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}<|im_end|> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
PATCH, MERGE, TEMPORAL = 16, 1, 1


def build_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(r"<\|[a-z_]+\|>", behavior="isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
        padding_side="left",
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor():
    """A ``Qwen2VLProcessor``: word-level tokenizer, 64x64-pixel frames at 16-pixel patches, merge size 1, one frame per
    temporal patch (16 tokens per frame). Built offline; ``save_pretrained`` / ``AutoProcessor`` round-trip it."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    pixels = FRAME_SIZE * FRAME_SIZE
    common = dict(
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
        size={"shortest_edge": pixels, "longest_edge": pixels},
    )
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**common),
        video_processor=Qwen2VLVideoProcessor(**common, do_sample_frames=False),
        tokenizer=build_tokenizer(),
        chat_template=CHAT_TEMPLATE,
    )


def model_config(
    width: int = 128, layers: int = 3, vision_width: int = 64, vision_layers: int = 2, rope_theta: float = 10000.0
):
    """The ``Qwen2VLConfig`` of the task's tiny video VLM (the bundled ``models/tiny-qwen2vl-video-shapes`` and the
    harness's ``random: qwen2_vl_video``): vision tower ``vision_layers`` x ``vision_width`` (16-pixel patches,
    merge size 1, temporal patch 1), LM ``layers`` x ``width`` (4 heads, MLP 2.5x, M-RoPE sections [4, 6, 6]
    for a 32-dim head, base ``rope_theta``), the task's word-level vocabulary. M-RoPE gives the row and column the
    lowest frequencies: at the default base one cell turns them by 0.1 rad at most, too little for a head to single
    out one cell; the bundled model uses a small base (``eval/train_tiny_video.py --rope-theta``)."""
    from transformers import Qwen2VLConfig

    tok = build_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vision = dict(
        depth=vision_layers,
        embed_dim=vision_width,
        hidden_size=width,
        num_heads=2,
        mlp_ratio=2,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
        in_channels=3,
    )
    text = dict(
        vocab_size=len(tok),
        hidden_size=width,
        intermediate_size=width * 5 // 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta), "mrope_section": [4, 6, 6]},
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<|im_end|>"],
        tie_word_embeddings=False,
    )
    return Qwen2VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def chat(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--per-type", type=int, default=50)
    a = p.parse_args(argv)
    print(write_test_split(a.out_dir, a.seed, a.per_type))


if __name__ == "__main__":
    main()
