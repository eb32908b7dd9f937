"""Run notebooks/quickstart.ipynb top to bottom and store its outputs in it (printed text, and the picture a cell
ends with as a PNG), so the committed notebook shows them on a repository page. No Jupyter needed:

    python notebooks/execute.py            # from the repository root, about a minute on a CPU
"""

from __future__ import annotations

import ast
import base64
import contextlib
import io
import json
import sys
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parent / "quickstart.ipynb"


def _display_data(value) -> dict | None:
    """A cell's last expression as notebook output: a PIL image as PNG, anything else as its repr."""
    if value is None:
        return None
    if hasattr(value, "save") and hasattr(value, "size"):  # a PIL image
        buf = io.BytesIO()
        value.save(buf, format="PNG", optimize=True)
        return {"output_type": "display_data", "metadata": {},
                "data": {"image/png": base64.b64encode(buf.getvalue()).decode(), "text/plain": [repr(value)]}}
    return {"output_type": "display_data", "metadata": {}, "data": {"text/plain": [repr(value)]}}


def run(path: Path = NOTEBOOK) -> None:
    nb = json.loads(path.read_text())
    namespace = {"__name__": "__main__"}
    count = 0
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        count += 1
        tree = ast.parse("".join(cell["source"]))
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(tree, f"cell {count}", "exec"), namespace)
            value = eval(compile(ast.Expression(last.value), f"cell {count}", "eval"), namespace) if last else None
        outputs = []
        if out.getvalue():
            outputs.append({"output_type": "stream", "name": "stdout", "text": out.getvalue().splitlines(True)})
        shown = _display_data(value)
        if shown is not None:
            outputs.append(shown)
        cell["outputs"], cell["execution_count"] = outputs, count
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    import os

    os.chdir(NOTEBOOK.parent)
    sys.exit(run())
