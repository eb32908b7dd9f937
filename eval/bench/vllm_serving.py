"""Serving benchmark of the vLLM plugin: requests/s and time to first token, pruned against unpruned.

One vLLM engine per configuration (a fresh process each), the same fixed request mix for all: ``--requests`` prompts
submitted at once to vLLM's async engine (a burst, as a loaded server sees them), alternating a one-image prompt
(``--image``-px square image) and a two-image prompt (two images of 3/4 that side), each followed by text, greedy,
``--max-tokens`` new tokens. Reported per configuration: requests/s over the burst, mean / p50 / p90 time to first
token (from submission), prompt tokens per request (mean) and the kept visual tokens. One warm-up request runs first.

    # CPU, the tiny random-weight Qwen2.5-VL of tests_vllm (built offline), in vLLM's venv (make test-vllm builds it):
    VTPRUNE_NO_EXT=1 VLLM_CPU_KVCACHE_SPACE=4 PYTHONPATH=. .venv-vllm/bin/python eval/bench/vllm_serving.py \\
        --out eval/results/vllm_serving_cpu.md
    # GPU, a real checkpoint (a vLLM install with the plugin: pip install -e '.[vllm]'):
    PYTHONPATH=. python eval/bench/vllm_serving.py --checkpoint Qwen/Qwen2.5-VL-7B-Instruct --dtype bfloat16 \\
        --image 1024 --requests 64 --max-tokens 64 --out eval/results/vllm_serving_gpu.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

CONFIGS = {
    "unpruned": None,
    "divprune ratio=0.25": {"method": "divprune", "ratio": 0.25},
    "random ratio=0.25": {"method": "random", "ratio": 0.25},
}


def _prompts(n: int, side: int, tiny: bool):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    img = "<|vision_start|><|image_pad|><|vision_end|>"
    text = "w3 w4 w5 w6 w7 w8 w9 w10" if tiny else "Describe what you see in detail."
    small = side * 3 // 4
    prompts = []
    for i in range(n):
        count, size = (1, side) if i % 2 == 0 else (2, small)
        images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]
        body = " ".join([img] * count)
        prompt = f"{body} {text}" if tiny else f"<|im_start|>user\n{body}{text}<|im_end|>\n<|im_start|>assistant\n"
        prompts.append({"prompt": prompt, "multi_modal_data": {"image": images}})
    return prompts


async def _burst(engine, prompts, max_tokens):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA
    )

    async def one(i, prompt):
        start, first, prompt_len = time.perf_counter(), None, None
        async for out in engine.generate(prompt, params, request_id=f"r{i}-{time.monotonic_ns()}"):
            if first is None and out.outputs and out.outputs[0].token_ids:
                first = time.perf_counter() - start
            if out.prompt_token_ids is not None:
                prompt_len = len(out.prompt_token_ids)
        return first, prompt_len

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return time.perf_counter() - start, results


def run_one(args, overrides) -> dict:
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model's function, to the engine process
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    import vtprune.vllm

    engine = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=args.checkpoint,
            hf_overrides=overrides or {},
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            # image prompts only; "video": 0 lets the plugin serve Qwen3-VL, whose video it refuses at start-up
            limit_mm_per_prompt={"image": 2, "video": 0},
            max_num_seqs=args.requests,
            enforce_eager=args.enforce_eager,
            seed=0,
        )
    )
    warmup, *prompts = _prompts(args.requests + 1, args.image, args.tiny)  # distinct images: no cache hits

    async def main():
        await _burst(engine, [warmup], args.max_tokens)
        wall, results = await _burst(engine, prompts, args.max_tokens)
        log = await engine.collective_rpc("apply_model", args=(vtprune.vllm.pruning_log,))
        return wall, results, log

    wall, results, log = asyncio.run(main())
    engine.shutdown()
    ttft = [r[0] * 1e3 for r in results]
    entries = (log[0] if log and isinstance(log[0], list) else [])[1:]  # less the warm-up's image
    return dict(
        requests_per_s=len(prompts) / wall,
        ttft_mean=statistics.mean(ttft),
        ttft_p50=statistics.median(ttft),
        ttft_p90=statistics.quantiles(ttft, n=10)[-1],
        prompt_tokens=statistics.mean(r[1] for r in results),
        visual=f"{sum(len(e['kept']) for e in entries)}/{sum(e['n'] for e in entries)}" if entries else "all",
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="model path or name (default: build the tiny random Qwen2.5-VL)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--image", type=int, default=448, help="side of the one-image prompts' image, px")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--enforce-eager", action="store_true", default=None)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names of " + ", ".join(CONFIGS))
    parser.add_argument("--out", help="markdown table to write")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    args = parser.parse_args(argv)
    args.tiny = args.checkpoint is None or os.path.exists(os.path.join(args.checkpoint, "vtprune_tiny"))
    if args.one is not None:
        args.enforce_eager = True if args.enforce_eager is None and args.tiny else bool(args.enforce_eager)
        overrides = json.loads(args.one)
        print("RESULT " + json.dumps(run_one(args, overrides and {"vtprune": overrides})))
        return
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; allowed: {list(CONFIGS)}")
    tmp = None
    if args.checkpoint is None:
        sys.path.insert(0, os.path.join(ROOT, "tests_vllm"))
        import checkpoint

        tmp = tempfile.mkdtemp(prefix="vtprune-bench-")
        args.checkpoint = checkpoint.build(tmp, max_pixels=args.image * args.image)
        open(os.path.join(tmp, "vtprune_tiny"), "w").close()
    rows = []
    for name in names:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--one",
            json.dumps(CONFIGS[name]),
            "--checkpoint",
            args.checkpoint,
            "--dtype",
            args.dtype,
            "--image",
            str(args.image),
            "--requests",
            str(args.requests),
            "--max-tokens",
            str(args.max_tokens),
        ]
        cmd += (["--enforce-eager"] if args.enforce_eager else []) + (
            ["--max-model-len", str(args.max_model_len)] if args.max_model_len else []
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{name}: the benchmark run failed:\n{proc.stderr[-4000:]}")
        rows.append((name, json.loads(line[len("RESULT ") :])))
        print(name, rows[-1][1], flush=True)
    lines = _report(args, rows)
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


def _report(args, rows):
    import platform

    import torch
    import transformers
    import vllm

    command = (
        "VTPRUNE_NO_EXT=1 VLLM_CPU_KVCACHE_SPACE=4 PYTHONPATH=. .venv-vllm/bin/python eval/bench/vllm_serving.py "
        + " ".join(shlex.quote(a) for a in sys.argv[1:])
    )
    base = rows[0][1]
    model = (
        "the tiny random-weight Qwen2.5-VL of tests_vllm/checkpoint.py (2 LM layers x 128 wide, 2 ViT layers x 64 wide)"
        if args.tiny
        else args.checkpoint
    )
    lines = [
        "# vLLM serving: pruned vs unpruned (vtprune.vllm plugin)",
        "",
        f"- command: `{command}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} logical CPUs visible",
        f"- model: {model}, dtype {args.dtype}",
        f"- mix: {args.requests} requests at once (half one {args.image}-px image, half two {args.image * 3 // 4}-px "
        f"images), {args.max_tokens} greedy tokens each, after one warm-up request",
        "",
        "| configuration | requests/s | TTFT mean ms | TTFT p50 ms | TTFT p90 ms | prompt tokens / request | "
        "visual tokens kept | speed-up (req/s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['requests_per_s']:.2f} | {r['ttft_mean']:.0f} | {r['ttft_p50']:.0f} | "
            f"{r['ttft_p90']:.0f} | {r['prompt_tokens']:.0f} | {r['visual']} | "
            f"{r['requests_per_s'] / base['requests_per_s']:.2f}x |"
        )
    return lines


if __name__ == "__main__":
    main()
