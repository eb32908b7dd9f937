"""The GPU check's first two stages: what is installed (``env``), and loading / JIT-building vtprune's native ops
(``--build``; with ``VTPRUNE_CUDA=1`` the CUDA kernels of csrc/cuda are compiled by nvcc).

    python eval/gpu/env.py [--require-gpu]     versions, device; exit 1 below vtprune's transformers floor
    VTPRUNE_CUDA=1 python eval/gpu/env.py --build
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import common
import torch

TRANSFORMERS_FLOOR = "5.23"


def env(require_gpu: bool) -> int:
    import transformers
    from packaging.version import Version

    cuda = torch.cuda.is_available()
    dev = torch.cuda.get_device_name() if cuda else "no CUDA device"
    tf = transformers.__version__
    print(
        f"python {sys.version.split()[0]} ({sys.executable}); torch {torch.__version__} (CUDA {torch.version.cuda}); "
        f"transformers {tf} from {os.path.dirname(transformers.__file__)}; device: {dev}"
    )
    print(
        {
            k: os.environ.get(k)
            for k in (
                "CUDA_HOME",
                "TORCH_CUDA_ARCH_LIST",
                "VTPRUNE_CUDA",
                "VTPRUNE_NO_EXT",
                "TORCH_EXTENSIONS_DIR",
                "PYTHONPATH",
            )
        }
    )
    floor = Version(tf) >= Version(TRANSFORMERS_FLOOR)
    note = "" if floor else f" (BELOW vtprune's floor {TRANSFORMERS_FLOOR}: carry .whl, see eval/gpu/README.md)"
    common.summary(f"{dev}, torch {torch.__version__}, transformers {tf}{note}")
    return 0 if floor and (cuda or not require_gpu) else 1


def build() -> int:
    t = time.time()
    from vtprune import kernels

    state = kernels.available()
    need = "cuda" if os.environ.get("VTPRUNE_CUDA") == "1" else "cpp"
    common.summary(f"vtprune native ops {state} in {time.time() - t:.0f} s (CUDA_HOME={os.environ.get('CUDA_HOME')})")
    return 0 if state[need] else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--require-gpu", action="store_true", help="exit 1 when no CUDA device is visible")
    p.add_argument("--build", action="store_true", help="load / JIT-build the native ops instead")
    args = p.parse_args(argv)
    return build() if args.build else env(args.require_gpu)


if __name__ == "__main__":
    sys.exit(main())
