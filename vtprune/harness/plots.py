"""Accuracy-vs-cost plots from sweep results (matplotlib, written as PNG).

Two figures, one panel per (model, limit) table: accuracy against analytic prefill TFLOPs per request, and
against visual tokens kept. Accuracy is the table's ``Avg`` (or ``Rel. %`` with ``y="rel"``); each method is a
line over its budgets (a colour, marker and line style of its own, :mod:`vtprune.plotstyle`; one legend beside the
panels), the unpruned model a star with a dashed horizontal line. Rows without the y value
(a task missing) are left out.
"""

from __future__ import annotations

from pathlib import Path

from ..plotstyle import legend_beside, series_styles
from .tables import UNPRUNED_LABEL, build_tables

__all__ = ["plot_results", "series"]

_X = {"flops": ("tflops", "prefill TFLOPs per request"), "tokens": ("tokens", "visual tokens kept per image")}
_Y = {"avg": ("avg", "Avg score (0-100)"), "rel": ("rel", "Rel. % of unpruned")}


def series(results: list[dict], x: str = "flops", y: str = "avg") -> dict[str, dict[str, list[tuple[float, float]]]]:
    """The points :func:`plot_results` draws: table title -> method label -> [(x, y), ...] by decreasing budget."""
    if x not in _X:
        raise ValueError(f"x must be one of {sorted(_X)}, got {x!r}")
    if y not in _Y:
        raise ValueError(f"y must be one of {sorted(_Y)}, got {y!r}")
    out = {}
    for table in build_tables(results):
        lines: dict[str, list[tuple[float, float]]] = {}
        for row in table.rows:
            xv, yv = getattr(row, _X[x][0]), getattr(row, _Y[y][0])
            if xv is not None and yv is not None:
                lines.setdefault(row.label, []).append((xv, yv))
        out[table.title] = lines
    return out


def plot_results(results: list[dict], out_dir: str | Path, y: str = "avg") -> dict[str, Path]:
    """Write ``accuracy_vs_flops.png`` and ``accuracy_vs_tokens.png`` into ``out_dir``; return x -> path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for x, (_, xlabel) in _X.items():
        data = series(results, x=x, y=y)
        if not any(data.values()):
            raise ValueError(f"nothing to plot: no row has both {x} and {y} (every task of a row must be present)")
        fig, axes = plt.subplots(1, len(data), figsize=(5.5 * len(data), 4.2), squeeze=False)
        styles = series_styles(label for lines in data.values() for label in lines if label != UNPRUNED_LABEL)
        for ax, (title, lines) in zip(axes[0], data.items()):
            for label, points in lines.items():
                xs, ys = zip(*points)
                if label == UNPRUNED_LABEL:
                    ax.axhline(ys[0], color="grey", linestyle="--", linewidth=1)
                    ax.plot(xs, ys, marker="*", markersize=12, linestyle="none", color="black", label=label)
                else:
                    ax.plot(xs, ys, label=label, **styles[label])
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(_Y[y][1])
            ax.grid(True, alpha=0.3)
        legend_beside(list(axes[0]))
        fig.tight_layout()
        paths[x] = out / f"accuracy_vs_{x}.png"
        fig.savefig(paths[x], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return paths
