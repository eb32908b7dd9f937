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

Surrogates (each method's registry record, :mod:`vtprune.methods.surrogates`; :func:`surrogate_for`): methods that rank
by a score (``cls``, ``fastv``, the
dominant tokens of ``visionzip``) are attacked through that exact score; methods whose selection is greedy
diversity (``divprune``, ``todre``, ``zoo``), duplication (``dart``) or clustering (``pact``) through a
differentiable stand-in documented with each surrogate. A method registered later without its own surrogate is
attacked through the first signal it declares (text attention, CLS attention, features, hidden states); a method
that declares no image-dependent signal (``random``) cannot be attacked: its rows say so (``reachable: false`` and
the reason), they are not skipped.

Modules: ``config`` (:class:`RobustnessConfig`), ``surrogates``, ``data`` (questions and their critical patches),
``perturbations``, ``runner`` (the model, plain and patched), ``attack``, ``defense``, ``run``, ``report``.
Library entry point: :func:`run_robustness`; CLI: ``vtprune robustness [--config FILE] [--limit N]
[--output-dir DIR]``.
"""

from __future__ import annotations

from .attack import answer_hinge, caa_attack, caa_objective
from .config import DEFAULT_CONFIG, RobustnessConfig, load_config
from .data import Item, critical_patches, load_items
from .defense import vote_select
from .perturbations import PERTURBATIONS, perturb, quantize
from .report import (
    plot_robustness,
    render_markdown,
    summary_rows,
    transfer_matrix,
    write_outputs,
)
from .run import jaccard, run_robustness
from .runner import Runner
from .surrogates import Surrogate, surrogate_for

__all__ = [
    "RobustnessConfig",
    "load_config",
    "Surrogate",
    "surrogate_for",
    "PERTURBATIONS",
    "perturb",
    "quantize",
    "Item",
    "load_items",
    "critical_patches",
    "Runner",
    "caa_attack",
    "caa_objective",
    "answer_hinge",
    "vote_select",
    "jaccard",
    "run_robustness",
    "write_outputs",
    "render_markdown",
    "summary_rows",
    "transfer_matrix",
    "plot_robustness",
    "DEFAULT_CONFIG",
]
