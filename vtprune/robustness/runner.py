"""The model runner: the bundled model plain and patched, and batched predictions / selections."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .. import api, shapes
from ..methods.base import Selection
from ..registry import get_method
from .data import Item
from .perturbations import to_pil


class Stop(Exception):
    """Raised inside a method's ``select`` once the probe has what it needs: the rest of the forward is skipped."""


class Runner:
    """The bundled model twice (plain, and one to patch), the processor, and batched helpers. Images are
    ``[B, 3, H, W]`` in [0, 1]; the CLIP normalisation is applied here, differentiably."""

    def __init__(self, model_dir: str | Path, method_options: dict[str, dict] | None = None):
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.method_options = dict(method_options or {})
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"model folder {str(model_dir)!r} has no config.json (expected models/tiny-llava-shapes)")
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.plain = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
        self.pruned = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
        self.name = model_dir.name
        for m in (self.plain, self.pruned):
            m.requires_grad_(False)
        ip = self.processor.image_processor
        self.mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
        self.n_tokens = self.plain.config.image_seq_length
        self._text_cache: dict[tuple, dict] = {}

    def text_inputs(self, items: list[Item]) -> dict:
        """``input_ids`` / ``attention_mask`` (left padded) and the answer token ids of a batch."""
        key = tuple(it.id for it in items)
        if key not in self._text_cache:
            texts = [
                self.processor.apply_chat_template(shapes.chat(it.question), add_generation_prompt=True) for it in items
            ]
            images = [to_pil(it.image) for it in items]
            enc = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
            tok = self.processor.tokenizer
            answers = torch.tensor(tok.convert_tokens_to_ids([it.answer for it in items]))
            self._text_cache = {
                key: {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "answers": answers}
            }
        return self._text_cache[key]

    def forward(self, model, x: torch.Tensor, text: dict):
        return model(
            input_ids=text["input_ids"],
            attention_mask=text["attention_mask"],
            pixel_values=(x - self.mean) / self.std,
            logits_to_keep=1,
        )

    @contextlib.contextmanager
    def patch(self, method: str, budget: int):
        """The pruned model patched with ``method`` at ``keep=budget`` and the run's ``method_options`` for it."""
        spec = get_method(method)
        with api.patched(self.pruned, spec.make_config({"keep": budget, **self.method_options.get(method, {})})):
            yield self.pruned

    @contextlib.contextmanager
    def probe(self, fn: Callable):
        """Route every ``select`` call of the patched method at its first prune point through
        ``fn(original_select, image, call_index)``. A multi-point method (``pdrop``, ``sparsevlm``) is audited at its
        first point: its later points select as usual from what the first one kept."""
        method = getattr(self.pruned, api._ATTR).methods[0]
        original = method.select
        calls = [0]
        first = [None]  # the decoder layer of the first point seen in this forward (0: the vision entry)

        def select(image):
            if first[0] is None or calls[0] == 0:
                first[0] = image.layer
            if image.layer != first[0]:
                return original(image)
            i = calls[0]
            calls[0] += 1
            return fn(original, image, i)

        method.select = select
        try:
            yield calls
        finally:
            del method.select

    @torch.no_grad()
    def predict_plain(self, x: torch.Tensor, text: dict) -> torch.Tensor:
        return self.forward(self.plain, x, text).logits[:, -1].argmax(-1)

    @torch.no_grad()
    def predict_pruned(self, x: torch.Tensor, text: dict, override: list | None = None):
        """``(answer ids [B], kept index lists, select seconds)`` of the patched model; ``override``: per row, the
        kept indices to use instead of the method's."""
        b = x.shape[0]
        kept: list = [None] * b
        spent = [0.0]

        def fn(original, image, i):
            t0 = time.perf_counter()
            out = original(image)
            spent[0] += time.perf_counter() - t0
            if override is not None:
                out = torch.as_tensor(sorted(override[i]), dtype=torch.long)
            kept[i] = (out.kept if isinstance(out, Selection) else out).tolist()
            return out

        with self.probe(fn) as calls:
            preds = self.forward(self.pruned, x, text).logits[:, -1].argmax(-1)
        if calls[0] not in (0, b):
            raise RuntimeError(f"the method selected {calls[0]} times for a batch of {b} images")
        everything = list(range(self.n_tokens))
        return preds, [k if k is not None else everything for k in kept], spent[0]

    @torch.no_grad()
    def selections(self, x: torch.Tensor, text: dict) -> list:
        """Kept indices per row, from a forward stopped right after the selection."""
        b = x.shape[0]
        kept: list = [list(range(self.n_tokens))] * b

        def fn(original, image, i):
            out = original(image)
            kept[i] = (out.kept if isinstance(out, Selection) else out).tolist()
            if i == b - 1:
                raise Stop
            return out

        with self.probe(fn):
            try:
                self.forward(self.pruned, x, text)
            except Stop:
                pass
        return kept
