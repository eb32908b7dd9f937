"""eval/bench/overhead.py on the tiny model: one row per registered method, a timed layer that really is the model's
layer 0 in prefill (checked against the unpatched model's own hidden states), verdicts that follow the numbers, and
argparse errors for bad flags."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

import pytest
import torch
from conftest import opts

import vtprune
from vtprune.latency import build_random_llava

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load():
    spec = importlib.util.spec_from_file_location("bench_overhead", os.path.join(ROOT, "eval", "bench", "overhead.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


overhead = _load()


@functools.cache
def _tiny():
    return build_random_llava()


def _rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if not line.startswith("|") or line.startswith("|:"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "method":
            assert tuple(cells) == overhead.HEADERS
            continue
        rows.append(cells)
    return rows


def test_small_run_has_one_row_per_method(tmp_path, capsys):
    out = tmp_path / "overhead.md"
    assert overhead.main(["--small", "--repeats", "2", "--warmup", "0", "--out", str(out)]) == 0
    text = out.read_text()
    assert "command: `" in text and "--small" in text and "threads: 1" in text
    rows = _rows(text)
    assert [r[0] for r in rows] == vtprune.list_methods(host="vlm", modality="image")
    assert _rows(capsys.readouterr().out) == rows  # printed too
    for method in ("random", "fastv", "cls", "dart", "divprune"):  # these run on LLaVA
        (row,) = [r for r in rows if r[0] == method]
        assert row[3] == "64" and row[4] == "64", row
        select, layer, ratio = float(row[5]), float(row[8]), float(row[9])
        outside = float(row[7]) if row[7] != "-" else 0.0
        assert select > 0 and layer > 0
        # the printed numbers are rounded (ms to 0.01 / layer to 0.1 / ratio to 0.0001): compare within that
        low = (select + outside - 0.01) / (layer + 0.05) - 5e-5
        high = (select + outside + 0.01) / (layer - 0.05) + 5e-5
        assert low <= ratio <= high, (row, low, high)
        assert row[10] == ("yes" if ratio <= 1 else "**no**")
    over = [r[0] for r in rows if r[10] == "**no**"]
    assert ("Verdict: over budget: " + over[0]) in text if over else "Verdict: every method" in text
    by_name = {r[0]: r for r in rows}
    assert by_name["fastv"][1:3] == ["llm", "2"] and by_name["random"][1:3] == ["vision", "-"]
    assert by_name["cls"][7] != "-" and by_name["random"][7] == "-"  # CLS rows are computed in the tower hooks


def test_methods_subset_and_several_budgets(tmp_path):
    out = tmp_path / "o.md"
    assert (
        overhead.main(
            [
                "--small",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--methods",
                "fastv,random",
                "--keep",
                "16,32",
                "--variant",
                "fastv:layer=1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = _rows(out.read_text())
    assert [(r[0], r[2], r[3], r[4]) for r in rows] == [
        ("fastv", "2", "16", "16"),
        ("fastv", "2", "32", "32"),
        ("random", "-", "16", "16"),
        ("random", "-", "32", "32"),
        ("fastv layer=1", "1", "16", "16"),
        ("fastv layer=1", "1", "32", "32"),
    ]


def test_layers_needed_matches_the_pruning_layer():
    assert overhead.layers_needed("random", 8, vision_layers=4, max_layers=4) == (1, None)
    assert overhead.layers_needed("fastv", 8, vision_layers=4, max_layers=4) == (3, None)  # K=2 < num_layers
    n, reason = overhead.layers_needed("fastv", 8, vision_layers=4, max_layers=2)
    assert n is None and "layer=2" in reason


def test_timed_layer_is_layer_0_of_the_prefill():
    model, inputs = _tiny()
    with torch.no_grad():
        hs = model(**inputs, output_hidden_states=True).hidden_states
    run = overhead.one_layer(model, hs[0])
    torch.testing.assert_close(run(), hs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "argv",
    [
        ["--keep", "0"],
        ["--keep", "a"],
        ["--methods", "nope"],
        ["--threads", "0"],
        ["--warmup", "-1"],
        ["--variant", "fastv"],
        ["--variant", "nope:a=1"],
        ["--variant", "fastv:nope=1"],
        ["--variant", "fastv:layer=0"],
    ],
)
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        overhead.main(["--small", *argv])
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize(
    "method",
    [m for m in vtprune.list_methods(host="vlm", modality="image") if m in ("cls", "todre", "visionzip", "prumerge")],
)
def test_timed_hook_signals_have_the_engines_shapes(method):
    """The outside-select work timed for a method is the work its vision hooks really do: same layers, same shapes
    as the signals the engine hands to the method's ``select``."""
    model, inputs = _tiny()
    seen = {}
    with vtprune.patched(model, method, **opts(method, keep=16)):
        impl = model._vtprune_session.method
        original = impl.select

        def spy(image):
            # an undeclared signal raises when read (the engine hands vision_keys only to methods declaring it)
            seen["cls"] = image.cls_attention if "cls_attention" in impl.signals else None
            seen["keys"] = image.vision_keys if "vision_keys" in impl.signals else None
            seen["qk"] = image.vision_qk if "vision_qk" in impl.signals else None
            return original(image)

        impl.select = spy
        with torch.no_grad():
            model(**inputs)
    rows, keys, qk = overhead.vision_hook_work(model, method, 16)()
    assert seen["cls"] is None or rows.shape == seen["cls"].shape
    for timed, handed in ((keys, seen["keys"]), (qk, seen["qk"])):
        assert (timed is None) == (handed is None)
        if timed is not None:
            assert timed.shape == handed.shape
    assert overhead.vision_hook_work(model, "random", 16) is None


def test_sizes_run_times_the_growing_selections_against_a_layer_at_each_size(tmp_path):
    out = tmp_path / "sizes.md"
    assert overhead.main(["--small", "--sizes", "40,90", "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0
    text = out.read_text()
    assert "--sizes 40,90" in text
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and "_select" in line]
    assert [(r[0].strip(), int(r[1]), int(r[2])) for r in rows] == [
        ("cdpruner_select", 40, 4),
        ("vispruner_select", 40, 4),
        ("cdpruner_select", 90, 10),
        ("vispruner_select", 90, 10),
    ]
    for r in rows:  # ratio = ms / one-layer ms, as printed
        assert abs(float(r[6]) - float(r[3]) / float(r[5])) < 1e-2 * max(1.0, float(r[6]))
