"""The ``vtprune`` command line: ``bench`` prints one row per registered method (plus ``unpatched``) with the right
kept counts; unknown commands and bad options are argparse errors (exit status 2)."""

from __future__ import annotations

import pytest

import vtprune
from vtprune import cli
from vtprune.latency import build_small_llava


def _table_rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        if not line.startswith("|") or line.startswith("|:") or line.startswith("|-"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == "method":
            assert cells == list(cli.BENCH_HEADERS)
            continue
        assert cells[0] not in rows, f"duplicate row {cells[0]}"
        rows[cells[0]] = cells
    return rows


def test_bench_table(capsys):
    assert cli.main(["bench", "--budgets", "16"]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    _, inputs = build_small_llava()
    n = int((inputs["input_ids"] == 32000).sum())
    assert n == 256
    assert rows["unpatched"][1:3] == ["-", f"{n}/{n}"]
    assert rows["unpatched"][4] == "1.000" and rows["unpatched"][6] == "1.00x"
    skipped = {line.split(":")[0].removeprefix("skipped ") for line in out.splitlines() if line.startswith("skipped ")}
    assert set(rows) | skipped == {"unpatched", *vtprune.list_methods(host="vlm", modality="image")}
    assert not set(rows) & skipped
    assert {"random", "fastv", "cls"} <= set(rows)  # these all run on LLaVA
    for method in set(rows) - {"unpatched"}:
        cells = rows[method]
        assert cells[1] == "16"
        if method == "sparsevlm":  # its per-layer counts come from the official table, plus recycled tokens
            assert 0 < int(cells[2].split("/")[0]) < n and cells[2].endswith(f"/{n}"), cells
        else:
            assert cells[2] == f"16/{n}", cells
        assert float(cells[3]) < float(rows["unpatched"][3])
        assert 0 < float(cells[4]) < 1
        assert float(cells[5]) > 0 and cells[6].endswith("x")


def test_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["no-such-command"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_help_texts_print_no_escaped_percent(capsys):
    """Descriptions are printed as written (argparse %-formats help strings only): no literal '%%'."""
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.choices)
    for name in commands.choices:
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        assert "%%" not in capsys.readouterr().out, name


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bench", "--budgets", "0"],
        ["bench", "--budgets", "a,b"],
        ["bench", "--threads", "0"],
        ["demo", "--limit", "0"],
    ],
)
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "usage: vtprune" in capsys.readouterr().err


def test_bench_skips_a_method_that_cannot_patch(monkeypatch, capsys):
    import vtprune.latency

    def fake_patch(model, method, **options):
        if method == "cls":
            raise ValueError("cls needs a CLS token (test)")
        return vtprune.patch(model, method, **options)

    monkeypatch.setattr(vtprune.latency, "list_methods", lambda **filters: ["cls", "random"])
    monkeypatch.setattr(vtprune.latency, "patch", fake_patch)
    assert cli.main(["bench", "--budgets", "8", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert set(_table_rows(out)) == {"unpatched", "random"}
    assert "skipped cls: cls needs a CLS token (test)" in out


# -- bad input to any command: one line `vtprune X: error: ...`, exit status 2 ----------------------------------------
def _cases(tmp):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    image = str(repo / "eval" / "tasks" / "vtprune_shapes" / "images" / "test_00000.png")
    llava, vit = str(repo / "models" / "tiny-llava-shapes"), str(repo / "models" / "tiny-vit-shapes")
    text = tmp / "notes.png"
    text.write_text("not an image")
    rows = {
        "list.jsonl": "[1, 2]\n",
        "fields.jsonl": '{"a": 1}\n',
        "types.jsonl": '{"model": "m", "method": "x", "task": "t", "value": "high", "score": 1, "max": 100}\n',
    }
    for name, body in rows.items():
        (tmp / name).write_text(body)
    sweep = tmp / "cuda.yaml"
    sweep.write_text(
        f"models: [{{pretrained: {llava}}}]\nmethods: [random]\nbudgets: [16]\ntasks: [vtprune_shapes]\n"
        f"include_path: {repo / 'eval' / 'tasks'}\ndevice: cuda\n"
    )
    out = str(tmp / "p.json")
    return [
        (["calibrate", llava, str(tmp / "missing.png"), "--out", out], r"calibration image\(s\) not found"),
        (["calibrate", llava, str(text), "--out", out], "is not an image PIL can read"),
        (["calibrate", vit, image, "--out", out], "calibration needs a VLM of a supported type: gemma3"),
        (["table", str(tmp / "list.jsonl")], r"list.jsonl:1: a result row must be a JSON object, got list"),
        (["table", str(tmp / "fields.jsonl")], r"fields.jsonl:1: not a row of `vtprune sweep` \(missing \['model'"),
        (["plot", str(tmp / "types.jsonl")], r"types.jsonl:1: 'value' must be a number, got 'high'"),
        (["sweep", str(sweep)], "'cuda': this machine has no CUDA device"),
    ]


def test_bad_input_is_one_line_for_every_command(tmp_path, capsys, monkeypatch):
    """Each case ended in a raw traceback before (PIL, transformers, KeyError / TypeError in the tables, torch's CUDA
    assertion after the unpruned model loaded)."""
    import re

    pytest.importorskip("lmms_eval")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the sweep case on any machine
    for argv, match in _cases(tmp_path):
        assert cli.main(argv) == 2, argv
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert lines[-1].startswith(f"vtprune {argv[0]}: error: ") and re.search(match, lines[-1]), (argv, lines)
        assert "Traceback" not in captured.err and not (tmp_path / "p.json").exists()


def test_a_bug_keeps_its_traceback_and_debug_shows_user_errors(monkeypatch, tmp_path):
    pytest.importorskip("lmms_eval")  # `vtprune table` reads results through the harness (extra eval)

    def bug(args):
        raise KeyError("not a user error")

    with monkeypatch.context() as m:
        m.setattr(cli, "_cmd_table", bug)
        with pytest.raises(KeyError):
            cli.main(["table", str(tmp_path)])
    assert cli.main(["table", str(tmp_path)]) == 2
    with pytest.raises(ValueError, match="no results file"):
        cli.main(["--debug", "table", str(tmp_path)])
    monkeypatch.setenv("VTPRUNE_DEBUG", "1")
    with pytest.raises(ValueError, match="no results file"):
        cli.main(["table", str(tmp_path)])
