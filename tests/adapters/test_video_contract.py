"""The video contract on every video family (issue 25): a video is one unit of ``T`` equal frames
(``VisionInputs.frames``), and the pruned model equals an independent route, the UNPATCHED language model fed only
the kept tokens at their original positions (:func:`tiny.layer_route` at layer 0, DeepStack levels included).

Prompts are built by hand per family: Qwen2-VL / Qwen2.5-VL one ``<vision_start>`` run per video; Qwen3-VL /
Qwen3.5 one run per frame after a timestamp token; LLaVA-NeXT-Video one run of pooled frames; LLaVA-OneVision one
run of pooled frames plus a trailing newline (a structure token outside the unit, always kept). ``frame_budget``
(per-frame selection, ``vtprune/engine/frames.py``) is checked against :func:`vtprune.functional.frame_budgets` and
:func:`vtprune.functional.kcenter_select` run per frame by hand on the model's own video features.
"""

import pytest
import torch
from tiny import IMAGE_ID, VEND_ID, VIDEO_ID, VSTART_ID, greedy, last_logits, layer_route, video_inputs

import vtprune
from vtprune import functional as F

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "llava_next_video", "llava_onevision")
QWEN3 = ("qwen3_vl", "qwen3_5")
LLAVA = ("llava_next_video", "llava_onevision")
#: the four families the contract names; Qwen2-VL and Qwen3.5 (same paths as Qwen2.5-VL / Qwen3-VL) run the route only
CORE = ("qwen2_5_vl", "qwen3_vl", "llava_next_video", "llava_onevision")


def _prompt(model, family: str, frames: int = 2, image: bool = False, seed: int = 0):
    """One row ``(inputs, frame_tokens)``: text, optionally an image, a video of ``frames`` frames (Qwen: temporal
    patches), text; ``frame_tokens`` the video's tokens per frame."""
    gen = torch.Generator().manual_seed(seed)
    ids, types, kw = [5, 6], [0, 0], {}
    if family in LLAVA:
        if image:
            sizes = torch.tensor([[56, 112]])
            kw = dict(pixel_values=torch.randn(1, 5, 3, 56, 56, generator=gen), image_sizes=sizes)
            if family == "llava_onevision":
                kw["batch_num_images"] = torch.tensor([1])
            with torch.no_grad():
                n_img = model.model.get_image_features(**kw).pooler_output[0].shape[0]
            ids += [IMAGE_ID] * n_img + [9]
        pix, (n,) = video_inputs(model, (frames,), seed)
        ids += [VIDEO_ID] * n + [7, 8, 9, 10]
        inputs = dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), **kw)
        inputs.update(pix)
        return inputs, (n - (family == "llava_onevision")) // frames
    if image:
        grid = torch.tensor([[1, 4, 4]])
        kw = dict(pixel_values=torch.randn(16, 3 * 2 * 14 * 14, generator=gen), image_grid_thw=grid)
        ids += [VSTART_ID] + [IMAGE_ID] * 4 + [VEND_ID, 9]
        types += [0] + [1] * 4 + [0, 0]
    vgrid = torch.tensor([[frames, 4, 6]])
    per_frame = 6
    if family in QWEN3:  # a timestamp token, then each frame's own run
        for f in range(frames):
            ids += [11 + f, VSTART_ID] + [VIDEO_ID] * per_frame + [VEND_ID]
            types += [0, 0] + [2] * per_frame + [0]
    else:
        ids += [VSTART_ID] + [VIDEO_ID] * (per_frame * frames) + [VEND_ID]
        types += [0] + [2] * (per_frame * frames) + [0]
    ids += [7, 8, 9, 10]
    types += [0] * 4
    inputs = dict(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        pixel_values_videos=torch.randn(int(vgrid.prod()), 3 * 2 * 14 * 14, generator=gen),
        video_grid_thw=vgrid,
        mm_token_type_ids=torch.tensor([types]),
        **kw,
    )
    return inputs, per_frame


def _route_prompt(model, family, inputs):
    """``(embeds, positions, visual, levels)`` of one row for :func:`tiny.layer_route`, from the unpatched model's
    own modules: every visual feature in place, the original (M-RoPE) positions, the visual mask (OneVision's video
    newline is not a unit token: it is text there) and DeepStack levels in prompt order (None without)."""
    inner, ids = model.model, inputs["input_ids"]
    with torch.no_grad():
        embeds = inner.get_input_embeddings()(ids)
        parts, levels = [], []  # prompt order: the image (if any) comes first in these prompts
        if family in LLAVA:
            if "pixel_values" in inputs:
                keys = ("pixel_values", "image_sizes", "batch_num_images")
                out = inner.get_image_features(**{k: inputs[k] for k in keys if k in inputs})
                parts.append((IMAGE_ID, torch.cat(list(out.pooler_output))))
            parts.append((VIDEO_ID, inner.get_video_features(inputs["pixel_values_videos"]).pooler_output[0]))
            pos = torch.arange(ids.shape[1])[None]
        else:
            outs = []
            if "pixel_values" in inputs:
                outs.append((IMAGE_ID, inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])))
            outs.append((VIDEO_ID, inner.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])))
            for token, out in outs:
                parts.append((token, torch.cat(list(out.pooler_output))))
                levels.append([torch.cat(list(lvl)) for lvl in (getattr(out, "deepstack_features", None) or [])])
            pos, _ = inner.get_rope_index(
                ids,
                image_grid_thw=inputs.get("image_grid_thw"),
                video_grid_thw=inputs["video_grid_thw"],
                attention_mask=inputs["attention_mask"],
                mm_token_type_ids=inputs["mm_token_type_ids"],
            )
        for token, feats in parts:
            embeds[ids == token] = feats
    visual = (ids == IMAGE_ID) | (ids == VIDEO_ID)
    if family == "llava_onevision":
        visual[0, (ids[0] == VIDEO_ID).nonzero()[-1]] = False
    joined = [torch.cat(ls) for ls in zip(*levels)] if levels and levels[0] else None
    return embeds, pos, visual, joined


@pytest.mark.parametrize("family", CORE)
def test_keep_all_is_bit_identical_with_an_image_next_to_a_video(family, model_factory):
    model = model_factory(family)
    inputs, _ = _prompt(model, family, image=True)
    ref_logits, ref_tokens = last_logits(model, inputs), greedy(model, inputs)
    for fb in ("video", "uniform"):
        with vtprune.patched(model, "divprune", ratio=1.0, frame_budget=fb):
            assert torch.equal(last_logits(model, inputs), ref_logits)
            assert torch.equal(greedy(model, inputs), ref_tokens)
            st = vtprune.stats(model)
        assert st.visual_tokens_kept == st.visual_tokens_in


@pytest.mark.parametrize(
    "family,frame_budget",
    [(f, b) for f in CORE for b in ("video", "uniform")] + [(f, "uniqueness") for f in FAMILIES if f not in CORE],
)
def test_pruned_image_and_video_equal_the_kept_token_route_and_cache_equals_no_cache(
    family, frame_budget, model_factory
):
    model = model_factory(family)
    inputs, _ = _prompt(model, family, frames=3, image=True)
    with vtprune.patched(model, "divprune", keep=5, frame_budget=frame_budget):
        logits = last_logits(model, inputs)
        tokens = greedy(model, inputs)
        assert torch.equal(greedy(model, inputs, use_cache=False), tokens)
        st = vtprune.stats(model)
    image, video = st.frame_tokens_kept[0]
    assert image is None and len(video) == 3 and sum(video) == 5
    prompt = _route_prompt(model, family, inputs)
    assert st.visual_tokens_in == [int(prompt[2].sum())]
    torch.testing.assert_close(logits, layer_route(model, prompt, st.kept_indices[0], 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", CORE)
def test_uniform_frame_budget_runs_divprune_per_frame_as_by_hand(family, model_factory):
    """Per-frame counts are the allocator's, and the kept tokens are DivPrune's k-center run on each frame's own
    features with its budget (functional, by hand)."""
    model = model_factory(family)
    frames, k = 3, 7
    inputs, m = _prompt(model, family, frames=frames)
    with vtprune.patched(model, "divprune", keep=k, frame_budget="uniform"), torch.no_grad():
        model(**inputs)
        st = vtprune.stats(model)
    _, _, visual, _ = _route_prompt(model, family, inputs)
    with torch.no_grad():
        if family in LLAVA:
            feats = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output[0][: frames * m]
        else:
            out = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
            feats = torch.cat(list(out.pooler_output))
    feats = feats.reshape(frames, m, -1)
    budgets = F.frame_budgets(feats, k, "uniform")
    assert budgets == [3, 2, 2] and st.frame_tokens_kept == [[budgets]]
    by_hand = torch.cat(
        [F.kcenter_select(feats[t], b).sort().values + t * m for t, b in enumerate(budgets) if 0 < b < m]
    )
    assert torch.equal(st.kept_indices[0], by_hand)
    # the whole-video selection differs (the test can fail): one k-center over all frames
    with vtprune.patched(model, "divprune", keep=k), torch.no_grad():
        model(**inputs)
        whole = vtprune.stats(model).kept_indices[0]
    assert torch.equal(whole, F.kcenter_select(feats.reshape(frames * m, -1), k).sort().values)


@pytest.mark.parametrize("family", CORE)
def test_a_batch_of_an_image_row_and_a_video_row_equals_each_row_alone(family, model_factory):
    model = model_factory(family)
    img_row, _ = _prompt(model, family, frames=2, image=True, seed=1)
    vid_row, _ = _prompt(model, family, frames=3, seed=2)
    if family in LLAVA:  # the image row keeps only its image: LLaVA batches videos of one frame count
        img_row = {k: v for k, v in img_row.items() if k != "pixel_values_videos"}
        ids = img_row["input_ids"].clone()
        ids[ids == VIDEO_ID] = 7
        img_row.update(input_ids=ids)
    rows = [img_row, vid_row]
    width = max(r["input_ids"].shape[1] for r in rows)
    batch = {"input_ids": [], "attention_mask": [], "mm_token_type_ids": []}
    for r in rows:  # left padding
        pad = width - r["input_ids"].shape[1]
        batch["input_ids"].append(torch.cat([torch.zeros(1, pad, dtype=torch.long), r["input_ids"]], 1))
        batch["attention_mask"].append(torch.cat([torch.zeros(1, pad, dtype=torch.long), r["attention_mask"]], 1))
        if "mm_token_type_ids" in r:
            batch["mm_token_type_ids"].append(
                torch.cat([torch.zeros(1, pad, dtype=torch.long), r["mm_token_type_ids"]], 1)
            )
    batch = {k: torch.cat(v) for k, v in batch.items() if v}
    for key in (
        "pixel_values",
        "image_sizes",
        "batch_num_images",
        "pixel_values_videos",
        "image_grid_thw",
        "video_grid_thw",
    ):
        parts = [r[key] for r in rows if key in r]
        if parts:
            batch[key] = torch.cat(parts)
    if family == "llava_onevision":  # images per row, as the model reads them
        batch["batch_num_images"] = torch.tensor([1, 0])
    if family in LLAVA:
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with vtprune.patched(model, "divprune", ratio=0.5, frame_budget="uniform"), torch.no_grad():
        logits = model(**batch).logits[:, -1]
        st = vtprune.stats(model)
        for i, one in enumerate(rows):
            torch.testing.assert_close(model(**one).logits[0, -1], logits[i], rtol=1e-4, atol=1e-4)
    assert st.frame_tokens_kept[0][0] is None and len(st.frame_tokens_kept[1][0]) == 3


def test_frame_budget_is_refused_where_it_cannot_act(model_factory):
    with pytest.raises(ValueError, match="frame_budget must be one of"):
        vtprune.DivPruneConfig(keep=4, frame_budget="frames")
    with pytest.raises(ValueError, match="prunes inside the LLM"):
        vtprune.FastVConfig(keep=4, frame_budget="uniform")
    with pytest.raises(ValueError, match="internvl has no video input"):
        vtprune.patch(model_factory("internvl"), "divprune", keep=4, frame_budget="uniform")
    assert not vtprune.is_patched(model_factory("internvl"))
    with vtprune.patched(model_factory("internvl"), "divprune", keep=4):  # the default stays served
        pass


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_next_video"])
def test_per_frame_vision_signals_are_the_videos_restricted_to_the_frame(family, model_factory, monkeypatch):
    """With ``frame_budget``, a method reading vision-side scores (``cls``: CLS rows on LLaVA-NeXT-Video, received
    attention on Qwen2.5-VL) gets, per frame, exactly the frame's part of what the whole video gives: the packed
    per-token scores of the frames, joined, equal the whole video's."""
    from vtprune.methods.base import crop_importance
    from vtprune.registry import get_method

    cls = get_method("cls").method_cls
    seen = []
    original = cls.select

    def select(self, image):
        seen.append((image.frames, image.pack_crop_scores(crop_importance(image)), image.image_start))
        return original(self, image)

    monkeypatch.setattr(cls, "select", select)
    model = model_factory(family)
    inputs, m = _prompt(model, family, frames=3)
    for fb in ("video", "uniform"):
        with vtprune.patched(model, "cls", keep=4, frame_budget=fb), torch.no_grad():
            model(**inputs)
    (frames, whole, start), *pieces = seen
    assert frames == 3 and [p[0] for p in pieces] == [1, 1, 1] and whole.numel() == 3 * m
    torch.testing.assert_close(torch.cat([p[1] for p in pieces]), whole)
    assert [p[2] for p in pieces] == [start + t * m for t in range(3)]  # one run: frames follow each other
