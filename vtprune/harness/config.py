"""Sweep configs: what to run (models x methods x budgets x tasks), parsed and checked before anything loads.

A config is YAML (or the same structure as a dict)::

    name: llava15_7b                 # optional; default: the file name
    output_dir: runs/llava15_7b      # optional; results.jsonl goes there (default: runs/<name>)
    include_path: ../../eval/tasks   # optional; folder(s) of local lmms-eval tasks
    batch_size: 1                    # optional
    limit: null                      # optional; documents per task (quick runs)
    num_frames: 32                   # optional; frames sampled uniformly from each video file a task gives
    device: cuda                     # optional; default: cuda when available, else cpu
    dtype: float16                   # optional; default: auto (the checkpoint's dtype)
    models:
      - pretrained: llava-hf/llava-1.5-7b-hf       # local path or hub id
        name: llava-1.5-7b                         # optional label (default: last part of pretrained)
        model_args: {attn_implementation: sdpa}    # optional loading options (device_map, revision, ...)
    methods:
      - all: {stage: vision, exclude: [zoo]}       # every registered VLM method matching (or just: - all), each
                                                   # with its registry run_options; an entry below naming the same
                                                   # method (without another name) replaces its expansion;
                                                   # modality: image (default: the methods that prune images) or
                                                   # video (those that prune videos, e.g. evs, vidcom2);
                                                   # {all: {modalities: [video], optional: true}}: the video-only
                                                   # methods, however many are registered, none included
      - fastv                                      # a registered method with its default options
      - {method: dart, options: {layer: 2}, name: dart-l2}   # options go to the method's config
      - downsample                                 # the unpatched model on inputs shrunk to ~budget tokens per image
                                                   # (dynamic-resolution families; not part of ``all``)
      - name: divprune+fastv                       # a schedule: methods composed (vtprune.patch with a list);
        schedule: [{method: divprune, ratio: 0.5}, {method: fastv, layer: 2}]   # the last step gets the budget
    budgets: [64, 128, 192]                        # visual tokens kept per image (keep=N); or ratios in (0, 1)
                                                   # ([0.1, 0.25]: ratio=r, the kept fraction of each unit)
    tasks:
      - gqa                                        # metric: the task's first metric, scale 100, max 100
      - {task: mme, metric: mme_perception_score, scale: 1, max: 2000}

A model entry may be ``{random: llava, seed: 0, name: ...}`` instead of ``pretrained``: a tiny random-weight
LLaVA with the shapes benchmark's processor (:mod:`vtprune.harness.tiny`), saved under
``<output_dir>/models/<name>-seed<seed>`` on first use; it makes a sweep runnable offline.

Every cell (model, method, budget, task) is run, and each model's unpruned baseline (method ``none``) on every
task. ``scale`` turns the task's metric into the number a paper reports (100 for a 0-1 accuracy); ``max`` is
that number's full score, used to put every task on 0-100 for the table's Avg column.

Relative paths (``output_dir``, ``include_path``, a local ``pretrained``) are taken relative to the config
file (a dict config: to ``base_dir``, default the working directory).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from ..registry import get_method, list_methods
from .model import LOAD_ARGS, SCHEDULE, UNPRUNED, budget_options, method_config
from .tiny import RANDOM_PRESETS

__all__ = ["SweepConfig", "ModelSpec", "MethodSpec", "TaskSpec", "load_config"]

_TOP_KEYS = {
    "name",
    "output_dir",
    "include_path",
    "batch_size",
    "limit",
    "num_frames",
    "device",
    "dtype",
    "models",
    "methods",
    "budgets",
    "tasks",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    pretrained: str  # local path or hub id; for a random model, where the sweep saves it (set when it runs)
    model_args: dict[str, Any]
    random: str | None = None  # a preset of vtprune.harness.tiny: build a random-weight model instead
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str  # label in results and tables
    method: str  # registered method name, or "none"
    options: dict[str, Any]

    def options_key(self) -> str:
        return json.dumps(self.options, sort_keys=True)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    task: str
    metric: str | None  # None: the task's first metric (resolved by the sweep's task check)
    scale: float = 100.0
    max: float = 100.0


@dataclasses.dataclass
class SweepConfig:
    name: str
    output_dir: Path
    include_path: list[Path]
    models: list[ModelSpec]
    methods: list[MethodSpec]
    budgets: list[int | float]  # keep=N (int) or ratio=r (float in (0, 1))
    tasks: list[TaskSpec]
    batch_size: int = 1
    limit: int | None = None
    num_frames: int | None = None  # frames sampled from each video file (None: every frame)
    device: str | None = None
    dtype: str = "auto"

    @property
    def results_path(self) -> Path:
        return self.output_dir / "results.jsonl"

    def cells(self) -> list[tuple[ModelSpec, MethodSpec, int | None, TaskSpec]]:
        """Every cell in run order: per model, the unpruned baseline first, then method x budget, each on
        every task."""
        baseline = MethodSpec(UNPRUNED, UNPRUNED, {})
        out = []
        for model in self.models:
            for task in self.tasks:
                out.append((model, baseline, None, task))
            for method in self.methods:
                for budget in self.budgets:
                    for task in self.tasks:
                        out.append((model, method, budget, task))
        return out


def _fail(where: str, message: str):
    raise ValueError(f"sweep config: {where}: {message}")


def _check_keys(where: str, given: dict, allowed: set[str], required: set[str] = frozenset()) -> None:
    if not isinstance(given, dict):
        _fail(where, f"expected a mapping, got {type(given).__name__} {given!r}")
    unknown = sorted(set(given) - allowed)
    if unknown:
        _fail(where, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(required - set(given))
    if missing:
        _fail(where, f"missing key(s) {missing}")


def _positive_int(where: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(where, f"expected an int >= 1, got {value!r}")
    return value


def _budget(where: str, value) -> int | float:
    """A budget: an int >= 1 (``keep``: visual tokens kept per unit) or a float in (0, 1) (``ratio``: the kept
    fraction of each unit's tokens)."""
    if isinstance(value, float) and not isinstance(value, bool):
        if not 0.0 < value < 1.0:
            _fail(where, f"a ratio budget must be a float in (0, 1), got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(where, f"expected an int >= 1, got {value!r} (keep=N; or a float in (0, 1): ratio=r)")
    return value


def _list(where: str, value) -> list:
    if not isinstance(value, list) or not value:
        _fail(where, f"expected a non-empty list, got {value!r}")
    return value


def _path(base: Path, value, where: str) -> Path:
    if not isinstance(value, str) or not value:
        _fail(where, f"expected a path, got {value!r}")
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def _parse_model(i: int, item, base: Path) -> ModelSpec:
    where = f"models[{i}]"
    if isinstance(item, str):
        item = {"pretrained": item}
    _check_keys(where, item, {"pretrained", "random", "seed", "name", "model_args"})
    if ("pretrained" in item) == ("random" in item):
        _fail(
            where,
            f"give exactly one of 'pretrained' (a local path or hub id) or 'random' (a preset: {list(RANDOM_PRESETS)})",
        )
    model_args = item.get("model_args") or {}
    _check_keys(f"{where}.model_args", model_args, set(LOAD_ARGS))
    if "random" in item:
        if item["random"] not in RANDOM_PRESETS:
            _fail(where, f"unknown random model preset {item['random']!r}; available: {list(RANDOM_PRESETS)}")
        seed = item.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            _fail(where, f"seed must be an int, got {seed!r}")
        name = item.get("name") or f"random-{item['random']}"
        if not isinstance(name, str):
            _fail(where, f"name must be a string, got {name!r}")
        return ModelSpec(name, "", dict(model_args), random=item["random"], seed=seed)
    if "seed" in item:
        _fail(where, "'seed' applies to random models only")
    pretrained = item["pretrained"]
    if not isinstance(pretrained, str) or not pretrained:
        _fail(where, f"pretrained must be a local path or a hub id, got {pretrained!r}")
    local = _path(base, pretrained, where)
    if local.exists() or not _HUB_ID.match(pretrained):
        pretrained = str(local.resolve())  # a path (checked later), not a hub id
    name = item.get("name") or Path(pretrained.rstrip("/")).name
    if not isinstance(name, str):
        _fail(where, f"name must be a string, got {name!r}")
    return ModelSpec(name, pretrained, dict(model_args))


#: what an ``all`` entry of ``methods`` takes (``exclude``: names; ``modalities``: the record's exact modalities, e.g.
#: ``[video]`` for the video-only methods; ``optional: true``: the entry may match no method (methods that land
#: later); the rest filter the registry record: ``stage``, ``merges``, ``modality`` (default ``image`` unless
#: ``modalities`` is given))
_ALL_KEYS = {"stage", "merges", "modality", "exclude", "modalities", "optional"}


def _expand_all(items: list) -> list:
    """``methods`` with each ``all`` entry (``"all"``, or ``{all: {stage: ..., merges: ..., modality: ..., exclude:
    [...]}}``) replaced, in place, by one entry per registered VLM method that matches (sorted by name; ``modality``
    defaults to ``"image"``: a benchmark of images runs the methods that prune images), with the options of its
    registry record (``run_options``). A method listed elsewhere by name (``fastv``, ``{method: fastv, ...}`` without
    another ``name``) is not expanded: that entry stands instead."""
    explicit = set()
    for item in items:
        if isinstance(item, str) and item != "all":
            explicit.add(item)
        elif isinstance(item, dict) and "method" in item and item.get("name") in (None, item["method"]):
            explicit.add(item["method"])
    out = []
    for i, item in enumerate(items):
        if item != "all" and not (isinstance(item, dict) and "all" in item):
            out.append(item)
            continue
        where = f"methods[{i}]"
        if isinstance(item, dict):
            _check_keys(where, item, {"all"}, {"all"})
        spec = {} if item == "all" or item["all"] in (None, True) else item["all"]
        _check_keys(where + ".all", spec, _ALL_KEYS)
        exclude = spec.get("exclude") or []
        if not isinstance(exclude, list):
            _fail(where + ".all", f"exclude must be a list of method names, got {exclude!r}")
        for name in exclude:
            try:
                get_method(name)
            except (ValueError, TypeError) as err:
                _fail(where + ".all.exclude", str(err))
        try:
            filters = {k: v for k, v in spec.items() if k not in _ALL_OWN}
            if "modalities" not in spec:
                filters = {"modality": "image", **filters}
            names = list_methods(host="vlm", **filters)
        except TypeError as err:
            _fail(where + ".all", str(err))
        if "modalities" in spec:
            modalities = spec["modalities"]
            if not isinstance(modalities, list) or not set(modalities) <= {"image", "video"}:
                _fail(where + ".all", f"modalities must be a list of 'image' / 'video', got {modalities!r}")
            names = [n for n in names if get_method(n).modalities == frozenset(modalities)]
        if spec.get("optional") not in (None, True, False):
            _fail(where + ".all", f"optional must be true or false, got {spec['optional']!r}")
        if not names and not spec.get("optional"):
            _fail(
                where + ".all",
                f"{spec} matches no registered method (stages: "
                f"{sorted({get_method(n).stage for n in list_methods(host='vlm')})})",
            )
        out += [
            {"method": n, "options": get_method(n).run_options} for n in names if n not in exclude and n not in explicit
        ]
    return out


#: the keys of an ``all`` entry that are not registry filters
_ALL_OWN = {"exclude", "modalities", "optional"}


def _parse_method(i: int, item, budgets: list[int | float]) -> MethodSpec:
    where = f"methods[{i}]"
    if isinstance(item, str):
        item = {"method": item}
    if isinstance(item, dict) and "schedule" in item:  # a composed method: {name, schedule: [{method, ...}, ...]}
        _check_keys(where, item, {"schedule", "name"}, {"schedule", "name"})
        item = {"method": SCHEDULE, "options": {"schedule": item["schedule"]}, "name": item["name"]}
    _check_keys(where, item, {"method", "options", "name"}, {"method"})
    method, options = item["method"], item.get("options") or {}
    if method == UNPRUNED:
        _fail(where, f"the unpruned baseline ({UNPRUNED!r}) is always run; list only pruning methods")
    if not isinstance(options, dict):
        _fail(where, f"options must be a mapping, got {options!r}")
    for budget_key in ("keep", "ratio"):
        if budget_key in options:
            _fail(where, f"give budgets in the top-level 'budgets' list, not as the option {budget_key!r}")
    try:
        for budget in budgets:
            method_config(method, **budget_options(budget), **options)
    except (ValueError, TypeError) as err:
        _fail(where, str(err))
    name = item.get("name") or method
    if not isinstance(name, str):
        _fail(where, f"name must be a string, got {name!r}")
    return MethodSpec(name, method, dict(options))


def _parse_task(i: int, item) -> TaskSpec:
    where = f"tasks[{i}]"
    if isinstance(item, str):
        item = {"task": item}
    _check_keys(where, item, {"task", "metric", "scale", "max"}, {"task"})
    task, metric = item["task"], item.get("metric")
    if not isinstance(task, str) or not task:
        _fail(where, f"task must be an lmms-eval task name, got {task!r}")
    if metric is not None and not isinstance(metric, str):
        _fail(where, f"metric must be a string, got {metric!r}")
    numbers = {}
    for key in ("scale", "max"):
        value = item.get(key, 100.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            _fail(where, f"{key} must be a number > 0, got {value!r}")
        numbers[key] = float(value)
    return TaskSpec(task, metric, numbers["scale"], numbers["max"])


def _unique(where: str, names: list[str]) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        _fail(where, f"duplicate name(s) {dupes}; give each entry a distinct 'name'")


def load_config(config: str | Path | dict, base_dir: str | Path | None = None) -> SweepConfig:
    """Parse and check a sweep config (a YAML path or a dict). Methods and their options are checked here
    against the registry; tasks and models by :func:`vtprune.harness.sweep.check_config`. Raises ValueError."""
    if isinstance(config, (str, Path)):
        import yaml

        path = Path(config)
        if not path.is_file():
            raise ValueError(f"sweep config {str(path)!r} does not exist")
        with open(path) as f:
            data = yaml.safe_load(f)
        base = path.resolve().parent
        default_name = path.stem
    elif isinstance(config, dict):
        data, base, default_name = config, Path(base_dir or ".").resolve(), "sweep"
    else:
        raise TypeError(f"config must be a YAML path or a dict, got {type(config).__name__}")
    _check_keys("top level", data, _TOP_KEYS, {"models", "methods", "budgets", "tasks"})

    budgets = [_budget(f"budgets[{i}]", b) for i, b in enumerate(_list("budgets", data["budgets"]))]
    if len(set(budgets)) != len(budgets):
        _fail("budgets", f"duplicate budgets in {budgets}")
    models = [_parse_model(i, m, base) for i, m in enumerate(_list("models", data["models"]))]
    methods = [_parse_method(i, m, budgets) for i, m in enumerate(_expand_all(_list("methods", data["methods"])))]
    tasks = [_parse_task(i, t) for i, t in enumerate(_list("tasks", data["tasks"]))]
    _unique("models", [m.name for m in models])
    _unique("methods", [m.name for m in methods])
    _unique("tasks", [t.task for t in tasks])

    name = data.get("name") or default_name
    include = data.get("include_path") or []
    include = [include] if isinstance(include, str) else include
    if not isinstance(include, list):
        _fail("include_path", f"expected a path or a list of paths, got {include!r}")
    include_paths = [_path(base, p, "include_path").resolve() for p in include]
    for p in include_paths:
        if not p.is_dir():
            _fail("include_path", f"{str(p)!r} is not a folder")
    output_dir = _path(base, data["output_dir"], "output_dir") if data.get("output_dir") else Path("runs") / name
    limit = data.get("limit")
    if limit is not None:
        limit = _positive_int("limit", limit)
    num_frames = data.get("num_frames")
    if num_frames is not None:
        num_frames = _positive_int("num_frames", num_frames)
    device, dtype = data.get("device"), data.get("dtype", "auto")
    for key, value in (("device", device), ("dtype", dtype)):
        if value is not None and not isinstance(value, str):
            _fail(key, f"expected a string, got {value!r}")
    return SweepConfig(
        name=str(name),
        output_dir=output_dir,
        include_path=include_paths,
        models=models,
        methods=methods,
        budgets=budgets,
        tasks=tasks,
        batch_size=_positive_int("batch_size", data.get("batch_size", 1)),
        limit=limit,
        num_frames=num_frames,
        device=device,
        dtype=dtype,
    )
