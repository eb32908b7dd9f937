"""Run a sweep: every (model, method, budget, task) cell of a config through lmms-eval, one row per cell.

:func:`run_sweep` is what ``vtprune sweep CONFIG.yaml`` calls; Python callers use it directly::

    rows = vtprune.harness.run_sweep("configs/sweeps/smoke.yaml", limit=16)

Before any model loads, :func:`check_config` resolves every task (and its metric) in lmms-eval's task index,
reads every model's config (a local folder, or the hub's ``config.json`` only) and patches a weightless
(meta-device) copy of each model with each method at each budget, so unknown tasks, models and methods, and methods a
model cannot run, fail first; the ``downsample`` row is checked by the model's adapter and processor instead (a family
that cannot shrink its input, a budget below the processor's floor). Each model is then loaded once; each cell runs
``lmms_eval.evaluator.simple_evaluate`` in-process with a :class:`~vtprune.harness.model.VTPrune` wrapping the loaded
model, so an lmms-eval failure raises instead of being reported as a zero exit status, and a result that lacks the
metric, is NaN, or was computed from fewer answers than the documents evaluated raises too.

Per cell, visual tokens, prefill TFLOPs, select ms and KV-cache MiB are means over the requests, prefill ms
the median over the requests (one batch slowed by another process does not move it), peak memory the CUDA
peak of the cell (None on CPU).

Rows are appended to ``results.jsonl`` as cells finish; a cell whose row is already there (same model, method,
options, budget, task, metric and limit) is skipped, so an interrupted sweep resumes where it stopped. Under
``accelerate launch`` every process runs every cell on its share of the documents (lmms-eval shards them), the
per-request records of all processes are gathered, and the main process writes the rows.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import gc
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..adapters import get_adapter, supported_model_types
from ..api import patch, unpatch
from ..progress import progress_bars
from .config import MethodSpec, ModelSpec, SweepConfig, TaskSpec, load_config
from .model import DOWNSAMPLE, UNPRUNED, VTPrune, budget_options, check_device, load_pretrained, method_config
from .tiny import random_model_config, save_random_model

__all__ = ["run_sweep", "check_config", "read_results", "cell_key", "recorded_path", "RESULT_FIELDS"]

#: the fields of a results.jsonl row, in order
RESULT_FIELDS = (
    "config",
    "model",
    "pretrained",
    "method",
    "method_name",
    "options",
    "budget",
    "task",
    "metric",
    "value",
    "score",
    "max",
    "limit",
    "n",
    "batch_size",
    "visual_tokens_in",
    "visual_tokens",
    "visual_tokens_nominal",
    "prefill_tflops",
    "prefill_ms",
    "select_ms",
    "kv_cache_mb",
    "peak_memory_mb",
    "device",
    "dtype",
    "world_size",
    "time",
)
_KEY_FIELDS = ("model", "pretrained", "method", "method_name", "options", "budget", "task", "metric", "limit")


#: the clone vtprune runs from: a local model inside it is recorded relative to it (``models/tiny-llava-shapes``)
REPO = Path(__file__).resolve().parents[2]


def recorded_path(pretrained: str) -> str:
    """How a row records a model: a local folder inside the repository by its path relative to the repository (so
    committed results resume, and compare equal, on any clone), anything else (a hub id, a folder elsewhere) as
    given."""
    path = Path(pretrained)
    if path.is_absolute():
        try:
            return path.resolve().relative_to(REPO).as_posix()
        except ValueError:
            pass
    return pretrained


def cell_key(row: dict) -> str:
    """What identifies a cell: a row with the same key is the same cell (and is skipped on resume)."""
    return json.dumps({k: row.get(k) for k in _KEY_FIELDS}, sort_keys=True)


def read_results(path: str | Path) -> list[dict]:
    """Rows of a results.jsonl (or of the results.jsonl in a folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.jsonl"
    if not path.is_file():
        raise ValueError(f"no results file at {str(path)!r}")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n}: not a JSON row ({err})") from None
    for n, row in rows:
        _check_row(row, f"{path}:{n}")
    return [row for _, row in rows]


#: what a row needs to be tabulated and plotted: a sweep row, or a robustness row (``vtprune robustness``)
_SWEEP_ROW = {
    "model": str,
    "method": str,
    "task": str,
    "value": (int, float),
    "score": (int, float),
    "max": (int, float),
}
_ROBUSTNESS_ROW = {"model": str, "method": str, "perturbation": str}


def _check_row(row, where: str) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a result row must be a JSON object, got {type(row).__name__}")
    fields = _ROBUSTNESS_ROW if "perturbation" in row else _SWEEP_ROW
    missing = [k for k in fields if k not in row]
    if missing:
        raise ValueError(f"{where}: not a row of `vtprune sweep` (missing {missing}; it has {sorted(row)})")
    for key, kind in fields.items():
        if isinstance(row[key], bool) or not isinstance(row[key], kind):
            raise ValueError(
                f"{where}: {key!r} must be a {'number' if kind is not str else 'string'}, got {row[key]!r}"
            )


# -- checks before anything loads ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _index(paths: tuple[str, ...], include_defaults: bool):
    import lmms_eval.models  # noqa: F401  (sets lmms-eval's log level before the task index logs)
    from lmms_eval.tasks import TaskManager

    return TaskManager("WARNING", include_path=list(paths) or None, include_defaults=include_defaults)


def _task_manager(include_path: list[Path], names: list[str]):
    """lmms-eval's task index: only the local folders when they hold every task (fast), else with the built-ins
    (reading those takes seconds: the index is kept for the process)."""
    paths = tuple(str(p) for p in include_path)
    if paths:
        local = _index(paths, False)
        if all(n in local.all_tasks for n in names):
            return local
    return _index(paths, True)


def _resolve_metric(tm, spec: TaskSpec) -> str:
    if spec.task not in tm.all_tasks:
        close = difflib.get_close_matches(spec.task, tm.all_tasks, n=3, cutoff=0.6)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown lmms-eval task {spec.task!r}.{hint} (list them with `lmms-eval --tasks list`; "
            "local tasks need include_path)"
        )
    if tm.task_index[spec.task]["type"] != "task":
        raise ValueError(
            f"{spec.task!r} is an lmms-eval {tm.task_index[spec.task]['type']}, not a task; list its tasks"
        )
    metrics = [m["metric"] for m in tm._get_config(spec.task).get("metric_list", []) if isinstance(m, dict)]
    if spec.metric is None:
        if not metrics:
            raise ValueError(f"task {spec.task!r} declares no metric_list; give 'metric' in the config")
        return metrics[0]
    if metrics and spec.metric not in metrics:
        raise ValueError(f"task {spec.task!r} has no metric {spec.metric!r}; its metrics: {metrics}")
    return spec.metric


def _model_config(spec: ModelSpec):
    from transformers import AutoConfig

    if spec.random is not None:
        return random_model_config(spec.random)

    trust = bool(spec.model_args.get("trust_remote_code", False))
    path = Path(spec.pretrained)
    if path.is_absolute():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model {spec.name!r}: {spec.pretrained!r} is not a folder with a config.json "
                "(and not a hub id such as llava-hf/llava-1.5-7b-hf)"
            )
    try:
        config = AutoConfig.from_pretrained(
            spec.pretrained,
            trust_remote_code=trust,
            **({"revision": spec.model_args["revision"]} if spec.model_args.get("revision") else {}),
        )
    except Exception as err:  # noqa: BLE001 - any failure to resolve the model is reported the same way
        raise ValueError(
            f"model {spec.name!r}: cannot read the config of {spec.pretrained!r} ({type(err).__name__}: {err})"
        ) from err
    if config.model_type not in supported_model_types():
        raise ValueError(
            f"model {spec.name!r} ({spec.pretrained}) has model_type {config.model_type!r}; vtprune "
            f"supports {supported_model_types()}"
        )
    return config


def _check_methods(spec: ModelSpec, config, methods: list[MethodSpec], budgets: list[int | float]) -> None:
    """Patch a weightless (meta-device) copy of the model with every method at every budget: a method the model
    cannot run (e.g. CLS attention on a model without a CLS token, a budget a tower merge cannot reach in its
    blocks) fails here, before any weight is read."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    processor = []
    for m in methods:
        for budget in budgets:
            try:
                if m.method == DOWNSAMPLE:  # the unpatched model on smaller inputs: can the family shrink to budget?
                    adapter = get_adapter(model)
                    adapter.check_downsample(budget)  # what the config decides (the family, a per-tile floor)
                    processor = processor or [_processor(spec)]
                    adapter.check_downsample(budget, processor[0])  # what the processor decides (min_pixels, ...)
                    continue
                patch(model, method_config(m.method, **budget_options(budget), **m.options))
            except (ValueError, TypeError, NotImplementedError) as err:
                at = f" at budget {budget}" if len(budgets) > 1 else ""
                raise ValueError(f"method {m.name!r} cannot run on model {spec.name!r}{at}: {err}") from err
            unpatch(model)


def _processor(spec: ModelSpec):
    """The processor of a model (its small files only: no weight is read), for the ``downsample`` row's checks."""
    if spec.random is not None:
        from .. import shapes

        return shapes.build_processor()
    from transformers import AutoProcessor

    args = spec.model_args
    try:
        return AutoProcessor.from_pretrained(
            spec.pretrained,
            trust_remote_code=bool(args.get("trust_remote_code", False)),
            **({"revision": args["revision"]} if args.get("revision") else {}),
        )
    except Exception as err:  # noqa: BLE001 - any failure to read the processor is reported the same way
        raise ValueError(f"cannot read the processor of {spec.pretrained!r} ({type(err).__name__}: {err})") from err


def check_config(cfg: SweepConfig) -> tuple[Any, dict[str, str]]:
    """Resolve tasks, metrics and models and try every method on every model, without loading weights.
    Returns (lmms-eval TaskManager, task -> metric). Raises ValueError on the first problem."""
    check_device(cfg.device)
    tm = _task_manager(cfg.include_path, [t.task for t in cfg.tasks])
    metrics = {t.task: _resolve_metric(tm, t) for t in cfg.tasks}
    for spec in cfg.models:
        _check_methods(spec, _model_config(spec), cfg.methods, cfg.budgets)
    return tm, metrics


# -- running -------------------------------------------------------------------------------------------------------
def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _init_distributed() -> str | None:
    """Under ``accelerate launch`` (WORLD_SIZE > 1): start the process group; return this process's device."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return str(Accelerator().device)


def _gather(obj):
    """``[obj of each process]`` (just ``[obj]`` without torch.distributed)."""
    rank, world = _world()
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _mean(values) -> float | None:
    values = list(values)
    return statistics.fmean(values) if values else None


def _run_cell(
    cfg: SweepConfig,
    tm,
    model,
    processor,
    model_spec: ModelSpec,
    method: MethodSpec,
    budget: int | float | None,
    task: TaskSpec,
    metric: str,
    limit: int | None,
) -> dict | None:
    from lmms_eval.evaluator import simple_evaluate

    keep = None if method.method == UNPRUNED else budget
    lm = VTPrune(
        model=model,
        processor=processor,
        method=method.method,
        batch_size=cfg.batch_size,
        num_frames=cfg.num_frames,
        **budget_options(keep),
        **method.options,
    )
    results = simple_evaluate(
        model=lm,
        tasks=[task.task],
        limit=limit,
        task_manager=tm,
        log_samples=False,
        bootstrap_iters=0,
        verbosity="WARNING",
        batch_size=cfg.batch_size,
    )
    records = [r for part in _gather(lm.records) for r in part]
    peaks = [p for p in _gather(lm.peak_memory_bytes) if p is not None]
    rank, world = _world()
    if rank != 0:
        return None
    where = f"{model_spec.name} / {method.name} / budget {budget} / {task.task}"
    if not results or task.task not in results.get("results", {}):
        raise RuntimeError(f"lmms-eval returned no result for {where}")
    got = results["results"][task.task]
    value = got.get(f"{metric},none")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        available = sorted(k.split(",")[0] for k in got if k.endswith(",none") and "stderr" not in k)
        raise RuntimeError(f"lmms-eval gave {metric!r} = {value!r} for {where}; metrics it reported: {available}")
    n_docs = results.get("n-samples", {}).get(task.task, {}).get("effective")
    if n_docs is not None and len(records) != n_docs:
        raise RuntimeError(f"{where}: the model answered {len(records)} requests for {n_docs} documents")
    if not records:
        raise RuntimeError(f"{where}: lmms-eval sent no request to the model")
    return {
        "config": cfg.name,
        "model": model_spec.name,
        "pretrained": recorded_path(model_spec.pretrained),
        "method": method.name,
        "method_name": method.method,
        "options": method.options,
        "budget": keep,
        "task": task.task,
        "metric": metric,
        "value": float(value),
        "score": float(value) * task.scale,
        "max": task.max,
        "limit": limit,
        "n": len(records),
        "batch_size": cfg.batch_size,
        "visual_tokens_in": _mean(r.visual_tokens_in for r in records),
        "visual_tokens": _mean(r.visual_tokens_kept for r in records),
        "visual_tokens_nominal": _mean(r.visual_tokens_nominal for r in records if r.visual_tokens_nominal is not None),
        "prefill_tflops": _mean(r.prefill_tflops for r in records),
        "prefill_ms": statistics.median(r.prefill_ms for r in records),  # robust to one slow batch
        "select_ms": _mean(r.select_ms for r in records),
        "kv_cache_mb": _mean(r.kv_cache_mb for r in records),
        "peak_memory_mb": max(peaks) / 2**20 if peaks else None,
        "device": str(lm.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "world_size": world,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _materialize(spec: ModelSpec, output_dir: Path, rank: int) -> ModelSpec:
    """A random model's spec pointing at its saved copy (saved by the main process on first use)."""
    if spec.random is None:
        return spec
    path = (output_dir / "models" / f"{spec.name}-seed{spec.seed}").resolve()
    if rank == 0 and not (path / "config.json").is_file():
        save_random_model(path, spec.random, spec.seed)
    if _world()[1] > 1:
        torch.distributed.barrier()
    return dataclasses.replace(spec, pretrained=str(path))


def run_sweep(
    config: str | Path | dict | SweepConfig,
    *,
    output_dir: str | Path | None = None,
    limit: int | None = None,
    resume: bool = True,
    progress: bool = True,
    base_dir: str | Path | None = None,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Run every cell of ``config`` (a YAML path, a dict, or a parsed :class:`SweepConfig`) that is not in its
    results.jsonl yet; return the rows of all its cells, in run order (on processes other than the main one
    under ``accelerate launch``: an empty list).

    ``output_dir`` and ``limit`` override the config's; ``resume=False`` starts a fresh results.jsonl.
    ``on_row`` is called with each new row as it is written. ``progress=False`` silences every progress bar, lmms-eval's
    and transformers' included."""
    with progress_bars(progress):
        return _run_sweep(config, output_dir, limit, resume, progress, base_dir, on_row)


def _run_sweep(config, output_dir, limit, resume, progress, base_dir, on_row) -> list[dict]:
    from tqdm import tqdm

    cfg = config if isinstance(config, SweepConfig) else load_config(config, base_dir)
    if output_dir is not None:
        cfg = dataclasses.replace(cfg, output_dir=Path(output_dir))
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be an int >= 1, got {limit!r}")
        cfg = dataclasses.replace(cfg, limit=limit)
    tm, metrics = check_config(cfg)

    distributed_device = _init_distributed()
    rank, _ = _world()
    cfg = dataclasses.replace(cfg, models=[_materialize(m, cfg.output_dir, rank) for m in cfg.models])
    path = cfg.results_path
    existing = read_results(path) if resume and path.is_file() else []
    done = {cell_key(r): r for r in existing}
    cells = []
    for model_spec, method, budget, task in cfg.cells():
        probe = {
            "model": model_spec.name,
            "pretrained": recorded_path(model_spec.pretrained),
            "method": method.name,
            "method_name": method.method,
            "options": method.options,
            "budget": budget,
            "task": task.task,
            "metric": metrics[task.task],
            "limit": cfg.limit,
        }
        cells.append((cell_key(probe), model_spec, method, budget, task))
    pending = [c for c in cells if c[0] not in done]
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not resume:
            path.write_text("")
    bar = tqdm(
        total=len(cells),
        initial=len(cells) - len(pending),
        desc=f"sweep {cfg.name}",
        unit="cell",
        disable=not progress or rank != 0,
    )
    try:
        loaded_name, model, processor = None, None, None
        for key, model_spec, method, budget, task in pending:
            if model_spec.name != loaded_name:
                model = processor = None
                gc.collect()
                args = {
                    "device": cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                    "dtype": cfg.dtype,
                    **model_spec.model_args,
                }
                if distributed_device is not None:
                    args["device"] = distributed_device
                model, processor = load_pretrained(model_spec.pretrained, **args)
                loaded_name = model_spec.name
            bar.set_postfix_str(f"{model_spec.name} {method.name} {budget or ''} {task.task}".replace("  ", " "))
            row = _run_cell(cfg, tm, model, processor, model_spec, method, budget, task, metrics[task.task], cfg.limit)
            if row is not None:
                with open(path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                done[key] = row
                if on_row is not None:
                    on_row(row)
            bar.update(1)
    finally:
        bar.close()
    return [done[c[0]] for c in cells] if rank == 0 else []
