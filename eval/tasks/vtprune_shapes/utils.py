"""lmms-eval glue of the vtprune_shapes task: visuals, prompt, scoring.

A prediction is correct when its first word, lower-cased with punctuation removed, equals the answer (one
lowercase word). ``exact_match`` is the accuracy over all questions; ``<type>_acc`` over the questions of one
type (color, count, exists, position); NaN when the evaluated documents hold no question of that type.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from PIL import Image

TASK_DIR = Path(__file__).resolve().parent
QUESTION_TYPES = ("color", "count", "exists", "position")
_PUNCT = re.compile(r"[^\w\s]")


def doc_to_visual(doc: dict) -> list[Image.Image]:
    with Image.open(TASK_DIR / doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def normalize(text: str) -> str:
    """Lower-case, punctuation removed, whitespace collapsed."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def first_word(text: str) -> str:
    words = normalize(text).split()
    return words[0] if words else ""


def process_results(doc: dict, results: list[str]) -> dict:
    if doc["type"] not in QUESTION_TYPES:
        raise ValueError(f"question {doc.get('id')!r} has type {doc['type']!r}; expected one of {QUESTION_TYPES}")
    correct = float(first_word(results[0]) == normalize(doc["answer"]))
    item = {"type": doc["type"], "correct": correct}
    return {"exact_match": correct, **{f"{t}_acc": item for t in QUESTION_TYPES}}


def _accuracy(items: list[dict], qtype: str) -> float:
    scores = [it["correct"] for it in items if it["type"] == qtype]
    return sum(scores) / len(scores) if scores else math.nan


def aggregate_color(items: list[dict]) -> float:
    return _accuracy(items, "color")


def aggregate_count(items: list[dict]) -> float:
    return _accuracy(items, "count")


def aggregate_exists(items: list[dict]) -> float:
    return _accuracy(items, "exists")


def aggregate_position(items: list[dict]) -> float:
    return _accuracy(items, "position")
