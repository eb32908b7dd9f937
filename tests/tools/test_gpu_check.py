"""The prepared GPU check (eval/gpu/, `make gpu-check`) works without a GPU: its shell scripts parse, its plan
lists every stage, and `check.sh --smoke` runs each Python stage's CPU smoke mode end to end and writes
well-formed reports (what the GPU run writes, at tiny sizes), copying at most 8 files to $OUT."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPU = os.path.join(ROOT, "eval", "gpu")
CHECK = os.path.join(GPU, "check.sh")
STAGES = ["env", "build", "kernel-tests", "kernels-cuda", "kernels-nvrtc", "contract", "prefill-7b", "video", "bench"]


def _env(tmp_path, **extra):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", GPU_CHECK_RESULTS=str(tmp_path / "res"))
    env.pop("OUT", None)
    env.update(extra)
    return env


@pytest.mark.parametrize("script", ["check.sh", "fetch_wheels.sh"])
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", os.path.join(GPU, script)], check=True)


def test_dry_run_lists_every_stage_and_writes_nothing(tmp_path):
    out = subprocess.run(
        ["bash", CHECK, "--dry-run"], env=_env(tmp_path), capture_output=True, text=True, check=True, timeout=60
    ).stdout
    for stage in STAGES:
        assert re.search(rf"^{stage}\s+limit\s+\d+s: ", out, re.MULTILINE), (stage, out)
    assert "VTPRUNE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0" in out
    assert "eval/bench/native_ops.py --device cuda" in out and "prefill_7b.py" in out
    assert "kernels_cuda.py --impl nvrtc" in out
    assert "eval/bench/overhead.py --video --device cuda --frames 16,32 --frame-tokens 100,400" in out
    assert not (tmp_path / "res").exists()


def test_bad_argument_is_refused(tmp_path):
    r = subprocess.run(
        ["bash", CHECK, "--fast"], env=_env(tmp_path), capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 2 and "usage" in r.stderr


def _table_rows(md: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("|:")]


def test_smoke_run_writes_well_formed_reports(tmp_path):
    r = subprocess.run(
        ["bash", CHECK, "--smoke"],
        env=_env(tmp_path, OUT=str(tmp_path / "out")),
        capture_output=True,
        text=True,
        timeout=400,
        cwd=tmp_path,
        check=False,
    )
    text = r.stdout + r.stderr
    assert r.returncode in (0, 1), text
    summary = text[text.index("=== GPU check summary") :]
    lines = {line.split()[0]: line for line in summary.splitlines()[1:] if line.split() and line.split()[0] in STAGES}
    assert list(lines) == STAGES, summary
    for stage in ("env", "build"):
        assert " PASS " in lines[stage], lines[stage]
    for stage in ("kernel-tests", "kernels-nvrtc", "bench"):
        assert " SKIP " in lines[stage], lines[stage]
    # every Python stage ran to its own verdict (PASS, or FAIL for a failed check, never a crash or a timeout)
    native = os.environ.get("VTPRUNE_NO_EXT") != "1"
    for stage in ("kernels-cuda", "contract", "prefill-7b", "video") if native else ("contract", "prefill-7b", "video"):
        assert re.search(r"\s(PASS|FAIL\(1\))\s+\d+s\s+(PASS|FAIL|PARTIAL): ", lines[stage]), lines[stage]

    res = tmp_path / "res"
    log = (res / "check.log").read_text()
    assert log.count("SUMMARY: ") >= 4 and "=== [contract]" in log
    assert "```" in (res / "summary.md").read_text()

    import vtprune

    methods = vtprune.list_methods(host="vlm", modality="image")
    prefill = json.loads((res / "prefill_7b.json").read_text())
    assert [b["batch"] for b in prefill["batches"]] == [1, 2]
    for entry in prefill["batches"]:
        variants = [row["variant"] for row in entry["rows"]]
        assert variants == ["unpatched"] + [f"{m} keep={k}" for m in methods for k in (8, 16, 24)]
        # cdpruner's default on the CLIP tower needs clip_model=: the benchmark runs its text="llm" variant
        assert all(row["status"] == "ok" for row in entry["rows"] if row["method"] == "cdpruner")
        for row in entry["rows"]:
            if row["status"] == "ok":
                assert row["ms"] > 0 and row["p25"] <= row["ms"] <= row["p75"] and 0 < row["flops_ratio"] <= 1
    md = (res / "prefill_7b.md").read_text()
    assert md.startswith("# ") and "- command: `" in md and "## batch 2" in md
    assert len(_table_rows(md)) == 2 * (1 + 1 + 3 * len(methods))  # header + rows, per batch

    # the video stage: every pure video selection function timed against a layer at each smoke size
    video = (res / "overhead_video.md").read_text()
    for fn in ("evs_select", "vidcom2_select", "fastvid_select", "frame_budgets", "dyseg_segments", "dpc_knn_scores"):
        assert video.count(f"| {fn} ") == (4 if fn == "frame_budgets" else 2), fn

    contract = json.loads((res / "contract.json").read_text())
    rows = [row for row in contract["rows"] if row.get("family")]
    assert {row["family"] for row in rows} == {"llava", "qwen2_vl"}
    assert {row["status"] for row in rows if row.get("method")} <= {"PASS", "WARN", "FAIL", "skip"}
    assert any(row.get("unavailable") for row in contract["rows"])  # flash_attention_2 on a CPU: not run
    assert "## attn_implementation=sdpa" in (res / "contract.md").read_text()

    if native:
        kern = json.loads((res / "kernels_cuda.json").read_text())
        ops = {row["op"] for row in kern["rows"]}
        assert {"greedy cosine", "greedy l2", "greedy maxsum", "dart_pick", "dbdpc", "kcenter"} <= ops
        assert all(row["cases"] == row["ok"] + row["near_tie"] + row["fail"] for row in kern["rows"])
        # the timing table: every cell timed on the C++ op and pure torch (on a GPU: CUDA extension, NVRTC, torch)
        assert kern["impl"] == "ext" and len(kern["timing"]) == 4
        assert all(row["C++ op"] > 0 and row["pure torch"] > 0 for row in kern["timing"])

    # what the device tool would bring back: at most 8 plain files, names of letters, digits, '.', '_', '-'
    out = sorted(os.listdir(tmp_path / "out"))
    assert 4 <= len(out) <= 8 and "gpu-results.tar.gz" in out and "summary.md" in out, out
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in out)


def test_near_tie_diagnosis(monkeypatch):
    monkeypatch.syspath_prepend(GPU)
    import kernels_cuda as K

    # rows 1 and 2 are equally far from row 0 (a tie), row 3 is nearer: after [0], picking 1 or 2 is a tie
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [1.0, 0.1]], dtype=torch.float64)
    assert K.compare_selection(torch.tensor([0, 1]), torch.tensor([0, 1]), x, "l2", torch.float32) == "ok"
    assert K.compare_selection(torch.tensor([0, 2]), torch.tensor([0, 1]), x, "l2", torch.float32).startswith(
        "near-tie"
    )
    assert K.compare_selection(torch.tensor([0, 3]), torch.tensor([0, 1]), x, "cosine", torch.float32).startswith(
        "MISMATCH"
    )
    assert K.greedy_gap(x, [0], 1, 2, "maxsum") == 0.0
