"""Robustness and security audit of visual-token pruning: ranking stability and the compression-aware attack.

"Less Is More — Until It Breaks: Security Pitfalls of Vision Token Compression in Large Vision-Language Models"
shows that tiny, imperceptible image perturbations reorder token importance, so the selection drops the tokens the
answer needs and the model fails only when compression is on. This module measures that, for every registered
method, on the bundled model (``models/tiny-llava-shapes``) and task (``eval/tasks/vtprune_shapes``), whose
generator (:mod:`vtprune.shapes`) knows which patches hold the objects a question is about:

* **Ranking stability** under benign perturbations (:data:`PERTURBATIONS`: Gaussian noise 2/255 and 4/255, JPEG
  quality 75, a 1-pixel shift, brightness +-5%): mean Jaccard overlap of the kept set with the clean image's kept
  set, and accuracy pruned / unpruned on the perturbed images.
* **Compression-aware attack** (CAA, white box, :func:`caa_attack`): PGD on the pixels in an L-infinity ball
  (default 4/255 and 8/255, 20 steps). Its objective pushes the question's critical tokens (:func:`critical_patches`)
  out of the kept set through the method's importance signal (a :class:`Surrogate` of the method's scores, read
  from the same signals the method reads, inside the patched model's own forward), while a penalty keeps the
  unpruned model's answer:
  ``J = - sum_{i in C} relu(s_i - tau + 0.1 sigma) / sigma - penalty * relu(margin - (z_y - max_{j != y} z_j))``
  (``z``: the unpruned model's logits, ``y`` the right answer), with ``s`` the
  surrogate scores, ``tau`` the k-th largest score among the non-critical tokens (the critical tokens all lie below
  it exactly when none of them is among the top k), ``sigma`` the scores' standard deviation (no gradient). The best
  iterate per question (largest ``J``) is kept and rounded to 8-bit pixels, which stays inside the ball.
* **Transfer attack** (black box): the perturbations crafted against one (method, budget) evaluated on every other
  (method, budget).
* **Defense** ``vote`` (:func:`vote_select`): the kept set is the ``k`` tokens the method keeps most often over the
  image and ``augmentations`` randomly augmented copies of it (Gaussian noise, a random shift of up to
  ``defense_shift`` pixels); evaluated the same way, with its selection time next to the undefended one. Its attack
  rows use the perturbations crafted against the undefended method (a non-adaptive attacker).

``attack_success``: among the questions that both the pruned and the unpruned model answer correctly on the clean
image, the share whose pruned answer is wrong under the perturbation while the unpruned answer stays right.
An answer is the argmax of the first generated token (the task's answers are one word = one token).

Surrogates (:data:`SURROGATES`, :func:`surrogate_for`): methods that rank by a score (``cls``, ``fastv``, the
dominant tokens of ``visionzip``) are attacked through that exact score; methods whose selection is greedy
diversity (``divprune``, ``todre``, ``zoo``), duplication (``dart``) or clustering (``pact``) through a
differentiable stand-in documented with each surrogate. A method registered later without its own surrogate is
attacked through the first signal it declares (text attention, CLS attention, features, hidden states); a method
that declares no image-dependent signal (``random``) cannot be attacked: its rows say so (``reachable: false`` and
the reason), they are not skipped.

Library entry point: :func:`run_robustness`; CLI: ``vtprune robustness [--config FILE] [--limit N]
[--output-dir DIR]``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import api, shapes
from .methods.base import ImageInputs, Selection
from .registry import get_method, list_methods

__all__ = [
    "RobustnessConfig", "load_config", "Surrogate", "SURROGATES", "surrogate_for", "PERTURBATIONS", "perturb",
    "Item", "load_items", "critical_patches", "Runner", "caa_attack", "vote_select", "jaccard", "run_robustness",
    "write_outputs", "DEFAULT_CONFIG",
]

#: the default run (a repository file: the bundled model and task are repository files, not package data)
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "robustness.yaml"

#: benign perturbations of the stability study (name -> description)
PERTURBATIONS = {
    "gauss2": "Gaussian noise, sigma 2/255",
    "gauss4": "Gaussian noise, sigma 4/255",
    "jpeg75": "JPEG, quality 75",
    "shift1": "1-pixel shift right and down (edge replicated)",
    "bright+5": "brightness +5%",
    "bright-5": "brightness -5%",
}


# -- config ------------------------------------------------------------------------------------------------------
@dataclass
class RobustnessConfig:
    """What :func:`run_robustness` measures. Paths are relative to the working directory (or, from
    :func:`load_config`, to the config file). ``methods`` None: every registered method; ``method_options`` maps a
    method name to options its config gets besides ``keep`` (e.g. ``{"pdrop": {"budget_kind": "last"}}``). ``epsilons`` and
    ``transfer_epsilon`` in units of 1/255; ``step_size`` None: ``2.5 * epsilon / steps`` (Madry et al.)."""

    model: str = "models/tiny-llava-shapes"
    task: str = "eval/tasks/vtprune_shapes"
    scene_seed: int = shapes.DEFAULT_SEED
    methods: list[str] | None = None
    method_options: dict[str, dict] = field(default_factory=dict)
    budgets: list[int] = field(default_factory=lambda: [64, 28, 13])
    perturbations: list[str] = field(default_factory=lambda: list(PERTURBATIONS))
    epsilons: list[int] = field(default_factory=lambda: [4, 8])
    steps: int = 20
    step_size: float | None = None
    penalty: float = 1.0
    margin: float = 2.0
    transfer_epsilon: int | None = 8
    defense_augmentations: int = 4
    defense_noise: float = 2.0
    defense_shift: int = 1
    defense_perturbations: list[str] = field(default_factory=lambda: ["gauss4", "caa"])
    limit: int | None = None
    batch_size: int = 16
    seed: int = 0
    threads: int | None = None

    def __post_init__(self):
        def ints(name, low, values):
            if not isinstance(values, list) or not values or any(
                    isinstance(v, bool) or not isinstance(v, int) or v < low for v in values):
                raise ValueError(f"{name} must be a non-empty list of ints >= {low}, got {values!r}")

        def one_int(name, value, low, optional=False):
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}{' or None' if optional else ''}, got {value!r}")

        ints("budgets", 1, self.budgets)
        ints("epsilons", 1, self.epsilons)
        one_int("steps", self.steps, 1)
        one_int("limit", self.limit, 1, optional=True)
        one_int("batch_size", self.batch_size, 1)
        one_int("seed", self.seed, 0)
        one_int("scene_seed", self.scene_seed, 0)
        one_int("defense_augmentations", self.defense_augmentations, 1)
        one_int("defense_shift", self.defense_shift, 0)
        one_int("threads", self.threads, 1, optional=True)
        one_int("transfer_epsilon", self.transfer_epsilon, 1, optional=True)
        if self.transfer_epsilon is not None and self.transfer_epsilon not in self.epsilons:
            raise ValueError(f"transfer_epsilon={self.transfer_epsilon} must be one of epsilons {self.epsilons} "
                             "(the transfer attack reuses those perturbations), or None (no transfer matrix)")
        for name in ("penalty", "margin", "defense_noise"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.step_size is not None and (isinstance(self.step_size, bool) or not isinstance(
                self.step_size, (int, float)) or not 0 < self.step_size < math.inf):
            raise ValueError(f"step_size must be a number > 0 (units of 1/255) or None, got {self.step_size!r}")
        unknown = [p for p in self.perturbations if p not in PERTURBATIONS]
        if not isinstance(self.perturbations, list) or unknown:
            raise ValueError(f"unknown perturbation(s) {unknown or self.perturbations!r}; "
                             f"allowed: {list(PERTURBATIONS)}")
        bad = [p for p in self.defense_perturbations if p != "caa" and p not in self.perturbations]
        if bad:
            raise ValueError(f"defense_perturbations {bad} are not among perturbations {self.perturbations} "
                             "(or 'caa')")
        if self.methods is not None:
            if not isinstance(self.methods, list) or not self.methods:
                raise ValueError(f"methods must be a non-empty list of method names or None (every registered "
                                 f"method), got {self.methods!r}")
            for m in self.methods:
                get_method(m)  # unknown names raise ValueError with suggestions
        if not isinstance(self.method_options, dict):
            raise ValueError(f"method_options must be a mapping of method name -> options, got "
                             f"{self.method_options!r}")
        for m, options in self.method_options.items():
            spec = get_method(m)
            if not isinstance(options, dict) or {"keep", "ratio"} & set(options):
                raise ValueError(f"method_options[{m!r}] must be a mapping of {m}'s options other than keep / ratio "
                                 f"(the budgets set keep), got {options!r}")
            spec.make_config({"keep": self.budgets[0], **options})  # unknown / bad options raise here

    def method_names(self) -> list[str]:
        return list(self.methods) if self.methods is not None else list_methods()


def load_config(path: str | Path | None = None, **overrides) -> RobustnessConfig:
    """A :class:`RobustnessConfig` from a YAML file (default :data:`DEFAULT_CONFIG`); ``model`` and ``task`` are
    resolved against the file's folder. Unknown keys raise ``ValueError`` naming the allowed ones."""
    import yaml

    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ValueError(f"robustness config {str(path)!r} not found (the default run uses the repository's "
                         "configs/robustness.yaml, models/ and eval/tasks/: run it from a clone)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of options, got {type(data).__name__}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    allowed = {f.name for f in fields(RobustnessConfig)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {unknown}; allowed: {sorted(allowed)}")
    for key in ("model", "task"):
        if key in data:
            p = Path(data[key])
            data[key] = str(p if p.is_absolute() else (path.parent / p).resolve())
    return RobustnessConfig(**data)


# -- surrogates ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Surrogate:
    """A differentiable importance signal of a method: ``scores(method, image) -> [n]`` (higher: more likely kept),
    computed from the :class:`~vtprune.methods.base.ImageInputs` the method itself receives. ``exact``: the method
    keeps the top-k of these scores (only the top-k itself is not differentiable)."""

    name: str
    description: str
    scores: Callable[[object, ImageInputs], torch.Tensor]
    exact: bool = False


def _cls_scores(method, image: ImageInputs) -> torch.Tensor:
    from .methods.base import crop_importance

    return image.pack_crop_scores(crop_importance(image))  # CLS rows, or received attention (importance option)


def _text_attention(method, image: ImageInputs) -> torch.Tensor:
    return image.text_attention.mean(dim=0)[image.image_start: image.image_start + image.n]


def _isolation(x: torch.Tensor) -> torch.Tensor:
    """``1 - max_{j != i} cos(x_i, x_j)``: distance to the nearest neighbour (greedy k-center takes isolated
    tokens first; DivPrune's first pick is the most isolated one)."""
    u = torch.nn.functional.normalize(x.float(), dim=-1)
    sim = u @ u.T
    sim = sim - 3.0 * torch.eye(sim.shape[0], device=sim.device)
    return 1.0 - sim.max(dim=1).values


def _feature_isolation(method, image: ImageInputs) -> torch.Tensor:
    return _isolation(image.features)


def _hidden_isolation(method, image: ImageInputs) -> torch.Tensor:
    return _isolation(image.hidden[image.image_start: image.image_start + image.n])


def _key_isolation(method, image: ImageInputs) -> torch.Tensor:
    return _isolation(image.keys[image.image_start: image.image_start + image.n])


def _dpp_gain(method, image: ImageInputs) -> torch.Tensor:
    """CDPruner's first greedy-MAP gain is ``L_ii = r_i^2`` and every later one ``r_i^2`` times the part of token i
    not explained by the picked tokens: ``r^2 * (1 - max cos to a neighbour)`` with ``r`` its relevance (``text="llm"``:
    to the prompt's LLM embeddings; ``"clip"``: read from the CLIP joint space without gradient, so 1 here)."""
    from . import functional as F

    text = image.extra.get("prompt_embeds")
    rel = (F.cdpruner_relevance(image.features.float(), text.float()) if text is not None and text.shape[0]
           else image.features.new_ones(image.n, dtype=torch.float32))
    return rel.pow(2) * _isolation(image.features)


def _dart_duplication(method, image: ImageInputs) -> torch.Tensor:
    cfg = method.config
    start, n = image.image_start, image.n
    l1 = image.keys.detach().float().abs().sum(-1)
    img_piv = l1[start:start + n].topk(min(cfg.image_pivots, n)).indices + start
    after = l1[start + n:]
    txt_piv = after.topk(min(cfg.text_pivots, after.numel())).indices + start + n
    normed = torch.nn.functional.normalize(image.final_norm(image.hidden).float(), dim=-1)
    cos = normed[start:start + n] @ normed[torch.cat([img_piv, txt_piv])].T  # [n, pivots]
    return -cos.min(dim=1).values


SURROGATES: dict[str, Surrogate] = {
    "cls": Surrogate("cls-attention", "the method's own score: CLS attention summed over its vision layers",
                     _cls_scores, exact=True),
    "fastv": Surrogate("text-attention", "the method's own score: head-mean attention of the last prompt token at "
                       "layer K-1 (debias weights, when on, are not applied)", _text_attention, exact=True),
    "visionzip": Surrogate("cls-attention", "the score of its dominant tokens (CLS attention of its layer); the "
                           "contextual merge of the rest is not attacked", _cls_scores),
    "divprune": Surrogate("feature-isolation", "greedy k-center on the projected features -> each token's cosine "
                          "distance to its nearest neighbour (the quantity k-center maximises)", _feature_isolation),
    "todre": Surrogate("feature-isolation", "greedy k-center from the top-CLS pivot -> cosine distance to the "
                       "nearest neighbour among the features (the pivot choice is not attacked)", _feature_isolation),
    "zoo": Surrogate("feature-isolation", "its diversity term (1 - max cos to the selected) -> cosine distance to "
                     "the nearest neighbour; the sensitivity term reads the projector input, which the engine hands "
                     "over without gradient, and is not attacked", _feature_isolation),
    "dart": Surrogate("pivot-duplication", "tokens least cosine-similar to a pivot are kept -> minus the lowest "
                      "cosine similarity of the (final-normed) hidden state to the key-norm pivots (pivot choice "
                      "held fixed)", _dart_duplication),
    "pdrop": Surrogate("layer-attention", "the method's own score at its first point: head-mean attention of the last "
                       "prompt token at that layer, recomputed on its input (later points are not attacked)",
                       _text_attention, exact=True),
    "cdpruner": Surrogate("dpp-gain", "greedy DPP MAP -> each token's squared relevance to the prompt times its "
                          "cosine distance to the nearest neighbour (its marginal gain against its closest "
                          "competitor)", _dpp_gain),
    "pact": Surrogate("key-isolation", "density-peak clustering of the keys keeps isolated tokens as their own "
                      "centres -> cosine distance of each key to its nearest neighbour", _key_isolation),
}

#: the signal-level stand-ins for methods without their own surrogate, tried in this order
_BY_SIGNAL = (
    ("text_attention", Surrogate("text-attention", "declared signal text_attention: head-mean attention of the "
                                 "last prompt token over the image tokens", _text_attention)),
    ("cls_attention", Surrogate("cls-attention", "declared signal cls_attention: CLS attention summed over the "
                                "method's vision layers", _cls_scores)),
    ("features", Surrogate("feature-isolation", "declared signal features: cosine distance to the nearest "
                           "neighbour", _feature_isolation)),
    ("hidden", Surrogate("hidden-isolation", "declared signal hidden: cosine distance of the hidden states to the "
                         "nearest neighbour", _hidden_isolation)),
)

_UNREACHABLE = {
    "random": "its kept set depends only on its seed and the token count, never on the image: no perturbation can "
              "change it",
}


def surrogate_for(method: str) -> tuple[Surrogate | None, str | None]:
    """``(surrogate, None)`` for a method the attack can reach, else ``(None, reason)``."""
    spec = get_method(method)
    if method in _UNREACHABLE:
        return None, _UNREACHABLE[method]
    if method in SURROGATES:
        return SURROGATES[method], None
    for signal, surrogate in _BY_SIGNAL:
        if signal in spec.method_cls.signals:
            return surrogate, None
    return None, (f"it declares no image-dependent signal a gradient can reach (signals: "
                  f"{sorted(spec.method_cls.signals) or 'none'})")


# -- data ------------------------------------------------------------------------------------------------------------
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
                raise ValueError(f"{row['image']} is not scene {index} of seed {scene_seed}: the generator cannot "
                                 "say which patches hold its objects (pass the scene_seed the split was written with)")
            scenes[index] = (scene, torch.from_numpy(stored.copy()).permute(2, 0, 1).float() / 255)
        scene, image = scenes[index]
        items.append(Item(row["id"], image, row["question"], row["answer"], row["type"],
                          critical_patches(scene, row["question"])))
    return items


# -- perturbations --------------------------------------------------------------------------------------------------
def _to_pil(x: torch.Tensor):
    from PIL import Image

    return Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def _from_pil(im) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float() / 255


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to 8-bit levels (an image that can be saved as a PNG)."""
    return (x.clamp(0, 1) * 255).round() / 255


def perturb(x: torch.Tensor, name: str, generator: torch.Generator) -> torch.Tensor:
    """The benign perturbation ``name`` (:data:`PERTURBATIONS`) of an image ``[3, H, W]`` in [0, 1]; the result is
    8-bit quantized. ``generator`` seeds the noise."""
    from PIL import ImageEnhance

    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; allowed: {list(PERTURBATIONS)}")
    if name.startswith("gauss"):
        sigma = int(name[5:]) / 255
        return quantize(x + sigma * torch.randn(x.shape, generator=generator))
    if name == "jpeg75":
        buf = io.BytesIO()
        _to_pil(x).save(buf, format="JPEG", quality=75)
        buf.seek(0)
        from PIL import Image

        with Image.open(buf) as im:
            return _from_pil(im)
    if name == "shift1":
        return quantize(_shift(x, 1, 1))
    factor = 1.05 if name == "bright+5" else 0.95
    return _from_pil(ImageEnhance.Brightness(_to_pil(x)).enhance(factor))


def _shift(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Shift content right by ``dx`` and down by ``dy`` pixels (negative: left / up), replicating the edge."""
    h, w = x.shape[-2:]
    rows = (torch.arange(h) - dy).clamp(0, h - 1)
    cols = (torch.arange(w) - dx).clamp(0, w - 1)
    return x[..., rows, :][..., cols]


def jaccard(a, b) -> float:
    """``|A & B| / |A | B|`` of two index sets (1.0 for two empty sets)."""
    a, b = set(map(int, a)), set(map(int, b))
    return len(a & b) / len(a | b) if a | b else 1.0


# -- the model runner -------------------------------------------------------------------------------------------------
class _Stop(Exception):
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
            texts = [self.processor.apply_chat_template(shapes.chat(it.question), add_generation_prompt=True)
                     for it in items]
            images = [_to_pil(it.image) for it in items]
            enc = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
            tok = self.processor.tokenizer
            answers = torch.tensor(tok.convert_tokens_to_ids([it.answer for it in items]))
            self._text_cache = {key: {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                      "answers": answers}}
        return self._text_cache[key]

    def forward(self, model, x: torch.Tensor, text: dict):
        return model(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                     pixel_values=(x - self.mean) / self.std, logits_to_keep=1)

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
                raise _Stop
            return out

        with self.probe(fn):
            try:
                self.forward(self.pruned, x, text)
            except _Stop:
                pass
        return kept


# -- the attack ----------------------------------------------------------------------------------------------------
def _push_loss(scores: torch.Tensor, critical: list[int], k: int) -> torch.Tensor:
    """``sum_{i in C} relu(s_i - tau + 0.1 sigma) / sigma``: zero once every critical score lies 0.1 sigma below the
    k-th largest non-critical score ``tau``."""
    s = scores.float()
    n = s.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=s.device)
    mask[critical] = True
    others = s[~mask]
    if not critical or others.numel() < k:
        return s.sum() * 0.0
    tau = others.topk(k).values[-1]
    sigma = s.detach().std().clamp_min(1e-12)
    return torch.relu(s[mask] - tau + 0.1 * sigma).sum() / sigma


def caa_objective(runner: Runner, x: torch.Tensor, text: dict, items: list[Item], surrogate: Surrogate,
                  budget: int, penalty: float, margin: float = 2.0) -> torch.Tensor:
    """Per-row attack objective ``J [B]`` (differentiable in ``x``): minus the push loss of the critical tokens
    through ``surrogate``, minus ``penalty`` times the unpruned model's :func:`answer_hinge` (it must keep its right
    answer by ``margin`` logits). The
    patched forward stops right after the selection. A budget that keeps every token leaves no selection: the push
    term is 0."""
    b = x.shape[0]
    push = [x.new_zeros(())] * b

    def fn(original, image, i):
        push[i] = _push_loss(surrogate.scores(method, image), items[i].critical, image.k)
        if i == b - 1:
            raise _Stop
        return torch.arange(image.k)

    method = getattr(runner.pruned, api._ATTR).methods[0]
    with runner.probe(fn):
        try:
            runner.forward(runner.pruned, x, text)
        except _Stop:
            pass
    return -torch.stack(push) - penalty * answer_hinge(runner.forward(runner.plain, x, text).logits[:, -1],
                                                         text["answers"], margin)


def answer_hinge(logits: torch.Tensor, answers: torch.Tensor, margin: float) -> torch.Tensor:
    """``relu(margin - (z_y - max_{j != y} z_j))`` per row (Carlini-Wagner): 0 while the right answer leads every
    other token by ``margin`` logits."""
    z = logits.float()
    right = z.gather(1, answers[:, None]).squeeze(1)
    other = z.scatter(1, answers[:, None], -math.inf).max(dim=1).values
    return torch.relu(margin - (right - other))


def caa_attack(runner: Runner, items: list[Item], method: str, budget: int, epsilon: float, steps: int = 20,
               step_size: float | None = None, penalty: float = 1.0, margin: float = 2.0,
               x0: torch.Tensor | None = None):
    """Compression-aware PGD against ``method`` at ``keep=budget`` (the runner's ``pruned`` model is patched here).

    ``epsilon`` and ``step_size`` in [0, 1] pixel units (``step_size`` None: ``2.5 * epsilon / steps``). Returns
    ``(x_adv [B, 3, H, W], objective history [steps + 1, B])``: the best iterate per row, 8-bit quantized (inside
    the ball: the clean image is on the 8-bit grid), and the objective at the start and after each step. Raises
    ``ValueError`` for a method the attack cannot reach (:func:`surrogate_for`)."""
    surrogate, reason = surrogate_for(method)
    if surrogate is None:
        raise ValueError(f"the compression-aware attack cannot reach {method!r}: {reason}")
    if not (isinstance(epsilon, (int, float)) and 0 < epsilon <= 1):
        raise ValueError(f"epsilon must be in (0, 1] (pixel units; 8/255 = {8 / 255:.4f}), got {epsilon!r}")
    alpha = 2.5 * epsilon / steps if step_size is None else step_size
    x0 = torch.stack([it.image for it in items]) if x0 is None else x0
    text = runner.text_inputs(items)
    delta = torch.zeros_like(x0)
    best, best_obj = delta.clone(), torch.full((x0.shape[0],), -math.inf)
    history = []
    with runner.patch(method, budget):
        for step in range(steps + 1):
            d = delta.clone().requires_grad_(True)
            with torch.enable_grad():
                obj = caa_objective(runner, x0 + d, text, items, surrogate, budget, penalty, margin)
            history.append(obj.detach())
            better = obj.detach() > best_obj
            best[better], best_obj = delta[better], torch.maximum(best_obj, obj.detach())
            if step == steps:
                break
            (grad,) = torch.autograd.grad(obj.sum(), d)
            delta = (delta + alpha * grad.sign()).clamp(-epsilon, epsilon)
            delta = (x0 + delta).clamp(0, 1) - x0
    x_adv = quantize(x0 + best)
    return x_adv, torch.stack(history)


# -- the defense ---------------------------------------------------------------------------------------------------
def vote_select(runner: Runner, x: torch.Tensor, text: dict, budget: int, augmentations: int, noise: float,
                shift: int, generator: torch.Generator) -> list[list[int]]:
    """Per row, the ``budget`` tokens the patched method keeps most often over ``x`` and ``augmentations`` copies
    of it (Gaussian noise of ``noise`` pixel units, a random shift of up to ``shift`` pixels each way); ties go to
    tokens kept on ``x`` itself, then to the lower index."""
    b = x.shape[0]
    runs = [runner.selections(x, text)]
    for _ in range(augmentations):
        dx, dy = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=generator))
        xa = quantize(_shift(x, dx, dy) + noise * torch.randn(x.shape, generator=generator))
        runs.append(runner.selections(xa, text))
    voted = []
    for i in range(b):
        counts = torch.zeros(runner.n_tokens)
        for run in runs:
            counts[run[i]] += 1
        own = torch.zeros(runner.n_tokens)
        own[runs[0][i]] = 0.5
        key = counts + own - torch.arange(runner.n_tokens) * 1e-6
        k = min(budget, runner.n_tokens)
        voted.append(sorted(key.topk(k).indices.tolist()))
    return voted


# -- the run -----------------------------------------------------------------------------------------------------------
def _batches(items: list, size: int):
    return [items[i:i + size] for i in range(0, len(items), size)]


@dataclass
class _Tally:
    """Per-question outcomes of one (method, budget, perturbation[, defense]) cell."""

    jaccard: list = field(default_factory=list)
    pruned: list = field(default_factory=list)
    unpruned: list = field(default_factory=list)
    select_s: float = 0.0

    def add(self, kept, clean_kept, pred, plain_pred, answers):
        self.jaccard += [jaccard(a, b) for a, b in zip(kept, clean_kept)]
        self.pruned += (pred == answers).tolist()
        self.unpruned += (plain_pred == answers).tolist()


def _row(model, method, budget, perturbation, tally: _Tally, clean: _Tally | None, **extra) -> dict:
    n = len(tally.pruned)
    row = {"model": model, "method": method, "budget": budget, "perturbation": perturbation}
    row.update({k: v for k, v in extra.items() if k not in ("reachable", "reason")})
    row["kept_jaccard"] = sum(tally.jaccard) / n if n else None
    row["accuracy"] = sum(tally.pruned) / n if n else None
    row["accuracy_unpruned"] = sum(tally.unpruned) / n if n else None
    if clean is not None and n:
        attackable = [i for i in range(n) if clean.pruned[i] and clean.unpruned[i]]
        hits = [not tally.pruned[i] and tally.unpruned[i] for i in attackable]
        row["attack_success"] = sum(hits) / len(attackable) if attackable else None
        row["n_attackable"] = len(attackable)
    else:
        row["attack_success"] = None
    row["n"] = n
    row["reachable"] = extra.get("reachable", True)
    if extra.get("reason"):
        row["reason"] = extra["reason"]
    return row


def run_robustness(config: RobustnessConfig | None = None, *, output_dir: str | Path | None = None,
                   progress: bool = True, write: bool = True) -> list[dict]:
    """Run the audit of ``config`` (default: :data:`DEFAULT_CONFIG`) and, with ``write``, write ``results.jsonl``,
    ``table.md`` / ``table.csv``, ``transfer.csv`` and the plots to ``output_dir`` (default
    ``eval/results/robustness``). Returns the result rows. ``progress=False`` silences every progress bar
    (transformers' included)."""
    from .progress import progress_bars

    with progress_bars(progress):
        return _run_robustness(config, output_dir, progress, write)


def _run_robustness(config, output_dir, progress, write) -> list[dict]:
    from tqdm import tqdm

    from .timing import num_threads

    cfg = config if config is not None else load_config()
    methods = cfg.method_names()
    with num_threads(cfg.threads):
        runner = Runner(cfg.model, cfg.method_options)
        items = load_items(cfg.task, cfg.scene_seed, cfg.limit)
        batches = _batches(items, cfg.batch_size)
        cannot = {}  # method -> why it cannot run on this model (reported in its rows, not skipped silently)
        for m in methods:
            try:
                with runner.patch(m, cfg.budgets[0]):
                    pass
            except (ValueError, TypeError) as err:
                cannot[m] = f"cannot patch {runner.name}: {err}"
        cells = [(m, b) for m in methods for b in cfg.budgets if m not in cannot]
        transfer = cfg.transfer_epsilon is not None
        bar = tqdm(total=len(cells) * len(batches) * (4 if transfer else 3), desc="vtprune robustness",
                   unit="step", disable=not progress)
        gen = torch.Generator().manual_seed(cfg.seed)
        data = []  # per batch: items, text inputs, images per perturbation, unpruned predictions
        for batch in batches:
            x = torch.stack([it.image for it in batch])
            text = runner.text_inputs(batch)
            images = {"none": x, **{p: torch.stack([perturb(xi, p, gen) for xi in x]) for p in cfg.perturbations}}
            data.append({"items": batch, "text": text, "images": images,
                         "plain": {p: runner.predict_plain(xp, text) for p, xp in images.items()}})
        answers_all = torch.cat([d["text"]["answers"] for d in data])
        plain_clean = (torch.cat([d["plain"]["none"] for d in data]) == answers_all).tolist()
        perts = ["none", *cfg.perturbations]
        rows: list[dict] = []
        out = Path(output_dir) if output_dir is not None else Path("eval/results/robustness")
        partial = out / "results.partial.jsonl"  # rows so far, one cell at a time (removed when the run ends)
        if write:
            out.mkdir(parents=True, exist_ok=True)
            partial.write_text("")
        adv: dict[tuple, list] = {}  # (method, budget) -> per batch, the 8-bit CAA images at transfer_epsilon
        clean_pruned: dict[tuple, list] = {}
        done = 0
        for method, budget in cells:
            surrogate, reason = surrogate_for(method)
            base = {"surrogate": surrogate.name if surrogate else None}
            tallies = {p: _Tally() for p in perts}
            clean_kept = []
            with runner.patch(method, budget):
                for d in data:
                    text = d["text"]
                    _, kept0, _ = runner.predict_pruned(d["images"]["none"], text)
                    clean_kept.append(kept0)
                    for p in perts:
                        pred, kept, spent = runner.predict_pruned(d["images"][p], text)
                        tallies[p].add(kept, kept0, pred, d["plain"][p], text["answers"])
                        tallies[p].select_s += spent
                    bar.update(1)
            clean_pruned[(method, budget)] = tallies["none"].pruned
            # the compression-aware attack
            caa = {e: _Tally() for e in cfg.epsilons}
            adv_images = {e: [] for e in cfg.epsilons}
            for i, d in enumerate(data):
                text = d["text"]
                for e in cfg.epsilons if surrogate is not None else []:
                    step = None if cfg.step_size is None else cfg.step_size / 255
                    x_adv, _ = caa_attack(runner, d["items"], method, budget, e / 255, cfg.steps, step, cfg.penalty,
                                          cfg.margin, x0=d["images"]["none"])
                    plain_pred = runner.predict_plain(x_adv, text)
                    with runner.patch(method, budget):
                        pred, kept, _ = runner.predict_pruned(x_adv, text)
                    caa[e].add(kept, clean_kept[i], pred, plain_pred, text["answers"])
                    adv_images[e].append((x_adv, plain_pred))
                bar.update(1)
            if transfer and surrogate is not None:
                adv[(method, budget)] = [((x * 255).round().to(torch.uint8), pp)
                                         for x, pp in adv_images[cfg.transfer_epsilon]]
            # the defense, on the clean, benign and attacked images
            defended: dict[str, _Tally] = {}
            with runner.patch(method, budget):
                for i, d in enumerate(data):
                    voted_clean = None
                    text = d["text"]
                    inputs = {p: (d["images"][p], d["plain"][p]) for p in ["none", *cfg.defense_perturbations]
                              if p != "caa"}
                    if "caa" in cfg.defense_perturbations:
                        inputs.update({f"caa{e}": adv_images[e][i] for e in cfg.epsilons if adv_images[e]})
                    for key, (x, plain_pred) in inputs.items():
                        t0 = time.perf_counter()
                        voted = vote_select(runner, x, text, budget, cfg.defense_augmentations,
                                            cfg.defense_noise / 255, cfg.defense_shift, gen)
                        spent = time.perf_counter() - t0
                        pred, kept, _ = runner.predict_pruned(x, text, override=voted)
                        voted_clean = kept if key == "none" else voted_clean  # "none" comes first
                        tally = defended.setdefault(key, _Tally())
                        tally.add(kept, voted_clean, pred, plain_pred, text["answers"])
                        tally.select_s += spent
                    bar.update(1)
            # rows
            n = len(items)
            select_ms = 1000 * tallies["none"].select_s / n
            for p in perts:
                rows.append(_row(runner.name, method, budget, p, tallies[p], tallies["none"],
                                 select_ms=1000 * tallies[p].select_s / n, **base))
            for e in cfg.epsilons:
                if surrogate is None:
                    rows.append(_row(runner.name, method, budget, "caa", _Tally(), None, epsilon=e,
                                     reachable=False, reason=reason, **base))
                else:
                    rows.append(_row(runner.name, method, budget, "caa", caa[e], tallies["none"], epsilon=e,
                                     steps=cfg.steps, penalty=cfg.penalty, margin=cfg.margin, **base))
            for key, tally in defended.items():
                pert, extra = ("caa", {"epsilon": int(key[3:])}) if key.startswith("caa") else (key, {})
                rows.append(_row(runner.name, method, budget, pert, tally, defended["none"], defense="vote",
                                 augmentations=cfg.defense_augmentations, select_ms=select_ms,
                                 defense_select_ms=1000 * tally.select_s / n, **extra, **base))
            if write:
                with partial.open("a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows[done:])
            done = len(rows)
        # the transfer matrix: every source's perturbations on every target
        for method, budget in cells if transfer else []:
            tallies = {s: _Tally() for s in adv}
            with runner.patch(method, budget):
                for i, d in enumerate(data):
                    text = d["text"]
                    _, kept0, _ = runner.predict_pruned(d["images"]["none"], text)
                    for s, per_batch in adv.items():
                        x8, plain_pred = per_batch[i]
                        pred, kept, _ = runner.predict_pruned(x8.float() / 255, text)
                        tallies[s].add(kept, kept0, pred, plain_pred, text["answers"])
                    bar.update(1)
            clean = _Tally(pruned=clean_pruned[(method, budget)], unpruned=plain_clean)
            for s, tally in tallies.items():
                rows.append(_row(runner.name, method, budget, "transfer", tally, clean, epsilon=cfg.transfer_epsilon,
                                 source_method=s[0], source_budget=s[1]))
        bar.close()
    for m, why in cannot.items():
        rows += [{"model": runner.name, "method": m, "budget": b, "perturbation": p, **({"epsilon": e} if e else {}),
                  "kept_jaccard": None, "accuracy": None, "accuracy_unpruned": None, "attack_success": None, "n": 0,
                  "reachable": False, "reason": why}
                 for b in cfg.budgets for p, e in [("none", None), *[("caa", e) for e in cfg.epsilons]]]
    for row in rows:
        row["limit"] = cfg.limit
    if write:
        write_outputs(rows, out, cfg)
        partial.unlink()
    return rows


# -- outputs -------------------------------------------------------------------------------------------------------
def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _md(headers, body) -> str:
    from .cli import format_table

    return format_table(headers, body)


def summary_rows(rows: list[dict]) -> list[dict]:
    """One row per (method, budget): clean accuracy, mean benign Jaccard, accuracy and attack success under each
    epsilon of the CAA, and the defense's numbers (the CSV's rows)."""
    cells: dict[tuple, dict] = {}
    for r in rows:
        if r["perturbation"] == "transfer":
            continue
        c = cells.setdefault((r["method"], r["budget"]), {"method": r["method"], "budget": r["budget"]})
        d = "vote_" if r.get("defense") else ""
        p = r["perturbation"]
        if p == "none":
            c[f"{d}accuracy_clean"] = r["accuracy"]
            c["accuracy_unpruned_clean"] = r["accuracy_unpruned"]
            c[f"{d}select_ms"] = r.get("defense_select_ms" if d else "select_ms")
            c["surrogate"] = r.get("surrogate")
        elif p == "caa":
            e = r["epsilon"]
            c[f"{d}caa{e}_accuracy"] = r["accuracy"]
            c[f"{d}caa{e}_accuracy_unpruned"] = r["accuracy_unpruned"]
            c[f"{d}caa{e}_success"] = r["attack_success"]
            c[f"{d}caa{e}_jaccard"] = r["kept_jaccard"]
            if not r.get("reachable", True):
                c["unreachable"] = r.get("reason")
        else:
            c.setdefault(f"{d}_benign", []).append(r["kept_jaccard"])
            c[f"{d}{p}_jaccard"] = r["kept_jaccard"]
            c[f"{d}{p}_accuracy"] = r["accuracy"]
    out = []
    for c in cells.values():
        for d in ("", "vote_"):
            js = c.pop(f"{d}_benign", [])
            c[f"{d}benign_jaccard"] = sum(js) / len(js) if js else None
        out.append(c)
    return out


def transfer_matrix(rows: list[dict]) -> tuple[list[str], list[str], dict]:
    """``(sources, targets, cells)``: attack success of the perturbations crafted against each source
    ``method@budget`` on each target ``method@budget``."""
    t = [r for r in rows if r["perturbation"] == "transfer"]
    sources = list(dict.fromkeys(f"{r['source_method']}@{r['source_budget']}" for r in t))
    targets = list(dict.fromkeys(f"{r['method']}@{r['budget']}" for r in t))
    cells = {(f"{r['source_method']}@{r['source_budget']}", f"{r['method']}@{r['budget']}"): r["attack_success"]
             for r in t}
    return sources, targets, cells


def render_markdown(rows: list[dict], cfg: RobustnessConfig | None = None) -> str:
    summary = summary_rows(rows)
    perts = list(dict.fromkeys(r["perturbation"] for r in rows
                               if r["perturbation"] not in ("none", "caa", "transfer") and not r.get("defense")))
    eps = sorted({r["epsilon"] for r in rows if r["perturbation"] == "caa"})
    n = next((r["n"] for r in rows if r["perturbation"] == "none"), 0)
    parts = [f"Questions: {n}. Accuracy and attack success in %; Jaccard of the kept set with the clean image's.", ""]
    parts += ["### Ranking stability (kept-set Jaccard) and accuracy under benign perturbations", ""]
    body = []
    for c in summary:
        body.append([c["method"], c["budget"], _pct(c.get("accuracy_clean")),
                     *[f"{c.get(f'{p}_jaccard'):.3f}" if c.get(f"{p}_jaccard") is not None else "-" for p in perts],
                     f"{c['benign_jaccard']:.3f}" if c.get("benign_jaccard") is not None else "-",
                     *[_pct(c.get(f"{p}_accuracy")) for p in perts]])
    unpruned = [r for r in rows if r["perturbation"] in ("none", *perts) and not r.get("defense")]
    acc_un = {r["perturbation"]: r["accuracy_unpruned"] for r in unpruned}
    body.insert(0, ["unpruned", "-", _pct(acc_un.get("none")), *["1.000"] * len(perts), "1.000",
                    *[_pct(acc_un.get(p)) for p in perts]])
    parts.append(_md(["method", "budget", "acc clean", *[f"J {p}" for p in perts], "J mean",
                      *[f"acc {p}" for p in perts]], body))
    parts += ["", "### Compression-aware attack (white box, PGD through the method's surrogate)", ""]
    body = []
    for c in summary:
        if c.get("unreachable"):
            body.append([c["method"], c["budget"], "-", _pct(c.get("accuracy_clean")),
                         *["n/a"] * (4 * len(eps)), "unreachable: " + c["unreachable"]])
            continue
        body.append([c["method"], c["budget"], c.get("surrogate") or "-", _pct(c.get("accuracy_clean")),
                     *[_pct(c.get(f"caa{e}_accuracy")) for e in eps],
                     *[_pct(c.get(f"caa{e}_accuracy_unpruned")) for e in eps],
                     *[_pct(c.get(f"caa{e}_success")) for e in eps],
                     *["-" if c.get(f"caa{e}_jaccard") is None else f"{c[f'caa{e}_jaccard']:.3f}" for e in eps], ""])
    parts.append(_md(["method", "budget", "surrogate", "acc clean", *[f"acc CAA {e}/255" for e in eps],
                      *[f"unpruned acc CAA {e}/255" for e in eps], *[f"success {e}/255" for e in eps],
                      *[f"J CAA {e}/255" for e in eps], "note"],
                     body))
    sources, targets, cells = transfer_matrix(rows)
    if sources:
        te = next(r["epsilon"] for r in rows if r["perturbation"] == "transfer")
        src_m = list(dict.fromkeys(s.split("@")[0] for s in sources))
        tgt_m = list(dict.fromkeys(t.split("@")[0] for t in targets))
        body = []
        for sm in src_m:
            line = [sm]
            for tm in tgt_m:
                vals = [v for (s, t), v in cells.items() if s.split("@")[0] == sm and t.split("@")[0] == tm
                        and v is not None]
                line.append(_pct(sum(vals) / len(vals)) if vals else "-")
            body.append(line)
        parts += ["", f"### Transfer attack (black box, epsilon {te}/255): attack success on the target, source "
                  "method (rows) x target method (columns), mean over source and target budgets; per budget in "
                  "transfer.csv", ""]
        parts.append(_md(["source \\ target", *tgt_m], body))
    if any(r.get("defense") for r in rows):
        dperts = list(dict.fromkeys(r["perturbation"] if r["perturbation"] != "caa" else f"caa{r['epsilon']}"
                                    for r in rows if r.get("defense") and r["perturbation"] != "none"))
        aug = next(r["augmentations"] for r in rows if r.get("defense"))
        parts += ["", f"### Defense: kept set by vote over the image and {aug} random augmentations "
                  "(attack rows: perturbations crafted against the undefended method)", ""]
        index = {(r["method"], r["budget"], r["perturbation"], r.get("epsilon"), bool(r.get("defense"))): r
                 for r in rows if r["perturbation"] != "transfer"}
        body = []
        for c in summary:
            m, b = c["method"], c["budget"]
            line = [m, b, f"{c.get('select_ms') or 0:.2f}", f"{c.get('vote_select_ms') or 0:.2f}",
                    _pct(c.get("accuracy_clean")), _pct(c.get("vote_accuracy_clean"))]
            for p in dperts:
                key = ("caa", int(p[3:])) if p.startswith("caa") else (p, None)
                plain, dfd = index.get((m, b, key[0], key[1], False)), index.get((m, b, key[0], key[1], True))
                if p.startswith("caa"):
                    line += [_pct(plain and plain["attack_success"]), _pct(dfd and dfd["attack_success"])]
                else:
                    line += [f"{plain['kept_jaccard']:.3f}" if plain else "-",
                             f"{dfd['kept_jaccard']:.3f}" if dfd else "-"]
            body.append(line)
        heads = []
        for p in dperts:
            heads += ([f"success {p[3:]}/255", f"vote success {p[3:]}/255"] if p.startswith("caa")
                      else [f"J {p}", f"vote J {p}"])
        parts.append(_md(["method", "budget", "select ms", "vote select ms", "acc clean", "vote acc clean", *heads],
                         body))
    return "\n".join(parts) + "\n"


def write_outputs(rows: list[dict], out_dir: str | Path, cfg: RobustnessConfig | None = None) -> dict[str, Path]:
    """Write ``results.jsonl``, ``table.md``, ``table.csv``, ``transfer.csv`` and the plots into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.jsonl", "md": out / "table.md", "csv": out / "table.csv"}
    paths["results"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["md"].write_text(render_markdown(rows, cfg))
    summary = summary_rows(rows)
    keys = list(dict.fromkeys(k for c in summary for k in c))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for c in summary:
        writer.writerow({k: "" if c.get(k) is None else c[k] for k in keys})
    paths["csv"].write_text(buf.getvalue())
    sources, targets, cells = transfer_matrix(rows)
    if sources:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["source \\ target", *targets])
        for s in sources:
            writer.writerow([s, *["" if cells.get((s, t)) is None else cells[(s, t)] for t in targets]])
        paths["transfer"] = out / "transfer.csv"
        paths["transfer"].write_text(buf.getvalue())
    paths.update(plot_robustness(rows, out))
    return paths


def plot_robustness(rows: list[dict], out_dir: str | Path) -> dict[str, Path]:
    """``stability_vs_budget.png`` (mean benign Jaccard per method over budgets) and ``accuracy_under_attack.png``
    (pruned accuracy per method against epsilon, one panel per budget; dashed: unpruned)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    summary = summary_rows(rows)
    methods = list(dict.fromkeys(c["method"] for c in summary))
    budgets = sorted({c["budget"] for c in summary}, reverse=True)
    paths = {}
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for m in methods:
        pts = [(c["budget"], c["benign_jaccard"]) for c in summary if c["method"] == m and c.get("benign_jaccard")
               is not None]
        if pts:
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o", label=m)
    ax.set_xlabel("visual tokens kept (of 256)")
    ax.set_ylabel("kept-set Jaccard vs clean (benign mean)")
    ax.set_title("Ranking stability")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    paths["stability"] = out / "stability_vs_budget.png"
    fig.savefig(paths["stability"], dpi=120)
    plt.close(fig)

    eps = sorted({r["epsilon"] for r in rows if r["perturbation"] == "caa" and r.get("accuracy") is not None})
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.6 * len(budgets), 4.2), squeeze=False, sharey=True)
    for ax, b in zip(axes[0], budgets):
        for m in methods:
            c = next((c for c in summary if c["method"] == m and c["budget"] == b), None)
            if c is None or c.get("unreachable"):
                continue
            ys = [c.get("accuracy_clean")] + [c.get(f"caa{e}_accuracy") for e in eps]
            line, = ax.plot([0, *eps], [100 * y for y in ys], marker="o", label=m)
            ax.plot([0, *eps], [100 * y for y in [c.get("accuracy_unpruned_clean")] +
                                [c.get(f"caa{e}_accuracy_unpruned") for e in eps]],
                    linestyle="--", linewidth=0.8, color=line.get_color())
        ax.set_title(f"keep {b}")
        ax.set_xlabel("epsilon (x 1/255)")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("accuracy % (solid: pruned, dashed: unpruned)")
    if axes[0][-1].get_legend_handles_labels()[0]:
        axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    paths["attack"] = out / "accuracy_under_attack.png"
    fig.savefig(paths["attack"], dpi=120)
    plt.close(fig)
    return paths
