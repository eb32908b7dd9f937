"""One audit run: stability, attack, transfer and defense over every (method, budget) cell."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..progress import progress_bars
from ..timing import num_threads
from .attack import caa_attack
from .config import RobustnessConfig, load_config
from .data import load_items
from .defense import vote_select
from .perturbations import perturb
from .report import write_outputs
from .runner import Runner
from .surrogates import surrogate_for


def jaccard(a, b) -> float:
    """``|A & B| / |A | B|`` of two index sets (1.0 for two empty sets)."""
    a, b = set(map(int, a)), set(map(int, b))
    return len(a & b) / len(a | b) if a | b else 1.0


def _batches(items: list, size: int):
    return [items[i : i + size] for i in range(0, len(items), size)]


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


def run_robustness(
    config: RobustnessConfig | None = None,
    *,
    output_dir: str | Path | None = None,
    progress: bool = True,
    write: bool = True,
) -> list[dict]:
    """Run the audit of ``config`` (default: :data:`DEFAULT_CONFIG`) and, with ``write``, write ``results.jsonl``,
    ``table.md`` / ``table.csv``, ``transfer.csv`` and the plots to ``output_dir`` (default
    ``eval/results/robustness``). Returns the result rows. ``progress=False`` silences every progress bar
    (transformers' included)."""
    with progress_bars(progress):
        return _run_robustness(config, output_dir, progress, write)


def _run_robustness(config, output_dir, progress, write) -> list[dict]:
    from tqdm import tqdm

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
        bar = tqdm(
            total=len(cells) * len(batches) * (4 if transfer else 3),
            desc="vtprune robustness",
            unit="step",
            disable=not progress,
        )
        gen = torch.Generator().manual_seed(cfg.seed)
        data = []  # per batch: items, text inputs, images per perturbation, unpruned predictions
        for batch in batches:
            x = torch.stack([it.image for it in batch])
            text = runner.text_inputs(batch)
            images = {"none": x, **{p: torch.stack([perturb(xi, p, gen) for xi in x]) for p in cfg.perturbations}}
            data.append(
                {
                    "items": batch,
                    "text": text,
                    "images": images,
                    "plain": {p: runner.predict_plain(xp, text) for p, xp in images.items()},
                }
            )
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
                    x_adv, _ = caa_attack(
                        runner,
                        d["items"],
                        method,
                        budget,
                        e / 255,
                        cfg.steps,
                        step,
                        cfg.penalty,
                        cfg.margin,
                        x0=d["images"]["none"],
                    )
                    plain_pred = runner.predict_plain(x_adv, text)
                    with runner.patch(method, budget):
                        pred, kept, _ = runner.predict_pruned(x_adv, text)
                    caa[e].add(kept, clean_kept[i], pred, plain_pred, text["answers"])
                    adv_images[e].append((x_adv, plain_pred))
                bar.update(1)
            if transfer and surrogate is not None:
                adv[(method, budget)] = [
                    ((x * 255).round().to(torch.uint8), pp) for x, pp in adv_images[cfg.transfer_epsilon]
                ]
            # the defense, on the clean, benign and attacked images
            defended: dict[str, _Tally] = {}
            with runner.patch(method, budget):
                for i, d in enumerate(data):
                    voted_clean = None
                    text = d["text"]
                    inputs = {
                        p: (d["images"][p], d["plain"][p]) for p in ["none", *cfg.defense_perturbations] if p != "caa"
                    }
                    if "caa" in cfg.defense_perturbations:
                        inputs.update({f"caa{e}": adv_images[e][i] for e in cfg.epsilons if adv_images[e]})
                    for key, (x, plain_pred) in inputs.items():
                        t0 = time.perf_counter()
                        voted = vote_select(
                            runner,
                            x,
                            text,
                            budget,
                            cfg.defense_augmentations,
                            cfg.defense_noise / 255,
                            cfg.defense_shift,
                            gen,
                        )
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
                rows.append(
                    _row(
                        runner.name,
                        method,
                        budget,
                        p,
                        tallies[p],
                        tallies["none"],
                        select_ms=1000 * tallies[p].select_s / n,
                        **base,
                    )
                )
            for e in cfg.epsilons:
                if surrogate is None:
                    rows.append(
                        _row(
                            runner.name,
                            method,
                            budget,
                            "caa",
                            _Tally(),
                            None,
                            epsilon=e,
                            reachable=False,
                            reason=reason,
                            **base,
                        )
                    )
                else:
                    rows.append(
                        _row(
                            runner.name,
                            method,
                            budget,
                            "caa",
                            caa[e],
                            tallies["none"],
                            epsilon=e,
                            steps=cfg.steps,
                            penalty=cfg.penalty,
                            margin=cfg.margin,
                            **base,
                        )
                    )
            for key, tally in defended.items():
                pert, extra = ("caa", {"epsilon": int(key[3:])}) if key.startswith("caa") else (key, {})
                rows.append(
                    _row(
                        runner.name,
                        method,
                        budget,
                        pert,
                        tally,
                        defended["none"],
                        defense="vote",
                        augmentations=cfg.defense_augmentations,
                        select_ms=select_ms,
                        defense_select_ms=1000 * tally.select_s / n,
                        **extra,
                        **base,
                    )
                )
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
                rows.append(
                    _row(
                        runner.name,
                        method,
                        budget,
                        "transfer",
                        tally,
                        clean,
                        epsilon=cfg.transfer_epsilon,
                        source_method=s[0],
                        source_budget=s[1],
                    )
                )
        bar.close()
    for m, why in cannot.items():
        rows += [
            {
                "model": runner.name,
                "method": m,
                "budget": b,
                "perturbation": p,
                **({"epsilon": e} if e else {}),
                "kept_jaccard": None,
                "accuracy": None,
                "accuracy_unpruned": None,
                "attack_success": None,
                "n": 0,
                "reachable": False,
                "reason": why,
            }
            for b in cfg.budgets
            for p, e in [("none", None), *[("caa", e) for e in cfg.epsilons]]
        ]
    for row in rows:
        row["limit"] = cfg.limit
    if write:
        write_outputs(rows, out, cfg)
        partial.unlink()
    return rows
