"""Series styles that stay apart in print: colour, marker and line style per method, and a legend beside the data.

Used by the sweep plots (:mod:`vtprune.harness.plots`) and the robustness plots (:mod:`vtprune.robustness.report`).
Series ``i`` gets colour ``i % 10`` of matplotlib's ``tab10``, marker ``(i + i // 10) % 10`` and line style
``i // 10``: the first 40 series differ in (colour, marker, line style) and, in greyscale, in (marker, line style).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["series_styles", "legend_beside"]

COLORS = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:gray",
    "tab:olive",
    "tab:cyan",
)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
LINESTYLES = ("-", "--", ":", "-.")


def series_styles(labels: Iterable[str]) -> dict[str, dict]:
    """Label -> matplotlib keyword arguments (``color``, ``marker``, ``linestyle``), in the order the labels first
    come. More than 40 distinct labels raise ``ValueError`` (styles would repeat)."""
    order = list(dict.fromkeys(labels))
    limit = len(COLORS) * len(LINESTYLES)
    if len(order) > limit:
        raise ValueError(f"{len(order)} series to style; at most {limit} stay distinguishable")
    return {
        label: {
            "color": COLORS[i % 10],
            "marker": MARKERS[(i + i // 10) % len(MARKERS)],
            "linestyle": LINESTYLES[i // 10],
        }
        for i, label in enumerate(order)
    }


def legend_beside(axes) -> None:
    """One legend of every labelled line in ``axes`` (an axes, or a sequence of panels: each label once), to the
    right of the last panel, outside the data. Save the figure with ``bbox_inches="tight"`` so it is kept."""
    axes = list(axes) if isinstance(axes, (list, tuple)) else [axes]
    seen: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        axes[-1].legend(
            list(seen.values()),
            list(seen),
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            borderaxespad=0.0,
            fontsize="small",
            ncol=1 if len(seen) <= 16 else 2,
        )
