"""Fixtures of the vLLM plugin tests (``make test-vllm``: run in vLLM's own venv, never by ``make test``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import checkpoint  # noqa: E402

MAX_TOKENS = 5


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """``ckpts(family)`` -> the tiny checkpoint of ``family`` (built once per session)."""
    built = {}

    def get(family: str) -> str:
        if family not in built:
            built[family] = checkpoint.build(str(tmp_path_factory.mktemp(family)), family=family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def ckpt(ckpts):
    return ckpts("qwen2_5_vl")


IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"


@pytest.fixture(scope="session")
def media(tmp_path_factory):
    """``media(name, h, w)`` -> the path of a random PNG (the same pixels for the same arguments)."""
    root = tmp_path_factory.mktemp("media")

    def image(name, h, w):
        path = str(root / f"{name}_{h}x{w}.png")
        if not os.path.exists(path):
            rng = np.random.default_rng(zlib.crc32(f"{name}_{h}x{w}".encode()))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        return path

    return image


@pytest.fixture(scope="session")
def requests_(tmp_path_factory, media):
    """A fixed mix: one image, another size, two images in one prompt, a 4-frame video (grid 2 x 8 x 8).

    The video runs at 4 fps: 0.5 s per temporal patch x 4 tokens per second puts its two temporal positions 2 apart
    (M-RoPE's time scaling is exercised) and below its spatial extent, where vLLM and transformers agree on the
    positions of the text after a video (vLLM continues from the video's largest position + 1, transformers from
    its first position + max(h, w); they differ when the time positions reach further)."""
    root = tmp_path_factory.mktemp("video")
    rng = np.random.default_rng(0)
    video = str(root / "video.npy")
    np.save(video, rng.integers(0, 256, (4, 112, 112, 3), dtype=np.uint8))
    return [
        dict(prompt=f"w3 w4 {IMG} w5 w6 w7", images=[media("a", 112, 112)], video=None, fps=2.0),
        dict(prompt=f"w9 {IMG} w10 w11", images=[media("b", 112, 168)], video=None, fps=2.0),
        dict(
            prompt=f"w12 {IMG} w13 {IMG} w14", images=[media("c", 112, 112), media("d", 168, 112)], video=None, fps=2.0
        ),
        dict(prompt=f"w20 w21 {VID} w22", images=[], video=video, fps=4.0),
    ]


@pytest.fixture(scope="session")
def requests_qwen25_video(tmp_path_factory):
    """Qwen2.5-VL videos only (the video methods, which refuse images): two 4-frame videos (grid 2 x 8 x 8), at 4 fps
    as in :func:`requests_`."""
    root = tmp_path_factory.mktemp("video25")
    rng = np.random.default_rng(1)
    videos = [str(root / f"video{i}.npy") for i in range(2)]
    for path in videos:  # two different videos: vLLM encodes a repeated item once (its encoder cache)
        np.save(path, rng.integers(0, 256, (4, 112, 112, 3), dtype=np.uint8))
    return [
        dict(prompt=f"w20 w21 {VID} w22", images=[], video=videos[0], fps=4.0),
        dict(prompt=f"w5 {VID} w6 w7", images=[], video=videos[1], fps=4.0),
    ]


@pytest.fixture(scope="session")
def requests_qwen3(media):
    """Qwen3-VL's mix (images only; 16-pixel patches: 128 px = 4 merged tokens): one image, another size, two images
    in one prompt, an image at the end of the prompt."""
    return [
        dict(prompt=f"w3 w4 {IMG} w5 w6 w7", images=[media("a", 128, 128)], video=None, fps=2.0),
        dict(prompt=f"w9 {IMG} w10 w11", images=[media("b", 128, 192)], video=None, fps=2.0),
        dict(
            prompt=f"w12 {IMG} w13 {IMG} w14", images=[media("c", 128, 128), media("d", 192, 128)], video=None, fps=2.0
        ),
        dict(prompt=f"w30 w31 w32 {IMG}", images=[media("e", 160, 160)], video=None, fps=2.0),
    ]


@pytest.fixture(scope="session")
def requests_qwen3_video(tmp_path_factory, media):
    """Qwen3-VL's video mix (one placeholder run per frame, timestamp text between them): a 4-frame 96-px video
    (2 temporal steps of 3 x 3 merged tokens; the video processor's pixel cap counts every frame, so larger frames
    would be resized) alone, and after an image in the same prompt."""
    root = tmp_path_factory.mktemp("video3")
    rng = np.random.default_rng(1)
    videos = [str(root / f"video{i}.npy") for i in range(2)]
    for path in videos:  # two videos: vLLM encodes a repeated item once (its encoder cache), the log would show one
        np.save(path, rng.integers(0, 256, (4, 96, 96, 3), dtype=np.uint8))
    return [
        dict(prompt=f"w20 w21 {VID} w22", images=[], video=videos[0], fps=4.0),
        dict(prompt=f"w12 {IMG} w13 {VID} w14 w15", images=[media("c", 128, 128)], video=videos[1], fps=4.0),
    ]


#: per family: the request mix fixture, vLLM's per-prompt item limits and the checkpoint (Qwen3-VL: images only,
#: except in "qwen3_vl_video", which only methods in setting.frame_counts_ahead() serve)
FAMILY = {
    "qwen2_5_vl": ("requests_", {"image": 2, "video": 1}, "qwen2_5_vl"),
    "qwen3_vl": ("requests_qwen3", {"image": 2, "video": 0}, "qwen3_vl"),
    "qwen3_vl_video": ("requests_qwen3_video", {"image": 1, "video": 1}, "qwen3_vl"),
    "qwen2_5_vl_video": ("requests_qwen25_video", {"image": 0, "video": 1}, "qwen2_5_vl"),
}


def run_json(python: str, script: str, spec: dict, tmp, timeout: int = 600):
    """Run ``script SPEC OUT`` with ``python``; returns (parsed OUT or None, CompletedProcess)."""
    spec_path, out_path = str(tmp / "spec.json"), str(tmp / "out.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    if os.path.exists(out_path):
        os.remove(out_path)
    root = os.path.dirname(HERE)
    env = dict(os.environ, PYTHONPATH=root)  # this checkout's vtprune, whatever the venv has installed
    if python != sys.executable:  # the reference uses its own venv's native kernels
        env.pop("VTPRUNE_NO_EXT", None)
    proc = subprocess.run(
        [python, os.path.join(HERE, script), spec_path, out_path],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=root,
        env=env,
    )
    if not os.path.exists(out_path):
        return None, proc
    with open(out_path) as f:
        return json.load(f), proc


def hf_python() -> str:
    """vtprune's own environment (its transformers release) for the Hugging Face reference."""
    python = os.environ.get("VTPRUNE_HF_PYTHON")
    if not python or not os.path.exists(python):
        raise RuntimeError(
            f"set VTPRUNE_HF_PYTHON to the python of vtprune's own venv (make test-vllm sets it to "
            f".venv/bin/python); got {python!r}"
        )
    return python


@pytest.fixture(scope="session")
def serve(ckpts, request, tmp_path_factory):
    """``serve(hf_overrides, multiprocess=False, requests=None, family="qwen2_5_vl")`` -> vLLM's outputs for the
    family's request mix (cached per configuration)."""
    cache = {}

    def run(overrides, multiprocess=False, requests=None, family="qwen2_5_vl"):
        key = json.dumps([overrides, multiprocess, requests, family], sort_keys=True)
        if key not in cache:
            mix, limits, ckpt = FAMILY[family]
            spec = dict(
                checkpoint=ckpts(ckpt),
                hf_overrides=overrides,
                max_tokens=MAX_TOKENS,
                multiprocess=multiprocess,
                requests=requests or request.getfixturevalue(mix),
                limit_mm_per_prompt=limits,
            )
            out, proc = run_json(sys.executable, "serve_once.py", spec, tmp_path_factory.mktemp("vllm"))
            assert out is not None, f"vLLM run failed ({family}, {overrides}):\n{proc.stderr[-4000:]}"
            cache[key] = out
        return cache[key]

    return run


@pytest.fixture(scope="session")
def hf(ckpts, request, tmp_path_factory):
    """``hf(method_dict_or_None, family="qwen2_5_vl")`` -> vtprune's Hugging Face path on the same checkpoint and
    requests."""
    cache = {}

    def run(method, family="qwen2_5_vl"):
        key = json.dumps([method, family], sort_keys=True)
        if key not in cache:
            spec = dict(
                checkpoint=ckpts(FAMILY[family][2]),
                method=method,
                max_tokens=MAX_TOKENS,
                requests=request.getfixturevalue(FAMILY[family][0]),
            )
            out, proc = run_json(hf_python(), "hf_reference.py", spec, tmp_path_factory.mktemp("hf"))
            assert out is not None, f"Hugging Face reference failed ({family}, {method}):\n{proc.stderr[-4000:]}"
            cache[key] = out
        return cache[key]

    return run
