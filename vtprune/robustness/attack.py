"""The compression-aware attack (CAA): PGD on the pixels through a method's surrogate."""

from __future__ import annotations

import math

import torch

from .. import api
from .data import Item
from .perturbations import quantize
from .runner import Runner, Stop
from .surrogates import Surrogate, surrogate_for


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


def caa_objective(
    runner: Runner,
    x: torch.Tensor,
    text: dict,
    items: list[Item],
    surrogate: Surrogate,
    budget: int,
    penalty: float,
    margin: float = 2.0,
) -> torch.Tensor:
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
            raise Stop
        return torch.arange(image.k)

    method = getattr(runner.pruned, api._ATTR).methods[0]
    with runner.probe(fn):
        try:
            runner.forward(runner.pruned, x, text)
        except Stop:
            pass
    return -torch.stack(push) - penalty * answer_hinge(
        runner.forward(runner.plain, x, text).logits[:, -1], text["answers"], margin
    )


def answer_hinge(logits: torch.Tensor, answers: torch.Tensor, margin: float) -> torch.Tensor:
    """``relu(margin - (z_y - max_{j != y} z_j))`` per row (Carlini-Wagner): 0 while the right answer leads every
    other token by ``margin`` logits."""
    z = logits.float()
    right = z.gather(1, answers[:, None]).squeeze(1)
    other = z.scatter(1, answers[:, None], -math.inf).max(dim=1).values
    return torch.relu(margin - (right - other))


def caa_attack(
    runner: Runner,
    items: list[Item],
    method: str,
    budget: int,
    epsilon: float,
    steps: int = 20,
    step_size: float | None = None,
    penalty: float = 1.0,
    margin: float = 2.0,
    x0: torch.Tensor | None = None,
):
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
