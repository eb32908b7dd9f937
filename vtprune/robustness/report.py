"""What an audit writes: results, the Markdown / CSV tables, the transfer matrix and the plots."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..markdown import format_table
from ..plotstyle import legend_beside, series_styles
from .config import RobustnessConfig


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def summary_rows(rows: list[dict]) -> list[dict]:
    """One row per (method, budget): clean accuracy, mean benign Jaccard, accuracy and attack success under each
    epsilon of the CAA, and the defense's numbers (the CSV's rows)."""
    cells: dict[tuple, dict] = {}
    for r in rows:
        if r["perturbation"] == "transfer":
            continue
        c = cells.setdefault((r["method"], r["budget"]), {"method": r["method"], "budget": r["budget"]})
        d = "vote_" if r.get("defense") else ""
        p = r["perturbation"]
        if p == "none":
            c[f"{d}accuracy_clean"] = r["accuracy"]
            c["accuracy_unpruned_clean"] = r["accuracy_unpruned"]
            c[f"{d}select_ms"] = r.get("defense_select_ms" if d else "select_ms")
            c["surrogate"] = r.get("surrogate")
        elif p == "caa":
            e = r["epsilon"]
            c[f"{d}caa{e}_accuracy"] = r["accuracy"]
            c[f"{d}caa{e}_accuracy_unpruned"] = r["accuracy_unpruned"]
            c[f"{d}caa{e}_success"] = r["attack_success"]
            c[f"{d}caa{e}_jaccard"] = r["kept_jaccard"]
            if not r.get("reachable", True):
                c["unreachable"] = r.get("reason")
        else:
            c.setdefault(f"{d}_benign", []).append(r["kept_jaccard"])
            c[f"{d}{p}_jaccard"] = r["kept_jaccard"]
            c[f"{d}{p}_accuracy"] = r["accuracy"]
    out = []
    for c in cells.values():
        for d in ("", "vote_"):
            js = c.pop(f"{d}_benign", [])
            c[f"{d}benign_jaccard"] = sum(js) / len(js) if js else None
        out.append(c)
    return out


def transfer_matrix(rows: list[dict]) -> tuple[list[str], list[str], dict]:
    """``(sources, targets, cells)``: attack success of the perturbations crafted against each source
    ``method@budget`` on each target ``method@budget``."""
    t = [r for r in rows if r["perturbation"] == "transfer"]
    sources = list(dict.fromkeys(f"{r['source_method']}@{r['source_budget']}" for r in t))
    targets = list(dict.fromkeys(f"{r['method']}@{r['budget']}" for r in t))
    cells = {
        (f"{r['source_method']}@{r['source_budget']}", f"{r['method']}@{r['budget']}"): r["attack_success"] for r in t
    }
    return sources, targets, cells


def render_markdown(rows: list[dict], cfg: RobustnessConfig | None = None) -> str:
    summary = summary_rows(rows)
    perts = list(
        dict.fromkeys(
            r["perturbation"]
            for r in rows
            if r["perturbation"] not in ("none", "caa", "transfer") and not r.get("defense")
        )
    )
    eps = sorted({r["epsilon"] for r in rows if r["perturbation"] == "caa"})
    n = next((r["n"] for r in rows if r["perturbation"] == "none"), 0)
    parts = [f"Questions: {n}. Accuracy and attack success in %; Jaccard of the kept set with the clean image's.", ""]
    parts += ["### Ranking stability (kept-set Jaccard) and accuracy under benign perturbations", ""]
    body = []
    for c in summary:
        body.append(
            [
                c["method"],
                c["budget"],
                _pct(c.get("accuracy_clean")),
                *[f"{c.get(f'{p}_jaccard'):.3f}" if c.get(f"{p}_jaccard") is not None else "-" for p in perts],
                f"{c['benign_jaccard']:.3f}" if c.get("benign_jaccard") is not None else "-",
                *[_pct(c.get(f"{p}_accuracy")) for p in perts],
            ]
        )
    unpruned = [r for r in rows if r["perturbation"] in ("none", *perts) and not r.get("defense")]
    acc_un = {r["perturbation"]: r["accuracy_unpruned"] for r in unpruned}
    body.insert(
        0,
        [
            "unpruned",
            "-",
            _pct(acc_un.get("none")),
            *["1.000"] * len(perts),
            "1.000",
            *[_pct(acc_un.get(p)) for p in perts],
        ],
    )
    parts.append(
        format_table(
            ["method", "budget", "acc clean", *[f"J {p}" for p in perts], "J mean", *[f"acc {p}" for p in perts]], body
        )
    )
    parts += ["", "### Compression-aware attack (white box, PGD through the method's surrogate)", ""]
    body = []
    for c in summary:
        if c.get("unreachable"):
            body.append(
                [
                    c["method"],
                    c["budget"],
                    "-",
                    _pct(c.get("accuracy_clean")),
                    *["n/a"] * (4 * len(eps)),
                    "unreachable: " + c["unreachable"],
                ]
            )
            continue
        body.append(
            [
                c["method"],
                c["budget"],
                c.get("surrogate") or "-",
                _pct(c.get("accuracy_clean")),
                *[_pct(c.get(f"caa{e}_accuracy")) for e in eps],
                *[_pct(c.get(f"caa{e}_accuracy_unpruned")) for e in eps],
                *[_pct(c.get(f"caa{e}_success")) for e in eps],
                *["-" if c.get(f"caa{e}_jaccard") is None else f"{c[f'caa{e}_jaccard']:.3f}" for e in eps],
                "",
            ]
        )
    parts.append(
        format_table(
            [
                "method",
                "budget",
                "surrogate",
                "acc clean",
                *[f"acc CAA {e}/255" for e in eps],
                *[f"unpruned acc CAA {e}/255" for e in eps],
                *[f"success {e}/255" for e in eps],
                *[f"J CAA {e}/255" for e in eps],
                "note",
            ],
            body,
        )
    )
    sources, targets, cells = transfer_matrix(rows)
    if sources:
        te = next(r["epsilon"] for r in rows if r["perturbation"] == "transfer")
        src_m = list(dict.fromkeys(s.split("@")[0] for s in sources))
        tgt_m = list(dict.fromkeys(t.split("@")[0] for t in targets))
        body = []
        for sm in src_m:
            line = [sm]
            for tm in tgt_m:
                vals = [
                    v
                    for (s, t), v in cells.items()
                    if s.split("@")[0] == sm and t.split("@")[0] == tm and v is not None
                ]
                line.append(_pct(sum(vals) / len(vals)) if vals else "-")
            body.append(line)
        parts += [
            "",
            f"### Transfer attack (black box, epsilon {te}/255): attack success on the target, source "
            "method (rows) x target method (columns), mean over source and target budgets; per budget in "
            "transfer.csv",
            "",
        ]
        parts.append(format_table(["source \\ target", *tgt_m], body))
    if any(r.get("defense") for r in rows):
        dperts = list(
            dict.fromkeys(
                r["perturbation"] if r["perturbation"] != "caa" else f"caa{r['epsilon']}"
                for r in rows
                if r.get("defense") and r["perturbation"] != "none"
            )
        )
        aug = next(r["augmentations"] for r in rows if r.get("defense"))
        parts += [
            "",
            f"### Defense: kept set by vote over the image and {aug} random augmentations "
            "(attack rows: perturbations crafted against the undefended method)",
            "",
        ]
        index = {
            (r["method"], r["budget"], r["perturbation"], r.get("epsilon"), bool(r.get("defense"))): r
            for r in rows
            if r["perturbation"] != "transfer"
        }
        body = []
        for c in summary:
            m, b = c["method"], c["budget"]
            line = [
                m,
                b,
                f"{c.get('select_ms') or 0:.2f}",
                f"{c.get('vote_select_ms') or 0:.2f}",
                _pct(c.get("accuracy_clean")),
                _pct(c.get("vote_accuracy_clean")),
            ]
            for p in dperts:
                key = ("caa", int(p[3:])) if p.startswith("caa") else (p, None)
                plain, dfd = index.get((m, b, key[0], key[1], False)), index.get((m, b, key[0], key[1], True))
                if p.startswith("caa"):
                    line += [_pct(plain and plain["attack_success"]), _pct(dfd and dfd["attack_success"])]
                else:
                    line += [
                        f"{plain['kept_jaccard']:.3f}" if plain else "-",
                        f"{dfd['kept_jaccard']:.3f}" if dfd else "-",
                    ]
            body.append(line)
        heads = []
        for p in dperts:
            heads += (
                [f"success {p[3:]}/255", f"vote success {p[3:]}/255"]
                if p.startswith("caa")
                else [f"J {p}", f"vote J {p}"]
            )
        parts.append(
            format_table(
                ["method", "budget", "select ms", "vote select ms", "acc clean", "vote acc clean", *heads], body
            )
        )
    return "\n".join(parts) + "\n"


def write_outputs(rows: list[dict], out_dir: str | Path, cfg: RobustnessConfig | None = None) -> dict[str, Path]:
    """Write ``results.jsonl``, ``table.md``, ``table.csv``, ``transfer.csv`` and the plots into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.jsonl", "md": out / "table.md", "csv": out / "table.csv"}
    paths["results"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["md"].write_text(render_markdown(rows, cfg))
    summary = summary_rows(rows)
    keys = list(dict.fromkeys(k for c in summary for k in c))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for c in summary:
        writer.writerow({k: "" if c.get(k) is None else c[k] for k in keys})
    paths["csv"].write_text(buf.getvalue())
    sources, targets, cells = transfer_matrix(rows)
    if sources:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["source \\ target", *targets])
        for s in sources:
            writer.writerow([s, *["" if cells.get((s, t)) is None else cells[(s, t)] for t in targets]])
        paths["transfer"] = out / "transfer.csv"
        paths["transfer"].write_text(buf.getvalue())
    paths.update(plot_robustness(rows, out))
    return paths


def plot_robustness(rows: list[dict], out_dir: str | Path) -> dict[str, Path]:
    """``stability_vs_budget.png`` (mean benign Jaccard per method over budgets) and ``accuracy_under_attack.png``
    (pruned accuracy per method against epsilon, one panel per budget; dashed: unpruned)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    summary = summary_rows(rows)
    methods = list(dict.fromkeys(c["method"] for c in summary))
    budgets = sorted({c["budget"] for c in summary}, reverse=True)
    paths = {}
    styles = series_styles(methods)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for m in methods:
        pts = [
            (c["budget"], c["benign_jaccard"])
            for c in summary
            if c["method"] == m and c.get("benign_jaccard") is not None
        ]
        if pts:
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, label=m, **styles[m])
    ax.set_xlabel("visual tokens kept (of 256)")
    ax.set_ylabel("kept-set Jaccard vs clean (benign mean)")
    ax.set_title("Ranking stability")
    ax.grid(True, alpha=0.3)
    legend_beside(ax)
    fig.tight_layout()
    paths["stability"] = out / "stability_vs_budget.png"
    fig.savefig(paths["stability"], dpi=120, bbox_inches="tight")
    plt.close(fig)

    eps = sorted({r["epsilon"] for r in rows if r["perturbation"] == "caa" and r.get("accuracy") is not None})
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.6 * len(budgets), 4.2), squeeze=False, sharey=True)
    for ax, b in zip(axes[0], budgets):
        for m in methods:
            c = next((c for c in summary if c["method"] == m and c["budget"] == b), None)
            if c is None or c.get("unreachable"):
                continue
            ys = [c.get("accuracy_clean")] + [c.get(f"caa{e}_accuracy") for e in eps]
            ax.plot([0, *eps], [100 * y for y in ys], label=m, **{**styles[m], "linestyle": "-"})
            ax.plot(
                [0, *eps],
                [
                    100 * y
                    for y in [c.get("accuracy_unpruned_clean")] + [c.get(f"caa{e}_accuracy_unpruned") for e in eps]
                ],
                linestyle="--",
                linewidth=0.8,
                color=styles[m]["color"],
            )
        ax.set_title(f"keep {b}")
        ax.set_xlabel("epsilon (x 1/255)")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("accuracy % (solid: pruned, dashed: unpruned)")
    legend_beside(list(axes[0]))
    fig.tight_layout()
    paths["attack"] = out / "accuracy_under_attack.png"
    fig.savefig(paths["attack"], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths
