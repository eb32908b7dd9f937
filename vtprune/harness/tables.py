"""Paper-style tables from sweep results: rows method x budget, columns tasks, Avg, Rel. %, cost.

One table per (model, limit): the unpruned row first, then budgets from largest to smallest, methods in the
order they first appear. Columns:

* one per task: the task's score (``value * scale`` from the config: e.g. accuracy in %, MME as its sum);
* ``Avg``: the mean over tasks of ``score / max * 100`` (every task on 0-100), shown when the row has every task;
* ``Rel. %``: the mean over tasks of ``value / unpruned value * 100`` (the same model and limit), shown when the
  row and the unpruned row have every task and no unpruned value is 0;
* ``Tokens``: visual tokens kept per request (what really reached the end); where the budget names another count
  (a nominal setting of the method's paper: ``sparsevlm``'s per-budget counts, ``pdrop``'s layer average, ``dart``'s
  official rounding; the results' ``visual_tokens_nominal``), the cell shows both, ``8 (nominal 28)`` (CSV: column
  ``tokens_nominal``); ``TFLOPs``: analytic prefill TFLOPs per request; ``Prefill ms``: measured prefill per request
  (each cell's median); all averaged over the row's tasks, weighted by their requests.
* ``CAA succ. %``, only when the results also hold rows of ``vtprune robustness`` for the same model (rows with a
  ``perturbation``): the compression-aware attack's success rate on that method and budget at the largest epsilon
  (``-``: not measured, or the attack cannot reach the method).

When results.jsonl holds the same cell more than once, the last row wins. Markdown, CSV and LaTeX render the
same numbers (CSV unrounded).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path

from .model import UNPRUNED

__all__ = ["Table", "TableRow", "build_tables", "to_markdown", "to_csv", "to_latex", "write_tables"]

UNPRUNED_LABEL = "Unpruned"


@dataclasses.dataclass
class TableRow:
    method: str
    budget: int | float | None
    scores: dict[str, float]
    avg: float | None
    rel: float | None
    tokens: float | None
    tflops: float | None
    prefill_ms: float | None
    robust: float | None = None  # CAA success rate in % (robustness rows)
    tokens_nominal: float | None = None  # what the budget names (None: not recorded)

    @property
    def nominal_differs(self) -> bool:
        """Whether the budget names another count than the tokens kept (shown beside them)."""
        return (
            self.tokens is not None
            and self.tokens_nominal is not None
            and round(self.tokens) != round(self.tokens_nominal)
        )

    @property
    def label(self) -> str:
        return UNPRUNED_LABEL if self.method == UNPRUNED else self.method


@dataclasses.dataclass
class Table:
    model: str
    limit: int | None
    tasks: list[str]
    rows: list[TableRow]
    robust_eps: int | None = None  # epsilon (x 1/255) of the CAA column; None: no robustness rows

    @property
    def title(self) -> str:
        return self.model if self.limit is None else f"{self.model} (limit {self.limit})"


def _weighted(rows: list[dict], key: str) -> float | None:
    pairs = [(r[key], r.get("n") or 1) for r in rows if r.get(key) is not None]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None


def build_tables(results: list[dict]) -> list[Table]:
    """Group result rows into :class:`Table` objects (one per model and limit). Robustness rows (with a
    ``perturbation``) only fill the ``CAA succ. %`` column of their model's tables."""
    robust = [r for r in results if "perturbation" in r]
    results = [r for r in results if "perturbation" not in r]
    caa: dict[str, dict] = {}
    for r in robust:
        if r["perturbation"] == "caa" and not r.get("defense"):
            caa.setdefault(r["model"], {}).setdefault(r["epsilon"], {})[(r["method"], r["budget"])] = r
    latest: dict[tuple, dict] = {}
    for r in results:
        latest[(r["model"], r.get("limit"), r["method"], r.get("budget"), r["task"])] = r
    groups: dict[tuple, list[dict]] = {}
    for r in latest.values():
        groups.setdefault((r["model"], r.get("limit")), []).append(r)

    tables = []
    for (model, limit), rows in groups.items():
        tasks = list(dict.fromkeys(r["task"] for r in rows))
        methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != UNPRUNED))
        budgets = sorted({r["budget"] for r in rows if r["method"] != UNPRUNED}, reverse=True)
        cells: dict[tuple, dict[str, dict]] = {}
        for r in rows:
            cells.setdefault((r["method"], r.get("budget")), {})[r["task"]] = r
        base = cells.get((UNPRUNED, None), {})
        order = [(UNPRUNED, None)] if base else []
        order += [(m, b) for b in budgets for m in methods if (m, b) in cells]
        out = []
        for method, budget in order:
            got = cells[(method, budget)]
            complete = all(t in got for t in tasks)
            avg = (sum(got[t]["score"] / got[t]["max"] * 100 for t in tasks) / len(tasks)) if complete else None
            rel = None
            if complete and all(t in base and base[t]["value"] != 0 for t in tasks):
                rel = sum(got[t]["value"] / base[t]["value"] * 100 for t in tasks) / len(tasks)
            present = list(got.values())
            out.append(
                TableRow(
                    method=method,
                    budget=budget,
                    scores={t: got[t]["score"] for t in tasks if t in got},
                    avg=avg,
                    rel=rel,
                    tokens=_weighted(present, "visual_tokens"),
                    tflops=_weighted(present, "prefill_tflops"),
                    prefill_ms=_weighted(present, "prefill_ms"),
                    tokens_nominal=_weighted(present, "visual_tokens_nominal"),
                )
            )
        eps = max(caa.get(model, {}), default=None)
        if eps is not None:
            for row in out:
                hit = caa[model][eps].get((row.method, row.budget))
                if hit is not None and hit.get("attack_success") is not None:
                    row.robust = 100 * hit["attack_success"]
        tables.append(Table(model, limit, tasks, out, eps))
    return tables


# -- rendering -------------------------------------------------------------------------------------------------------
def _headers(table: Table) -> list[str]:
    extra = [f"CAA succ. % ({table.robust_eps}/255)"] if table.robust_eps is not None else []
    return ["Method", "Budget", *table.tasks, "Avg", "Rel. %", "Tokens", "TFLOPs", "Prefill ms", *extra]


def _fmt(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _cells(table: Table, row: TableRow) -> list[str]:
    return [
        row.label,
        "-" if row.budget is None else str(row.budget),
        *[_fmt(row.scores.get(t), ".1f") for t in table.tasks],
        _fmt(row.avg, ".1f"),
        _fmt(row.rel, ".1f"),
        _fmt(row.tokens, ".0f") + (f" (nominal {row.tokens_nominal:.0f})" if row.nominal_differs else ""),
        _fmt(row.tflops, ".3g"),
        _fmt(row.prefill_ms, ".1f"),
        *([_fmt(row.robust, ".1f")] if table.robust_eps is not None else []),
    ]


def to_markdown(tables: list[Table]) -> str:
    parts = []
    for table in tables:
        headers = _headers(table)
        body = [_cells(table, r) for r in table.rows]
        widths = [max(len(x) for x in col) for col in zip(headers, *body)]

        def line(cells, widths=widths):
            return (
                "| "
                + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
                + " |"
            )

        rule = (
            "|" + "|".join(":" + "-" * (w + 1) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
        )
        parts.append("\n".join([f"### {table.title}", "", line(headers), rule, *map(line, body)]))
    return "\n\n".join(parts) + "\n"


def to_csv(tables: list[Table]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    tasks = list(dict.fromkeys(t for table in tables for t in table.tasks))
    robust = any(table.robust_eps is not None for table in tables)
    writer.writerow(
        [
            "model",
            "limit",
            "method",
            "budget",
            *tasks,
            "avg",
            "rel_pct",
            "tokens",
            "tokens_nominal",
            "prefill_tflops",
            "prefill_ms",
            *(["caa_success_pct", "caa_epsilon"] if robust else []),
        ]
    )
    for table in tables:
        for r in table.rows:
            extra = ["" if r.robust is None else r.robust, "" if table.robust_eps is None else table.robust_eps]
            writer.writerow(
                [
                    table.model,
                    "" if table.limit is None else table.limit,
                    r.label,
                    "" if r.budget is None else r.budget,
                    *[r.scores.get(t, "") for t in tasks],
                    *[
                        "" if v is None else v
                        for v in (r.avg, r.rel, r.tokens, r.tokens_nominal, r.tflops, r.prefill_ms)
                    ],
                    *(extra if robust else []),
                ]
            )
    return buf.getvalue()


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"), ("$", r"\$")):
        text = text.replace(a, b)
    return text


def to_latex(tables: list[Table]) -> str:
    """``booktabs`` tabulars, one per table, the unpruned row separated by a rule."""
    parts = []
    for table in tables:
        headers = _headers(table)
        lines = [
            f"% {_tex(table.title)}",
            r"\begin{tabular}{l" + "r" * (len(headers) - 1) + "}",
            r"\toprule",
            " & ".join(_tex(h) for h in headers) + r" \\",
            r"\midrule",
        ]
        for i, row in enumerate(table.rows):
            lines.append(" & ".join(_tex(c) for c in _cells(table, row)) + r" \\")
            if i == 0 and row.method == UNPRUNED and len(table.rows) > 1:
                lines.append(r"\midrule")
        lines += [r"\bottomrule", r"\end{tabular}"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def write_tables(results: list[dict], out_dir: str | Path, stem: str = "table") -> dict[str, Path]:
    """Write ``<stem>.md``, ``<stem>.csv`` and ``<stem>.tex`` into ``out_dir``; return format -> path."""
    tables = build_tables(results)
    if not tables:
        raise ValueError("no result rows to tabulate")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for fmt, render in (("md", to_markdown), ("csv", to_csv), ("tex", to_latex)):
        paths[fmt] = out / f"{stem}.{fmt}"
        paths[fmt].write_text(render(tables))
    return paths
