"""End to end, offline: a sweep of 3 methods (one a schedule) x 2 budgets (+ the unpruned baseline) on a tiny random
LLaVA saved
locally, through lmms-eval and the local vtprune_shapes task; then the table and plot commands.

The rows are checked against an independent route: the same documents answered one at a time with plain
``transformers`` generate on the (un)patched model, scored by comparing the first generated word with the
answer, and FLOPs / KV-cache bytes from ``vtprune.flops`` for each prompt. Resuming skips every finished cell;
an lmms-eval task that fails raises instead of writing a row.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval")

import vtprune  # noqa: E402
from vtprune import cli, flops, shapes  # noqa: E402
from vtprune.harness import run_sweep  # noqa: E402
from vtprune.harness.model import load_pretrained  # noqa: E402
from vtprune.harness.plots import series  # noqa: E402
from vtprune.harness.tiny import save_random_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TASK_DIR = REPO / "eval" / "tasks" / "vtprune_shapes"
LIMIT = 12
BUDGETS = [16, 64]
# a vision-stage method, an llm-stage (layer 2) method, and a schedule of both (divprune keeps 96, then dart)
SCHEDULE = [{"method": "divprune", "keep": 96}, {"method": "dart", "layer": 2}]
METHODS = [("random", {}), ("dart", {"layer": 2}), ("schedule", {"schedule": SCHEDULE})]
MAX_NEW = 4  # the task's max_new_tokens


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread is fastest, and immune to oversubscription when the machine is busy."""
    from vtprune.timing import num_threads

    with num_threads(1):
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random-weight LLaVA (CLIP 224/14: 256 visual tokens; 4-layer Llama) with the shapes processor."""
    return save_random_model(tmp_path_factory.mktemp("tiny_llava") / "model", seed=0)


@pytest.fixture(scope="module")
def sweep(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    config = {
        "name": "e2e",
        "models": [{"pretrained": str(model_dir), "name": "tiny"}],
        "methods": [{"method": m, "options": o} if m != "schedule" else {"name": "schedule", **o} for m, o in METHODS],
        "budgets": BUDGETS,
        "tasks": [{"task": "vtprune_shapes", "metric": "exact_match", "scale": 100}],
        "include_path": str(TASK_DIR.parent),
        "batch_size": 4,
        "device": "cpu",
        "dtype": "float32",
    }
    rows = run_sweep(config, output_dir=out, limit=LIMIT, progress=False)
    return config, out, rows


def _reference(model_dir):
    """Per cell, from plain transformers generate, one document at a time: accuracy, mean visual tokens kept,
    mean prefill FLOPs, mean KV-cache MiB."""
    model, processor = load_pretrained(str(model_dir), device="cpu", dtype="float32")
    docs = shapes.load_split(TASK_DIR / "test.jsonl")[:LIMIT]
    text_cfg = model.config.text_config
    layers = text_cfg.num_hidden_layers
    cells = [("none", None, {})] + [(m, b, o) for m, o in METHODS for b in BUDGETS]
    out = {}
    for method, budget, options in cells:
        correct, kept, fl, kv = [], [], [], []
        for doc in docs:
            prompt = processor.apply_chat_template(
                shapes.chat(doc["question"]), add_generation_prompt=True, tokenize=False
            )
            from PIL import Image

            image = Image.open(TASK_DIR / doc["image"]).convert("RGB")
            inputs = processor(text=[prompt], images=[image], return_tensors="pt")
            seq = inputs["input_ids"].shape[1]
            if method == "none":
                with torch.no_grad():
                    ids = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
                kept.append(256)
                fl.append(flops.prefill_flops(model.config, seq))
                kv.append(flops.kv_cache_bytes(text_cfg, seq, dtype=torch.float32))
            else:
                if method == "schedule":  # divprune keeps 96 at the vision entry, dart keeps the budget at layer 2
                    first = vtprune.PruneConfig.from_dict(SCHEDULE[0])
                    second = vtprune.PruneConfig.from_dict({**SCHEDULE[1], "keep": budget})
                    lengths = [seq - (256 - 96)] * 2 + [seq - (256 - budget)] * (layers - 2)
                    how = {"method": [first, second]}
                else:
                    k = options.get("layer", 0)
                    lengths = [seq] * k + [seq - (256 - budget)] * (layers - k)
                    how = {"method": method, "keep": budget, **options}
                with vtprune.patched(model, **how), torch.no_grad():
                    ids = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
                    st = vtprune.stats(model)
                kept.append(st.visual_tokens_kept[0])
                fl.append(st.prefill_flops)
                kv.append(flops.kv_cache_bytes(text_cfg, lengths, dtype=torch.float32))
            words = processor.tokenizer.decode(ids[0, seq:], skip_special_tokens=True).split()
            correct.append(bool(words) and words[0] == doc["answer"])
        out[(method, budget)] = (
            statistics.fmean(correct),
            statistics.fmean(kept),
            statistics.fmean(fl) / 1e12,
            statistics.fmean(kv) / 2**20,
        )
    return out


def test_sweep_rows_match_an_independent_route(sweep, model_dir):
    _, out, rows = sweep
    assert [(r["method"], r["budget"]) for r in rows] == [("none", None)] + [
        (m, b) for m, _ in METHODS for b in BUDGETS
    ]
    lines = (out / "results.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == rows
    reference = _reference(model_dir)
    for r in rows:
        acc, kept, tflops, kv_mb = reference[(r["method"], r["budget"])]
        assert r["task"] == "vtprune_shapes" and r["metric"] == "exact_match" and r["model"] == "tiny"
        assert r["n"] == LIMIT and r["limit"] == LIMIT and r["batch_size"] == 4
        assert r["value"] == pytest.approx(acc), r
        assert r["score"] == pytest.approx(100 * acc)
        assert r["visual_tokens_in"] == 256
        assert r["visual_tokens"] == pytest.approx(kept)
        if r["budget"] is not None:
            assert r["visual_tokens"] == r["budget"]
        assert r["prefill_tflops"] == pytest.approx(tflops, rel=1e-9)
        assert r["kv_cache_mb"] == pytest.approx(kv_mb, rel=1e-9)
        assert r["prefill_ms"] > 0 and r["peak_memory_mb"] is None  # peak memory is measured on CUDA only
    by = {(r["method"], r["budget"]): r for r in rows}
    assert (
        by[("dart", 16)]["prefill_tflops"] < by[("dart", 64)]["prefill_tflops"] < by[("none", None)]["prefill_tflops"]
    )


def test_resume_skips_finished_cells(sweep, monkeypatch):
    config, out, rows = sweep
    before = (out / "results.jsonl").read_text()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr("vtprune.harness.sweep.load_pretrained", refuse)
    again = run_sweep(config, output_dir=out, limit=LIMIT, progress=False)
    assert again == rows
    assert (out / "results.jsonl").read_text() == before


def test_table_and_plot_commands(sweep, capsys):
    _, out, rows = sweep
    results = str(out / "results.jsonl")
    assert cli.main(["table", results]) == 0
    printed = capsys.readouterr().out
    md = (out / "table.md").read_text()
    assert md in printed
    body = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()[4:] if line.startswith("|")]
    base = rows[0]["value"]
    expected_order = [("Unpruned", "-")] + [(m, str(b)) for b in sorted(BUDGETS, reverse=True) for m, _ in METHODS]
    assert [tuple(r[:2]) for r in body] == expected_order
    by = {(r["method"] if r["method"] != "none" else "Unpruned", str(r["budget"] or "-")): r for r in rows}
    for cells in body:
        r = by[(cells[0], cells[1])]
        assert cells[2] == f"{r['score']:.1f}" and cells[3] == f"{r['score']:.1f}"  # task, Avg (one task)
        assert cells[4] == (f"{r['value'] / base * 100:.1f}" if base else "-")
        assert cells[5] == f"{r['visual_tokens']:.0f}"
        assert cells[6] == f"{r['prefill_tflops']:.3g}" and cells[7] == f"{r['prefill_ms']:.1f}"
    with open(out / "table.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    for line in table:
        r = by[(line["method"], line["budget"] or "-")]
        assert float(line["vtprune_shapes"]) == pytest.approx(r["score"])
        assert float(line["prefill_tflops"]) == pytest.approx(r["prefill_tflops"])
    assert (out / "table.tex").read_text().count(r"\\") == len(rows) + 1

    assert cli.main(["plot", results, "--out", str(out / "plots")]) == 0
    for name in ("accuracy_vs_flops.png", "accuracy_vs_tokens.png"):
        png = (out / "plots" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    (panel,) = series(rows, x="tokens").values()
    assert panel["dart"] == [
        (by[("dart", str(b))]["visual_tokens"], by[("dart", str(b))]["score"]) for b in sorted(BUDGETS, reverse=True)
    ]


def test_a_failing_task_raises_and_writes_no_row(model_dir, tmp_path):
    """lmms-eval's CLI would exit 0 here; the sweep raises and leaves no row for the failed cell."""
    broken = tmp_path / "tasks" / "vtprune_shapes_broken"
    broken.mkdir(parents=True)
    yaml_text = (TASK_DIR / "vtprune_shapes.yaml").read_text()
    yaml_text = yaml_text.replace("task: vtprune_shapes", "task: vtprune_shapes_broken")
    yaml_text = yaml_text.replace("test: test.jsonl", f"test: {TASK_DIR / 'test.jsonl'}")
    (broken / "broken.yaml").write_text(yaml_text)
    (broken / "utils.py").write_text(
        (TASK_DIR / "utils.py").read_text() + "\n\ndef doc_to_visual(doc):\n    raise OSError('image unreadable')\n"
    )
    config = {
        "models": [{"pretrained": str(model_dir)}],
        "methods": ["random"],
        "budgets": [16],
        "tasks": ["vtprune_shapes_broken"],
        "include_path": str(tmp_path / "tasks"),
        "device": "cpu",
    }
    with pytest.raises(OSError, match="image unreadable"):
        run_sweep(config, output_dir=tmp_path / "out", limit=2, progress=False)
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_a_nan_metric_raises(model_dir, tmp_path):
    """The first two questions are no position questions: position_acc is NaN, which is refused."""
    assert {d["type"] for d in shapes.load_split(TASK_DIR / "test.jsonl")[:2]} & {"position"} == set()
    config = {
        "models": [{"pretrained": str(model_dir)}],
        "methods": ["random"],
        "budgets": [16],
        "tasks": [{"task": "vtprune_shapes", "metric": "position_acc"}],
        "include_path": str(TASK_DIR.parent),
        "device": "cpu",
    }
    with pytest.raises(RuntimeError, match="'position_acc' = nan"):
        run_sweep(config, output_dir=tmp_path / "out", limit=2, progress=False)
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_no_progress_silences_every_bar(model_dir, tmp_path, capfd):
    """progress=False (--quiet): no progress bar at all on stderr, lmms-eval's (contexts, postprocessing),
    transformers' (weight loading), datasets' and vtprune's own included; tqdm is left as it was."""
    import tqdm.std

    before = tqdm.std.tqdm.__dict__["__init__"]
    config = {
        "models": [{"pretrained": str(model_dir)}],
        "methods": ["random"],
        "budgets": [16],
        "tasks": ["vtprune_shapes"],
        "include_path": str(TASK_DIR.parent),
        "device": "cpu",
    }
    capfd.readouterr()
    rows = run_sweep(config, output_dir=tmp_path, limit=2, progress=False)
    err = capfd.readouterr().err
    assert len(rows) == 2 and "it/s]" not in err and "%|" not in err, err
    assert tqdm.std.tqdm.__dict__["__init__"] is before
    with open(tmp_path / "bar.txt", "w") as f, tqdm.std.tqdm(total=1, file=f) as bar:
        assert not bar.disable
