"""lmms-eval glue of the vtprune_video_shapes task: visuals (one video per question), prompt, scoring.

``doc_to_visual`` returns ``[frames]``, ``frames`` a ``uint8`` array ``[8, 64, 64, 3]`` regenerated from the
record's ``(seed, split, index)`` by ``vtprune.video_shapes.video`` (a 4-D array is a video for vtprune's harness
model). A prediction is correct when its first word, lower-cased with punctuation removed, equals the answer;
``exact_match`` is the accuracy over all questions, ``<type>_acc`` over one type (move, appear, disappear, color),
NaN when the evaluated documents hold none of that type.
"""

from __future__ import annotations

import math
import re

import numpy as np

from vtprune.video_shapes import QUESTION_TYPES, video

_PUNCT = re.compile(r"[^\w\s]")


def doc_to_visual(doc: dict) -> list[np.ndarray]:
    return [video(doc)]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def first_word(text: str) -> str:
    words = _PUNCT.sub(" ", text.lower()).split()
    return words[0] if words else ""


def process_results(doc: dict, results: list[str]) -> dict:
    if doc["type"] not in QUESTION_TYPES:
        raise ValueError(f"question {doc.get('id')!r} has type {doc['type']!r}; expected one of {QUESTION_TYPES}")
    correct = float(first_word(results[0]) == doc["answer"])
    item = {"type": doc["type"], "correct": correct}
    return {"exact_match": correct, **{f"{t}_acc": item for t in QUESTION_TYPES}}


def _accuracy(items: list[dict], qtype: str) -> float:
    scores = [it["correct"] for it in items if it["type"] == qtype]
    return sum(scores) / len(scores) if scores else math.nan


def aggregate_move(items: list[dict]) -> float:
    return _accuracy(items, "move")


def aggregate_appear(items: list[dict]) -> float:
    return _accuracy(items, "appear")


def aggregate_disappear(items: list[dict]) -> float:
    return _accuracy(items, "disappear")


def aggregate_color(items: list[dict]) -> float:
    return _accuracy(items, "color")
