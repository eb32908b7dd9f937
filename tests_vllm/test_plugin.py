"""The vLLM plugin against two independent routes: vLLM without the plugin's pruning (keep-all must not change a
token) and vtprune's Hugging Face path (``hf_reference.py``, in vtprune's own venv) on the same checkpoint, images
and video: the same kept tokens, the same pruned prompt length and the same greedy tokens."""

from __future__ import annotations

import json
import sys
from collections import Counter

import pytest
from conftest import run_json

from vtprune.vllm import setting

PRUNED = {
    "random": {"method": "random", "keep": 5, "seed": 3},
    "divprune": {"method": "divprune", "ratio": 0.4},
    "pool": {"method": "pool", "ratio": 0.3},  # merges: the kept rows carry window means (and merged DeepStack levels)
    "zoo": {"method": "zoo", "ratio": 0.4},  # the patch merger's input per token and a per-token merger
    # importance="received" (the default on Qwen-VL): the attention each patch receives in the method's vision
    # blocks (Qwen2.5-VL's tiny tower: block 0 windowed, block 1 full; Qwen3-VL: block 1 of 3), from vLLM's q/k
    "cls": {"method": "cls", "ratio": 0.4},
    "todre": {"method": "todre", "ratio": 0.4, "late_drop": False},
    "visionzip": {"method": "visionzip", "ratio": 0.5},  # keys of the kept merge units, contextual tokens merged
    "vispruner": {"method": "vispruner", "ratio": 0.4},
    # the 2026 baselines: received attention of their vision blocks (scope, holov: the projector's block; hiprune: a
    # middle block for the anchors and the projector's for the registers) and the merger's input (idpruner)
    "scope": {"method": "scope", "ratio": 0.4},
    "hiprune": {"method": "hiprune", "ratio": 0.4},
    "holov": {"method": "holov", "ratio": 0.4},
    "idpruner": {"method": "idpruner", "ratio": 0.4},
}
FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_video")
#: methods served on Qwen3-VL videos (setting.frame_counts_ahead()): a frame's kept count is known before the tower runs
VIDEO3 = ("pool", "random")
#: Qwen3-VL videos only (2 of a video's 18 tokens, seed 0: both in frame 0): the empty frame gets a token back
#: (empty_frames="refill", the default), or keeps none and its run is empty (vision start, vision end)
VIDEO3_ONLY = {
    "random_refill": {"method": "random", "keep": 2, "seed": 0},
    "random_empty_frame": {"method": "random", "keep": 2, "seed": 0, "empty_frames": "allow"},
}

#: Qwen2.5-VL videos only: the video methods (videos only; vidcom2's own count cannot be sized ahead, it is refused)
VIDEO25 = {
    "evs_q": {"method": "evs", "q": 0.3},
    "evs_ratio": {"method": "evs", "ratio": 0.25},
}


def _items(log):
    return Counter((e["modality"], e["n"], tuple(e["kept"])) for e in log)


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_vllm_equals_hugging_face(serve, hf, family):
    """The comparison itself is sound: unpruned, vLLM and transformers give the same greedy tokens here."""
    ours, ref = serve(None, family=family), hf(None, family=family)
    assert [o["tokens"] for o in ours["outputs"]] == [r["tokens"] for r in ref]
    assert ours["log"] == []  # the plugin's class serves it, and without a setting it prunes nothing


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_equals_vllm_without_pruning(serve, family):
    stock = serve(None, family=family)
    method = "random" if family == "qwen3_vl_video" else "divprune"
    keep_all = serve({"vtprune": {"method": method, "ratio": 1.0}}, family=family)
    assert keep_all["outputs"] == stock["outputs"]  # tokens and prompt lengths
    assert keep_all["log"] and all(e["kept"] == list(range(e["n"])) for e in keep_all["log"])


@pytest.mark.parametrize(
    "family, name",
    [(family, name) for family in FAMILIES for name in sorted(PRUNED) if family != "qwen3_vl_video" or name in VIDEO3]
    + [("qwen3_vl_video", name) for name in VIDEO3_ONLY]
    + [("qwen2_5_vl_video", name) for name in VIDEO25],
)
def test_pruned_equals_hugging_face_path(serve, hf, request, family, name):
    """A batch of requests (Qwen2.5-VL: one image, another size, two images, a video; Qwen3-VL: images, DeepStack
    levels following the kept rows; Qwen3-VL videos, one run per frame, for the methods that size them ahead)
    served together equals each request run alone through ``vtprune.patch`` on the same checkpoint: kept tokens,
    prompt lengths, greedy tokens."""
    from conftest import FAMILY

    requests_ = request.getfixturevalue(FAMILY[family][0])
    method = {**PRUNED, **VIDEO3_ONLY, **VIDEO25}[name]
    ours, ref = serve({"vtprune": method}, family=family), hf(method, family=family)
    stock = serve(None, family=family)
    expected = Counter()
    for req, r, s, o in zip(requests_, ref, stock["outputs"], ours["outputs"]):
        sizes = _item_sizes(req, family)
        assert len(r["kept"]) == len(sizes)
        # the pruned prompt is the unpruned one less the dropped visual tokens
        dropped = sum(n - len(kept) for n, kept in zip(sizes, r["kept"]))
        assert o["prompt_len"] == s["prompt_len"] - dropped > 0
        assert o["tokens"] == r["tokens"]
        for n, kept, modality in zip(sizes, r["kept"], _modalities(req)):
            expected[(modality, n, tuple(kept))] += 1
    assert _items(ours["log"]) == expected
    assert any(len(e["kept"]) < e["n"] for e in ours["log"])
    frames = [{i // (e["n"] // 2) for i in e["kept"]} for e in ours["log"] if e["modality"] == "video"]
    if name == "random_refill":  # the case is what it claims: each frame keeps one token
        assert frames and all(f == {0, 1} for f in frames)
    if name == "random_empty_frame":
        assert frames and all(f == {0} for f in frames)


def _modalities(request):
    return ["image"] * len(request["images"]) + (["video"] if request["video"] else [])


def _item_sizes(request, family="qwen2_5_vl"):
    """Visual tokens per item of the fixed mix (one merged token per 2 x 2 patches: 28 px for Qwen2.5-VL's 14-pixel
    patches, 32 px for Qwen3-VL's 16; a video's 2 x 2 frames per temporal step)."""
    import numpy as np
    from checkpoint import MERGE, PATCHES
    from PIL import Image

    side = PATCHES[family.removesuffix("_video")] * MERGE
    sizes = []
    for path in request["images"]:
        w, h = Image.open(path).size
        sizes.append((h // side) * (w // side))
    if request["video"]:
        frames, h, w, _ = np.load(request["video"]).shape
        sizes.append(frames // 2 * (h // side) * (w // side))
    return sizes


def test_plugin_runs_in_every_process(serve):
    """Default multiprocess engine: the front-end process sizes the prompt, the engine process prunes."""
    method = {"vtprune": PRUNED["divprune"]}
    alone, multi = serve(method), serve(method, multiprocess=True)
    assert multi["outputs"] == alone["outputs"]
    assert _items(multi["log"]) == _items(alone["log"])


def test_in_llm_method_fails_at_startup(ckpt, requests_, tmp_path):
    spec = dict(
        checkpoint=ckpt,
        hf_overrides={"vtprune": {"method": "fastv", "keep": 4}},
        max_tokens=1,
        multiprocess=False,
        requests=requests_[:1],
    )
    out, proc = run_json(sys.executable, "serve_once.py", spec, tmp_path)
    assert out is None and proc.returncode != 0
    assert "method 'fastv' cannot run in vLLM: it prunes inside the language model" in proc.stderr


@pytest.mark.parametrize(
    "method, compilation, message",
    [
        ("divprune", {"cudagraph_mm_encoder": True}, "cannot run with compilation_config.cudagraph_mm_encoder=True"),
        ("zoo", {"compile_mm_encoder": True}, "a compiled vision encoder (compilation_config.compile_mm_encoder=True)"),
    ],
)
def test_encoder_compilation_that_hides_the_selection_is_refused(
    ckpt, requests_, tmp_path, method, compilation, message
):
    spec = dict(
        checkpoint=ckpt,
        hf_overrides={"vtprune": PRUNED[method]},
        max_tokens=1,
        multiprocess=False,
        requests=requests_[:1],
        compilation_config=compilation,
    )
    out, proc = run_json(sys.executable, "serve_once.py", spec, tmp_path)
    assert out is None and proc.returncode != 0
    assert message in proc.stderr


def test_qwen3_video_is_refused_at_startup(ckpts, requests_qwen3, tmp_path):
    """Qwen3-VL's per-frame runs cannot be sized before selection: an engine that would accept videos does not
    start, and says how to serve images only."""
    spec = dict(
        checkpoint=ckpts("qwen3_vl"),
        hf_overrides={"vtprune": PRUNED["divprune"]},
        max_tokens=1,
        multiprocess=False,
        requests=requests_qwen3[:1],
        limit_mm_per_prompt={"image": 1, "video": 1},
    )
    out, proc = run_json(sys.executable, "serve_once.py", spec, tmp_path)
    assert out is None and proc.returncode != 0
    assert "vtprune.vllm prunes Qwen3-VL videos only with pool and random" in proc.stderr
    assert "method 'divprune' selects from the pixels" in proc.stderr
    assert "--limit-mm-per-prompt '{\"video\": 0}'" in proc.stderr


class _Cfg:
    def __init__(self, value):
        self.vtprune = value
        self.num_hidden_layers = 4


@pytest.mark.parametrize(
    "value, message",
    [
        ({"method": "fastv", "keep": 4}, "prunes inside the language model"),
        ({"method": "dart", "keep": 4}, "prunes inside the language model"),
        ({"method": "visionzip", "keep": 4, "importance": "cls"}, "importance='cls' needs the vision tower's CLS"),
        ({"method": "cls", "keep": 4, "importance": "cls"}, "Qwen-VL towers have no CLS token"),
        ({"method": "todre", "keep": 4}, "a late drop, from a decoder layer's attention"),
        ({"method": "todre", "keep": 4}, 'serve its pre-LLM selection alone with {"late_drop": false}'),
        ({"method": "cdpruner", "keep": 4}, "needs the signal(s) ['prompt_embeds']"),
        ({"method": "cdpruner", "keep": 4}, "caches its output per media item by content hash"),
        ({"method": "pdrop", "keep": 4}, "prunes inside the language model"),
        ({"method": "divprun", "keep": 4}, "Did you mean 'divprune'"),
        ({"method": "divprune"}, "needs a budget"),
        ({"method": "divprune", "keep": 4, "ratio": 0.5}, "not both"),
        ({"method": "divprune", "keep": 4, "metrc": "l2"}, "unknown option(s) ['metrc']"),
        ({"keep": 4}, "a mapping with a 'method' key"),
        ("{not json", "not valid JSON"),
        ({"method": "random", "keep": 4, "positions": "compact"}, "positions='compact' is not supported"),
        ({"method": "vidcom2", "ratio": 0.25}, "its kept count is its own (kept_count='own'"),
        ({"method": "fastvid", "ratio": 0.25}, "its kept count is its own (kept_count='at_most'"),
        ({"method": "flashvid", "ratio": 0.25}, "its kept count is its own (kept_count='own'"),
        ({"method": "evs", "q": 1.0}, "q must be in [0, 1)"),
        ({"method": "evs", "q": 0.5, "ratio": 0.5}, "exactly one budget"),
    ],
)
def test_bad_setting_is_refused(value, message):
    with pytest.raises(ValueError) as err:
        setting.read(_Cfg(value))
    assert message in str(err.value)


def test_setting_round_trip():
    assert setting.read(_Cfg(None)) is None
    text = setting.overrides({"method": "divprune", "ratio": 0.25})
    assert setting.read(_Cfg(json.loads(text)["vtprune"])).ratio == 0.25
    assert setting.read(_Cfg(json.dumps({"method": "random", "keep": 7}))).budget(20) == 7
    assert setting.servable_methods() == [
        *("cls", "divprune", "evs", "hiprune", "holov", "idpruner", "pool", "random", "scope", "visionzip"),
        *("vispruner", "zoo"),
    ]
    assert setting.read(_Cfg({"method": "evs", "q": 0.75})).q == 0.75
    # every served method is compared with the Hugging Face path (images and videos: PRUNED, videos only: VIDEO25)
    compared = {c["method"] for c in (*PRUNED.values(), *VIDEO25.values()) if c.get("late_drop", True)}
    assert set(setting.servable_methods()) == compared
    assert setting.served().endswith("zoo, todre with late_drop=false")
    assert setting.read(_Cfg({"method": "todre", "ratio": 0.5, "late_drop": False})).late_drop is False


def test_video_methods_size_a_video_from_its_grid_and_refuse_images():
    """``evs`` with vLLM's pruning rate: a Qwen2.5-VL video's one placeholder run holds ``max(N, int(T N (1 - q)))``
    tokens (known from the grid); an image under a videos-only method is refused with the reason."""
    from vtprune.vllm import sizing

    for value, frames, n, expected in (
        ({"method": "evs", "q": 0.3}, 4, 24, int(24 * 0.7)),
        ({"method": "evs", "q": 0.9}, 4, 24, 6),  # never less than a frame
        ({"method": "evs", "ratio": 0.25}, 4, 24, 6),
        ({"method": "random", "keep": 5}, 4, 24, 5),
    ):
        config = setting.read(_Cfg(value))
        assert sizing.kept_count(config, setting.method(config), "video", n, frames) == expected, value
    config = setting.read(_Cfg({"method": "evs", "q": 0.5}))
    with pytest.raises(ValueError, match=r"method 'evs' prunes videos only.*--limit-mm-per-prompt"):
        sizing.kept_count(config, setting.method(config), "image", 24, None)
