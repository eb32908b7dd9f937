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
    assert set(rows) | skipped == {"unpatched", *vtprune.list_methods(host="vlm")}
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


@pytest.mark.parametrize("argv", [[], ["bench", "--budgets", "0"], ["bench", "--budgets", "a,b"], ["bench", "--threads", "0"], ["demo", "--limit", "0"]])
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
