"""The Hugging Face reference for the vLLM tests, run in vtprune's own environment (``.venv``: the transformers
release vtprune supports, which vLLM's pinned one predates).

    python tests_vllm/hf_reference.py REQUESTS.json OUT.json

``REQUESTS.json``: ``{"checkpoint": DIR, "method": {...} or null, "max_tokens": N, "requests": [...]}``, each request
``{"prompt": str, "images": [PNG paths], "video": NPY path or null, "fps": float}``. For each request, alone, the
checkpoint's processor builds the inputs, ``vtprune.patch`` prunes with the method (none: the unpatched model) and
greedy ``generate`` appends ``max_tokens`` tokens. Writes per request ``{"tokens": [...], "kept": [[...] per item]}``
(kept: ascending indices into each image's / video's visual tokens, from ``vtprune.stats``).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.video_utils import VideoMetadata

import vtprune
from vtprune.config import PruneConfig


def _inputs(processor, request):
    kwargs = {}
    if request["images"]:
        kwargs["images"] = [Image.open(p).convert("RGB") for p in request["images"]]
    if request.get("video"):
        frames = np.load(request["video"])
        kwargs["videos"] = [frames]
        kwargs["video_metadata"] = [
            VideoMetadata(
                total_num_frames=len(frames),
                fps=request["fps"],
                duration=len(frames) / request["fps"],
                frames_indices=list(range(len(frames))),
            )
        ]
        kwargs["do_sample_frames"] = False
    return processor(text=[request["prompt"]], return_tensors="pt", **kwargs)


def _split(kept: torch.Tensor, inputs) -> list[list[int]]:
    """Sample-relative kept indices -> per item, in prompt order. An item is a run of image / video tokens, except
    that a Qwen3-VL video is one run per frame (timestamp text between them): its runs are joined up to its token
    count (``video_grid_thw`` / 4)."""
    ids = inputs["input_ids"][0]
    runs = []  # (token id, length) of each run of visual tokens
    visual = torch.isin(ids, torch.tensor([IMAGE_ID, VIDEO_ID]))
    where = visual.nonzero().squeeze(1).tolist()
    start = 0
    for i, col in enumerate(where):
        if i + 1 == len(where) or where[i + 1] != col + 1:
            runs.append((int(ids[col]), i + 1 - start))
            start = i + 1
    videos = [int(g.prod()) // 4 for g in inputs.get("video_grid_thw", torch.zeros(0, 3))]
    sizes = []
    for token, n in runs:
        if token == VIDEO_ID and sizes and sizes[-1][0] == VIDEO_ID and sizes[-1][1] < videos[0]:
            sizes[-1][1] += n
        else:
            if token == VIDEO_ID and sizes and sizes[-1][0] == VIDEO_ID:
                videos.pop(0)
            sizes.append([token, n])
    out, offset = [], 0
    for _, n in sizes:
        out.append([int(k) - offset for k in kept.tolist() if offset <= k < offset + n])
        offset += n
    return out


def main(requests_path: str, out_path: str) -> None:
    global IMAGE_ID, VIDEO_ID
    with open(requests_path) as f:
        spec = json.load(f)
    processor = AutoProcessor.from_pretrained(spec["checkpoint"])
    model = AutoModelForImageTextToText.from_pretrained(spec["checkpoint"], dtype=torch.float32).eval()
    IMAGE_ID, VIDEO_ID = model.config.image_token_id, model.config.video_token_id
    if spec["method"] is not None:
        vtprune.patch(model, PruneConfig.from_dict(spec["method"]))
    results = []
    for request in spec["requests"]:
        inputs = _inputs(processor, request)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=spec["max_tokens"], do_sample=False)
        tokens = out[0, inputs["input_ids"].shape[1] :].tolist()
        stats = vtprune.stats(model) if spec["method"] is not None else None
        kept = _split(stats.kept_indices[0], inputs) if stats is not None else None
        results.append({"tokens": tokens, "kept": kept})
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
