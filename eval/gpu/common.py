"""Shared helpers of the GPU check's scripts (eval/gpu/): device / dtype choice, the machine and version lines a
report starts with, the exact command, CUDA-event timing, and the one-line ``SUMMARY:`` that check.sh prints.

Every script here also runs on the CPU with ``--smoke`` (tiny shapes, few repeats), so tests/tools/test_gpu_check.py
proves on a machine without a GPU that the scripts are not broken.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import torch

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
if ROOT not in sys.path:  # `python eval/gpu/x.py` from a checkout: import vtprune from the source tree
    sys.path.insert(0, ROOT)

DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def pick_device(name: str) -> torch.device:
    """``auto`` -> cuda when a GPU is visible, else cpu; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--device {name}: no CUDA device is visible (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda}); use --device cpu --smoke on a machine without a GPU"
        )
    return dev


def command_line() -> str:
    """The command that ran this script, with the environment variables that change what it does."""
    env = " ".join(
        f"{k}={shlex.quote(os.environ[k])}"
        for k in ("VTPRUNE_CUDA", "VTPRUNE_NO_EXT", "TORCH_CUDA_ARCH_LIST")
        if k in os.environ
    )
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    words = [os.path.basename(sys.executable), script, *sys.argv[1:]]
    return (env + " " if env else "") + " ".join(shlex.quote(w) for w in words)


def machine(device: torch.device) -> dict[str, Any]:
    """What ran: device, driver, library versions, whether the native ops loaded."""
    import transformers

    import vtprune
    from vtprune import kernels
    from vtprune.timing import cpu_model

    info: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "vtprune": vtprune.__version__,
        "cpu": f"{cpu_model()} ({os.cpu_count()} logical CPUs)",
        "device": "CPU",
        "native_ops": kernels.available(),
    }
    try:
        from transformers.utils import is_flash_attn_2_available

        info["flash_attn_2"] = bool(is_flash_attn_2_available())
    except Exception:  # noqa: BLE001  (an old or new transformers without the helper)
        info["flash_attn_2"] = False
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["device"] = (
            f"{p.name} ({p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
            f"compute capability {p.major}.{p.minor})"
        )
        info["driver"] = _nvidia_smi("driver_version")
    return info


def _nvidia_smi(field: str) -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "?"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "?"


def provenance_lines(info: Mapping[str, Any], command: str) -> list[str]:
    """Markdown bullets: command, date, device, versions."""
    drv = f", driver {info['driver']}" if info.get("driver") else ""
    return [
        f"- command: `{command}`",
        f"- date: {info['date']}",
        f"- device: {info['device']}{drv}; CPU: {info['cpu']}",
        f"- torch {info['torch']} (CUDA {info['torch_cuda']}), transformers {info['transformers']}, "
        f"vtprune {info['vtprune']}, Python {info['python']}",
        f"- vtprune native ops loaded: {info['native_ops']}; flash_attn (FlashAttention-2) importable: "
        f"{info['flash_attn_2']}",
    ]


def median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (inf when shapes differ or anything is not finite)."""
    if out.shape != ref.shape:
        return float("inf")
    a, b = out.double(), ref.double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


def short_error(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_outputs(out: str | None, markdown: str, data: Any | None = None) -> None:
    """Write the Markdown report to ``out`` and, when given, ``data`` as JSON beside it (same stem, .json)."""
    if not out:
        return
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(markdown)
    if data is not None:
        with open(os.path.splitext(out)[0] + ".json", "w") as f:
            json.dump(data, f, indent=1, default=str)
    print(f"wrote {out}", flush=True)


def summary(text: str) -> None:
    """The line check.sh shows for this stage (the last ``SUMMARY:`` line of the output)."""
    print(f"SUMMARY: {text}", flush=True)
