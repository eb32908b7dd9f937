"""``evs`` and ``vidcom2`` on the video families: the kept tokens are what a from-scratch reading of the official code
keeps on the features the model computes itself (captured here with its own ``get_video_features``), the pruned
model equals the unpatched model fed only the kept tokens at their original positions, a batch row equals the row
alone, generation with cache equals without, and images (videos only methods) are kept whole with one warning."""

import warnings

import pytest
import torch
from test_video_methods import _assemble, _batch_and_rows, _vision_route
from tiny import QWEN3, last_logits, make_inputs, video_inputs

import vtprune

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava_next_video")
#: (method, options): vLLM's pruning rate, the usual budget, VidCom2's ratio
CASES = {
    "evs-q": ("evs", {"q": 0.3}),
    "evs-keep": ("evs", {"keep": 7}),
    "vidcom2": ("vidcom2", {"ratio": 0.4}),
}
#: (family, case): every case on the three families, Qwen3-VL / Qwen3.5 (a run per frame between timestamps) once
OFFICIAL = [(f, c) for f in FAMILIES for c in CASES] + [("qwen3_vl", "evs-q"), ("qwen3_5", "vidcom2")]
#: the batch check (slower): every case on Qwen2.5-VL, one or two on each other family
BATCH = [("qwen2_5_vl", c) for c in CASES] + [
    ("qwen2_vl", "vidcom2"),
    ("llava_next_video", "evs-q"),
    ("llava_next_video", "evs-keep"),
    ("qwen3_vl", "evs-q"),
    ("qwen3_5", "evs-keep"),
]


# -- from-scratch readings of the official code ------------------------------------------------------------------
def official_evs(x: torch.Tensor, frames: int, q=None, k=None) -> torch.Tensor:
    """vLLM ``vllm/multimodal/evs.py`` @094f1178 ``compute_retention_mask`` on ``x [T*N, D]`` (``k``: that count
    instead of ``compute_retained_tokens_count``): kept flat indices, ascending."""
    v = x.reshape(frames, -1, x.shape[-1])
    n = v.shape[1]
    dis = torch.cat([torch.full((1, n), 255.0), 1 - torch.nn.functional.cosine_similarity(v[1:], v[:-1], dim=-1)])
    order = torch.argsort(dis.flatten(), descending=True, stable=True)
    count = k if k is not None else max(n, int(n * frames * (1 - q)))
    mask = torch.zeros(frames * n, dtype=torch.bool)
    mask[order[:count]] = True
    return mask.nonzero().squeeze(1)


def official_vidcom2(x: torch.Tensor, frames: int, base_scale: float) -> torch.Tensor:
    """xuyang-liu16/VidCom2 ``token_compressor/vidcom2/vidcom2.py`` @d31b1560 ``vidcom2_compression`` (linear
    mapper) on ``x [T*N, D]``: kept flat indices, ascending."""
    tpf = x.shape[0] // frames
    sel = x[:, torch.topk(x.var(dim=0, unbiased=False), k=int(x.shape[-1] * 0.5), largest=False).indices]
    f = torch.nn.functional.normalize(sel.view(-1, tpf, sel.shape[-1]), dim=-1)

    def gauss(centre):
        d = ((f - centre) ** 2).sum(-1)
        return sum(torch.exp(-d / (2 * a)) for a in [2**k for k in range(-3, 2)])

    vid, frm = gauss(f.mean(dim=(0, 1), keepdim=True)), gauss(f.mean(dim=1, keepdim=True))
    u = -vid.mean(dim=-1)
    probs = torch.softmax((u - u.max()) / 0.01, dim=0)
    ks = (base_scale * (1 + probs - probs.mean())).clamp(max=1.0).mul(tpf).round().long().clamp(min=1).tolist()
    score = vid + frm
    idx = [torch.topk(score[i], k=k, largest=False).indices.sort().values + i * tpf for i, k in enumerate(ks)]
    return torch.cat(idx)


def _video(model, family, frames):
    """One row holding one video of ``frames`` frames as the LLM sees them, and its pixel inputs."""
    if family.startswith("qwen"):
        gen = torch.Generator().manual_seed(3)
        grid = torch.tensor([[frames, 4, 6]])  # frames temporal patches of 2 x 3 tokens
        pix = dict(pixel_values_videos=torch.randn(frames * 24, 3 * 2 * 14 * 14, generator=gen), video_grid_thw=grid)
        n = frames * 6
    else:
        pix, (n,) = video_inputs(model, frames=(frames,), seed=3)
    return _assemble(family, [[("video", n, pix)]], [0]), n


def _features(model, one):
    """The video's post-projector tokens ``[n, D]``, as the unpatched model computes them."""
    call = {k: one[k] for k in ("video_grid_thw",) if k in one}
    with torch.no_grad():
        return torch.cat(list(model.model.get_video_features(one["pixel_values_videos"], **call).pooler_output))


@pytest.mark.parametrize("family,case", OFFICIAL)
def test_kept_tokens_are_the_official_reading_and_the_model_fed_them(family, case, model_factory):
    model = model_factory(family)
    method, options = CASES[case]
    frames = 4 if not family.startswith("qwen") else 2 if family in QWEN3 else 3  # tiny's Qwen3 video: 2 frame runs
    one, n = _video(model, family, frames)
    with vtprune.patched(model, method, **options):
        logits = last_logits(model, one)
        st = vtprune.stats(model)
    x = _features(model, one).float()
    if method == "evs":
        expected = official_evs(x, frames, q=options.get("q"), k=options.get("keep"))
    else:
        expected = official_vidcom2(x, frames, options["ratio"])
    assert 0 < expected.numel() < n
    assert st.visual_tokens_in == [n] and torch.equal(st.kept_indices[0], expected)
    torch.testing.assert_close(logits, _vision_route(model, family, one, expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,case", BATCH)
def test_batch_rows_equal_rows_alone_and_the_image_is_kept_whole(family, case, model_factory):
    """Row 0: an image and a video; row 1: a video. Each row equals the row alone and the unpatched model fed its kept
    tokens; the image keeps all its tokens (one warning per patch); generate with cache equals without."""
    model = model_factory(family)
    method, options = CASES[case]
    batch, singles, rows = _batch_and_rows(model, family)
    with vtprune.patched(model, method, **options):
        with pytest.warns(UserWarning, match=f"{method!r} prunes video units only: every image") as record:
            logits = last_logits(model, batch)
            last_logits(model, batch)
        st = vtprune.stats(model)
        alone = [last_logits(model, one) for one in singles]
        if case == "evs-q":  # generate with cache equals without (one case per family: the slowest check)
            with torch.no_grad():
                cached = model.generate(**batch, max_new_tokens=2, do_sample=False)
                uncached = model.generate(**batch, max_new_tokens=2, do_sample=False, use_cache=False)
            assert torch.equal(cached, uncached)
    assert sum("prunes video units only" in str(w.message) for w in record) == 1
    image_n = rows[0][0][1]
    assert st.kept_indices[0][:image_n].tolist() == list(range(image_n))  # the image, whole
    for i, one in enumerate(singles):
        torch.testing.assert_close(logits[i : i + 1], alone[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            alone[i], _vision_route(model, family, one, st.kept_indices[i]), rtol=1e-5, atol=1e-5
        )
    assert all(kept < n_in for kept, n_in in zip(st.visual_tokens_kept, st.visual_tokens_in))


@pytest.mark.parametrize("method", ["evs", "vidcom2"])
def test_a_prompt_of_images_only_is_left_unpruned_with_one_warning(method, model_factory):
    model = model_factory("qwen2_vl")
    inputs = make_inputs(model, "qwen2_vl", [(3, 2, 4)])
    plain = last_logits(model, inputs)
    with vtprune.patched(model, method, ratio=0.25):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            first, second = last_logits(model, inputs), last_logits(model, inputs)
        st = vtprune.stats(model)
    assert [str(w.message) for w in record if "kept whole" in str(w.message)] == [
        f"method {method!r} prunes video units only: every image in the prompt is kept whole (all its visual tokens "
        "reach the language model; this warning is given once per patch). To prune images too, use a method that "
        "prunes them: vtprune.list_methods(modality='image')"
    ]
    assert torch.equal(first, plain) and torch.equal(second, plain)
    assert st is None or st.visual_tokens_kept == st.visual_tokens_in


def test_registry_record_says_videos_only():
    assert {"evs", "vidcom2"} <= set(vtprune.list_methods(modality="video"))
    assert not {"evs", "vidcom2"} & set(vtprune.list_methods(modality="image"))


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"q": 0.5, "ratio": 0.25}, ValueError, "exactly one budget: q=.*got q=0.5, keep=None, ratio=0.25"),
        ({"q": 0.5, "keep": 4}, ValueError, "exactly one budget"),
        ({"q": 1.0}, ValueError, r"q must be in \[0, 1\).*got 1.0"),
        ({"q": -0.1}, ValueError, r"q must be in \[0, 1\)"),
        ({"q": float("nan")}, ValueError, r"q must be in \[0, 1\)"),
        ({"q": True}, TypeError, "q must be a float"),
        ({"q": "0.5"}, TypeError, "q must be a float"),
        ({}, ValueError, "needs a budget"),
    ],
)
def test_evs_refuses_bad_budgets(options, error, match):
    with pytest.raises(error, match=match):
        vtprune.EVSConfig(**options)


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"ratio": 0.25, "temperature": 0}, ValueError, r"temperature must be in \(0, inf\)"),
        ({"ratio": 0.25, "channel_ratio": 1.5}, ValueError, r"channel_ratio must be in \(0, 1\]"),
        ({"ratio": 0.25, "channel_ratio": "x"}, TypeError, "channel_ratio must be a float"),
        ({"ratio": 0.25, "keep": 3}, ValueError, "either keep= or ratio="),
    ],
)
def test_vidcom2_refuses_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        vtprune.VidCom2Config(**options)


def test_evs_q_round_trips_and_zero_keeps_everything(model_factory):
    cfg = vtprune.EVSConfig(q=0.75)
    assert vtprune.PruneConfig.from_json(cfg.to_json()) == cfg
    model = model_factory("qwen2_vl")
    one, n = _video(model, "qwen2_vl", 3)
    plain = last_logits(model, one)
    with vtprune.patched(model, "evs", q=0.0):
        assert torch.equal(last_logits(model, one), plain)
    with vtprune.patched(model, "evs", q=0.9):  # vLLM's floor: one frame's tokens, here the whole first frame
        last_logits(model, one)
        assert vtprune.stats(model).kept_indices[0].tolist() == list(range(n // 3))


@pytest.mark.parametrize("method,options", [("evs", {"q": 0.3}), ("vidcom2", {"ratio": 0.4})])
def test_onevision_videos_are_frames_and_their_newline_is_kept(method, options, model_factory):
    """LLaVA-OneVision ends a video with one newline token: the method sees the frames' tokens only (the official
    reading on them), and the newline reaches the language model like text."""
    model = model_factory("llava_onevision")
    frames = 4
    pix, (n,) = video_inputs(model, frames=(frames,), seed=3)
    one = _assemble("llava_onevision", [[("video", n, pix)]], [0])
    with vtprune.patched(model, method, **options):
        logits = last_logits(model, one)
        st = vtprune.stats(model)
    x = _features(model, one).float()[: n - 1]  # the frames' tokens; the newline is the video's last placeholder
    expected = official_evs(x, frames, q=options["q"]) if method == "evs" else official_vidcom2(x, frames, 0.4)
    assert st.visual_tokens_in == [n - 1] and torch.equal(st.kept_indices[0], expected)
    # the route feeds the newline as text (kept) and the kept frame tokens
    torch.testing.assert_close(logits, _vision_route(model, "llava_onevision", one, expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["evs", "vidcom2"])
def test_internvl_has_no_video_input_and_is_refused_at_patch(method, model_factory):
    model = model_factory("internvl")
    with pytest.raises(ValueError, match=f"method {method!r}.*internvl has no video input"):
        vtprune.patch(model, method, ratio=0.5)


def test_evs_first_in_a_schedule_with_a_decoder_method(model_factory):
    model = model_factory("qwen2_vl")
    one, _ = _video(model, "qwen2_vl", 3)
    schedule = [vtprune.EVSConfig(ratio=0.5), vtprune.FastVConfig(keep=3)]  # evs first: fine
    with vtprune.patched(model, schedule):
        last_logits(model, one)
        assert vtprune.stats(model).visual_tokens_kept == [3]


def test_kept_counts_known_from_the_grid():
    """``Method.grid_count`` (what the vLLM plugin sizes a prompt with): EVS's ``q`` count needs the frames; VidCom2's
    own count depends on the pixels (None)."""
    from vtprune.methods.evs import EVS
    from vtprune.methods.vidcom2 import VidCom2

    assert EVS(vtprune.EVSConfig(q=0.3)).grid_count(24, 4) == int(24 * 0.7)
    assert EVS(vtprune.EVSConfig(q=0.9)).grid_count(24, 4) == 6
    assert EVS(vtprune.EVSConfig(q=0.3)).grid_count(24) is None
    assert EVS(vtprune.EVSConfig(keep=5)).grid_count(24, 4) == 5
    assert VidCom2(vtprune.VidCom2Config(ratio=0.25)).grid_count(24, 4) is None
