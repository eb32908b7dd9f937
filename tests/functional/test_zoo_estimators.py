"""eval/bench/zoo_estimators.py at tiny widths: one row per estimator and budget, the literal spread first, and the
exact JVP estimator (same directions, h -> 0) within the literal estimator's own seed spread."""

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load():
    spec = importlib.util.spec_from_file_location(
        "zoo_estimators", os.path.join(ROOT, "eval", "bench", "zoo_estimators.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_tiny_study_table(tmp_path):
    study = _load()
    out = tmp_path / "zoo.md"
    assert (
        study.main(
            [
                "--images",
                "1",
                "--seeds",
                "3",
                "--tokens",
                "60",
                "--width",
                "16",
                "--hidden",
                "64",
                "--keep",
                "8,16",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = out.read_text()
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| estimator")
    ]
    names = ["literal (other seed)"] + [n for n, _ in study.estimators()]
    assert [r[0] for r in rows] == names * 2 and [r[1] for r in rows] == ["8"] * len(names) + ["16"] * len(names)
    for block in (rows[: len(names)], rows[len(names) :]):
        spread = float(block[0][2])
        jvp = block[1]
        assert float(jvp[2]) <= spread and jvp[5] == "yes"
        for r in block[1:]:
            assert (float(r[2]) <= spread) == (r[5] == "yes")
    assert "Cheapest estimator" in text or "No cheaper estimator" in text
