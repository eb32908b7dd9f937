"""notebooks/quickstart.ipynb runs top to bottom (its code cells, in one namespace, as a kernel would) and is
committed without outputs."""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(monkeypatch):
    if not (REPO / "models" / "tiny-llava-shapes" / "model.safetensors").is_file():
        pytest.fail("the bundled model models/tiny-llava-shapes is missing")
    from vtprune.timing import num_threads

    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c.get("outputs") for c in code), "commit the notebook without outputs"
    shown = []
    namespace = {"display": shown.append, "__name__": "__main__"}
    monkeypatch.chdir(REPO / "notebooks")
    with num_threads(1):
        for i, cell in enumerate(code):
            source = "".join(cell["source"])
            assert not any(line.lstrip().startswith(("%", "!")) for line in source.splitlines()), \
                "keep the notebook free of IPython magics (the test runs it as plain Python)"
            exec(compile(source, f"{NOTEBOOK.name}[cell {i}]", "exec"), namespace)
    # the cells built what they promise: every method's kept tokens, drawn side by side
    import vtprune

    assert set(namespace["kept"]) == set(vtprune.list_methods(host="vlm"))
    keep = namespace["KEEP"]  # sparsevlm: its official per-layer counts end below the budget
    assert all(len(k) == keep if m != "sparsevlm" else 0 < len(k) < keep for m, k in namespace["kept"].items())
    sheet = eval("viz.compare(image, kept, grid=shapes.GRID, size=shapes.IMAGE_SIZE)", namespace)
    assert sheet.width > 224 * len(namespace["kept"])
    assert float(namespace["results"][0][1]) >= 0.5  # the trained model answers most of its questions
