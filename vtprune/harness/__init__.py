"""Evaluation harness (needs the ``vtprune[eval]`` extra: lmms-eval, matplotlib).

* :mod:`~vtprune.harness.model` -- the ``vtprune`` lmms-eval model (entry point ``lmms_eval.models``);
* :mod:`~vtprune.harness.config` -- sweep configs (models x methods x budgets x tasks), checked up front;
* :mod:`~vtprune.harness.sweep` -- :func:`run_sweep`: every cell through lmms-eval into results.jsonl, resumable;
* :mod:`~vtprune.harness.tables` / :mod:`~vtprune.harness.plots` -- paper-style tables (Markdown, CSV, LaTeX)
  and accuracy-vs-cost plots.
"""

from .config import SweepConfig, load_config
from .plots import plot_results
from .sweep import check_config, read_results, run_sweep
from .tables import build_tables, write_tables

__all__ = [
    "run_sweep",
    "check_config",
    "load_config",
    "SweepConfig",
    "read_results",
    "build_tables",
    "write_tables",
    "plot_results",
]
