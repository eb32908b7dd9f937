"""What an audit measures: :class:`RobustnessConfig` and its YAML loader."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from .. import shapes
from ..registry import get_method, list_methods
from .perturbations import PERTURBATIONS

#: the default run (a repository file: the bundled model and task are repository files, not package data)
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "robustness.yaml"


@dataclass
class RobustnessConfig:
    """What :func:`run_robustness` measures. Paths are relative to the working directory (or, from
    :func:`load_config`, to the config file). ``methods`` None: every registered method; ``method_options`` maps a
    method name to options its config gets besides ``keep`` (e.g. ``{"pdrop": {"budget_kind": "last"}}``). ``epsilons``
    and
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
            if (
                not isinstance(values, list)
                or not values
                or any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in values)
            ):
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
            raise ValueError(
                f"transfer_epsilon={self.transfer_epsilon} must be one of epsilons {self.epsilons} "
                "(the transfer attack reuses those perturbations), or None (no transfer matrix)"
            )
        for name in ("penalty", "margin", "defense_noise"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.step_size is not None and (
            isinstance(self.step_size, bool)
            or not isinstance(self.step_size, (int, float))
            or not 0 < self.step_size < math.inf
        ):
            raise ValueError(f"step_size must be a number > 0 (units of 1/255) or None, got {self.step_size!r}")
        unknown = [p for p in self.perturbations if p not in PERTURBATIONS]
        if not isinstance(self.perturbations, list) or unknown:
            raise ValueError(
                f"unknown perturbation(s) {unknown or self.perturbations!r}; allowed: {list(PERTURBATIONS)}"
            )
        bad = [p for p in self.defense_perturbations if p != "caa" and p not in self.perturbations]
        if bad:
            raise ValueError(f"defense_perturbations {bad} are not among perturbations {self.perturbations} (or 'caa')")
        if self.methods is not None:
            if not isinstance(self.methods, list) or not self.methods:
                raise ValueError(
                    f"methods must be a non-empty list of method names or None (every registered "
                    f"method), got {self.methods!r}"
                )
            for m in self.methods:
                get_method(m)  # unknown names raise ValueError with suggestions
        if not isinstance(self.method_options, dict):
            raise ValueError(f"method_options must be a mapping of method name -> options, got {self.method_options!r}")
        for m, options in self.method_options.items():
            spec = get_method(m)
            if not isinstance(options, dict) or {"keep", "ratio"} & set(options):
                raise ValueError(
                    f"method_options[{m!r}] must be a mapping of {m}'s options other than keep / ratio "
                    f"(the budgets set keep), got {options!r}"
                )
            spec.make_config({"keep": self.budgets[0], **options})  # unknown / bad options raise here

    def method_names(self) -> list[str]:
        return list(self.methods) if self.methods is not None else list_methods(host="vlm", modality="image")


def load_config(path: str | Path | None = None, **overrides) -> RobustnessConfig:
    """A :class:`RobustnessConfig` from a YAML file (default :data:`DEFAULT_CONFIG`); ``model`` and ``task`` are
    resolved against the file's folder. Unknown keys raise ``ValueError`` naming the allowed ones."""
    import yaml

    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ValueError(
            f"robustness config {str(path)!r} not found (the default run uses the repository's "
            "configs/robustness.yaml, models/ and eval/tasks/: run it from a clone)"
        )
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
