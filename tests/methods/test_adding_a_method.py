"""docs/adding-a-method.md works as written: its code runs, and its method file dropped into vtprune/methods/ is
registered, listed by ``vtprune methods`` and expanded by a sweep's ``methods: all`` with no other file edited."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vtprune.registry import _METHODS

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "adding-a-method.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)


def test_the_guide_runs(monkeypatch):
    monkeypatch.chdir(REPO)
    blocks = _blocks()
    assert len(blocks) == 4
    try:
        exec(compile("\n".join(blocks), str(GUIDE), "exec"), {"__name__": "guide"})
    finally:
        _METHODS.pop("featnorm", None)


def test_the_guide_method_is_one_file(tmp_path):
    """The config and method blocks as vtprune/methods/featnorm.py of a copy of the package: nothing else edited."""
    shutil.copytree(REPO / "vtprune", tmp_path / "vtprune", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    config, method = _blocks()[:2]
    (tmp_path / "vtprune" / "methods" / "featnorm.py").write_text(config + "\n\n" + method)
    probe = """
import importlib.util
import vtprune
from vtprune import cli
assert "featnorm" in vtprune.list_methods(host="vlm"), vtprune.list_methods()
assert vtprune.FeatureNormConfig(keep=3).p == 2.0
cli.main(["methods", "--stage", "vision"])
if importlib.util.find_spec("lmms_eval"):  # the harness (extra eval)
    from vtprune.harness import config as hconfig
    cfg = hconfig.load_config({"models": [{"pretrained": "x"}], "methods": ["all"], "budgets": [8], "tasks": ["t"]})
    print("ALL", sorted(m.method for m in cfg.methods))
"""
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "VTPRUNE_NO_EXT": "1"}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"^\| featnorm +\| vlm +\| vision .*p=2\.0", out.stdout, flags=re.M), out.stdout
    if importlib.util.find_spec("lmms_eval"):
        assert "'featnorm'" in next(line for line in out.stdout.splitlines() if line.startswith("ALL"))


@pytest.mark.parametrize("bad", [0, -1.0, "2"])
def test_the_guide_config_refuses_bad_options(bad, monkeypatch):
    monkeypatch.chdir(REPO)
    namespace = {"__name__": "guide"}
    try:
        exec(compile("\n".join(_blocks()[:2]), str(GUIDE), "exec"), namespace)
        with pytest.raises(ValueError, match=f"p must be a number > 0, got {bad!r}"):
            namespace["FeatureNormConfig"](keep=4, p=bad)
    finally:
        _METHODS.pop("featnorm", None)


def test_a_scoring_method_inherits_top_k():
    """``score`` only: the base ``select`` keeps the k largest, ties to the lower index, ascending; neither defined:
    a clear error."""
    from vtprune.config import PruneConfig
    from vtprune.methods.base import ImageInputs, Method

    class Scored(Method):
        name = "scored"

        def score(self, image):
            return torch.tensor([0.5, 2.0, 1.0, 2.0, 0.1, 1.0, 3.0], dtype=torch.float16)

    image = ImageInputs(n=7, k=4)
    assert Scored(PruneConfig(keep=4)).select(image).tolist() == [1, 2, 3, 6]  # 3.0, 2.0, 2.0, then 1.0 at index 2
    Bare = type("Bare", (Method,), {"name": "bare"})
    with pytest.raises(NotImplementedError, match="'bare' defines neither select"):
        Bare(PruneConfig(keep=4)).select(image)
