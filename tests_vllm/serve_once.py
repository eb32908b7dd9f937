"""Start one vLLM engine on a tiny checkpoint, run a batch of requests greedily, write what came out (JSON).

    python tests_vllm/serve_once.py SPEC.json OUT.json

``SPEC.json``: ``{"checkpoint": DIR, "hf_overrides": {...} or null, "max_tokens": N, "multiprocess": bool,
"requests": [...], "limit_mm_per_prompt": {...} (optional; default 2 images, 1 video), "compilation_config": {...}
(optional)}`` (requests as in
``hf_reference.py``). ``OUT.json``: per request the greedy ``tokens`` and the
``prompt_len`` vLLM scheduled, plus ``log``: what the plugin's model recorded (``vtprune_log``; None for a model
without it). One engine per process: every test configuration starts from a clean vLLM.
"""

from __future__ import annotations

import json
import os
import sys


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if spec.get("multiprocess") else "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model's function, to an engine process

    import numpy as np
    from PIL import Image
    from vllm import LLM, SamplingParams

    from vtprune.vllm import pruning_log

    limits = spec.get("limit_mm_per_prompt", {"image": 2, "video": 1})
    llm = LLM(
        model=spec["checkpoint"],
        hf_overrides=spec.get("hf_overrides"),
        dtype="float32",
        max_model_len=1024,
        limit_mm_per_prompt=limits,
        enforce_eager=True,
        max_num_seqs=8,
        compilation_config=spec.get("compilation_config"),
        distributed_executor_backend=None if spec.get("multiprocess") else "uni",
        seed=0,
    )
    prompts = []
    for request in spec["requests"]:
        data = {}
        if request["images"]:
            data["image"] = [Image.open(p).convert("RGB") for p in request["images"]]
        if request.get("video"):
            frames = np.load(request["video"])
            fps = request["fps"]
            data["video"] = [
                (
                    frames,
                    {
                        "fps": fps,
                        "duration": len(frames) / fps,
                        "total_num_frames": len(frames),
                        "frames_indices": list(range(len(frames))),
                        "video_backend": "opencv",
                        "do_sample_frames": False,
                    },
                )
            ]
        prompts.append({"prompt": request["prompt"], "multi_modal_data": data})
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    log = llm.apply_model(pruning_log)[0]
    result = {
        "outputs": [{"tokens": list(o.outputs[0].token_ids), "prompt_len": len(o.prompt_token_ids)} for o in outputs],
        "log": log,
    }
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
