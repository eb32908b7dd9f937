"""`vtprune demo` / `make demo`: the demo sweep config covers every method on the bundled model, and run_demo
writes the table, plots and results of a (here: tiny, random-model) sweep."""

from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

import vtprune  # noqa: E402
from vtprune.harness import config as hconfig  # noqa: E402
from vtprune.harness.demo import DEMO_CONFIG, run_demo  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_demo_config_sweeps_every_method_on_the_bundled_model():
    cfg = hconfig.load_config(DEMO_CONFIG)
    assert {m.method for m in cfg.methods} == set(vtprune.list_methods(host="vlm", modality="image"))
    assert cfg.budgets == [64, 28, 13]  # 25 / 11 / 5 % of 256 visual tokens
    model = Path(cfg.models[0].pretrained)
    assert model.resolve() == REPO / "models" / "tiny-llava-shapes" and (model / "model.safetensors").is_file()
    assert cfg.output_dir.resolve() == REPO / "runs" / "demo"  # untracked: a fresh clone's `make demo` leaves
    assert "/runs/" in (REPO / ".gitignore").read_text() or "runs/" in (REPO / ".gitignore").read_text().split()


def test_committed_demo_rows_record_the_model_relative_to_the_repository():
    from vtprune.harness.sweep import read_results, recorded_path

    rows = read_results(REPO / "eval" / "results" / "demo")
    assert {r["pretrained"] for r in rows} == {"models/tiny-llava-shapes"}
    assert recorded_path(str(REPO / "models" / "tiny-llava-shapes")) == "models/tiny-llava-shapes"
    assert recorded_path("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"


@pytest.mark.parametrize("method,budget", [("vispruner", 28)])  # a cell the stale table had wrong
def test_committed_demo_table_matches_what_the_code_gives(tmp_path, method, budget):
    """Two cells of the committed demo (the unpruned model and one method), rerun on the whole test split: the
    accuracies (and token counts, FLOPs) in eval/results/demo are what the current code produces."""
    import yaml

    from vtprune.harness.sweep import cell_key, read_results, run_sweep
    from vtprune.timing import num_threads

    committed = {cell_key(r): r for r in read_results(REPO / "eval" / "results" / "demo")}
    cfg = yaml.safe_load(DEMO_CONFIG.read_text())
    cfg["methods"] = [m for m in cfg["methods"] if (m if isinstance(m, str) else m.get("name", m["method"])) == method]
    cfg["budgets"] = [budget]
    cfg["output_dir"] = str(tmp_path)
    with num_threads(1):
        rows = run_sweep(cfg, base_dir=DEMO_CONFIG.parent, progress=False)
    assert len(rows) == 2
    for row in rows:
        old = committed[cell_key(row)]
        assert (row["score"], row["n"], row["visual_tokens"]) == (old["score"], old["n"], old["visual_tokens"])
        assert row["prefill_tflops"] == pytest.approx(old["prefill_tflops"])


def test_run_demo_writes_tables_plots_and_results(tmp_path):
    from vtprune.timing import num_threads

    config = tmp_path / "demo.yaml"
    config.write_text(
        f"name: demo-test\ninclude_path: {REPO / 'eval' / 'tasks'}\ndevice: cpu\ndtype: float32\nbatch_size: 4\n"
        "models:\n  - {random: llava, seed: 0, name: tiny}\nmethods: [random, divprune]\nbudgets: [13]\n"
        "tasks:\n  - {task: vtprune_shapes, metric: exact_match, scale: 100}\n"
    )
    with num_threads(1):
        paths = run_demo(config, output_dir=tmp_path / "out", limit=4, progress=False)
    for key in ("md", "csv", "tex", "results"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0
    assert {p.suffix for p in paths.values()} >= {".md", ".csv", ".tex", ".png", ".jsonl"}
    table = paths["md"].read_text()
    assert "random" in table and "divprune" in table
    with pytest.raises(ValueError, match="runs from a clone"):
        run_demo(tmp_path / "missing.yaml")
