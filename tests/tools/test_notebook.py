"""notebooks/quickstart.ipynb runs top to bottom (its code cells, in one namespace, as a kernel would) and is
committed with its outputs (``python notebooks/execute.py``), the kept tokens' picture among them."""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(monkeypatch):
    if not (REPO / "models" / "tiny-llava-shapes" / "model.safetensors").is_file():
        pytest.fail("the bundled model models/tiny-llava-shapes is missing")
    from vtprune.timing import num_threads

    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c.get("outputs") for c in code[:-1] if "print(" in "".join(c["source"])), (
        "commit the notebook with its outputs (python notebooks/execute.py)"
    )
    pictures = [c for c in code if any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]
    assert any("viz.compare" in "".join(c["source"]) for c in pictures)  # the kept tokens, visible on the page
    shown = []
    namespace = {"display": shown.append, "__name__": "__main__"}
    monkeypatch.chdir(REPO / "notebooks")
    with num_threads(1):
        for i, cell in enumerate(code):
            source = "".join(cell["source"])
            assert not any(line.lstrip().startswith(("%", "!")) for line in source.splitlines()), (
                "keep the notebook free of IPython magics (the test runs it as plain Python)"
            )
            exec(compile(source, f"{NOTEBOOK.name}[cell {i}]", "exec"), namespace)
    # the cells built what they promise: every method's kept tokens, drawn side by side
    import vtprune

    assert set(namespace["kept"]) == set(vtprune.list_methods(host="vlm", modality="image"))
    keep = namespace["KEEP"]  # sparsevlm: its official per-layer counts end below the budget
    kept = {m: st.kept_indices[0] for m, st in namespace["kept"].items()}
    assert all(len(k) == keep if m != "sparsevlm" else 0 < len(k) < keep for m, k in kept.items())
    sheet = eval("viz.compare(image, kept, grid=shapes.GRID, size=shapes.IMAGE_SIZE, columns=5)", namespace)
    rows = -(-len(kept) // 5)
    assert 2 * 224 * 5 < sheet.width < 2 * 224 * 6 and rows * 2 * 224 < sheet.height < rows * (2 * 224 + 40)
    assert namespace["kept"]["pool"].merged_into[0] is not None  # drawn as the regions its tokens cover
    assert float(namespace["results"][0][1]) >= 0.5  # the trained model answers most of its questions
