"""Qwen-VL video inputs: a video is one unit whose budget covers all its frames; the pruned model equals the
unpatched model fed the kept tokens at their original 3-D positions."""

import pytest
import torch
from conftest import opts
from tiny import VEND_ID, VIDEO_ID, VSTART_ID

import vtprune


def _video_inputs():
    gen = torch.Generator().manual_seed(0)
    grid = torch.tensor([[2, 4, 6]])  # 2 temporal patches x 4 x 6 patches -> 2 * 2 * 3 = 12 tokens
    n = int(grid.prod()) // 4
    ids = [5, 6, VSTART_ID] + [VIDEO_ID] * n + [VEND_ID, 7, 8, 9, 10]
    types = [0, 0, 0] + [2] * n + [0] * 5
    return dict(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        pixel_values_videos=torch.randn(int(grid.prod()), 3 * 2 * 14 * 14, generator=gen),
        video_grid_thw=grid,
        mm_token_type_ids=torch.tensor([types]),
    ), n


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("method", ["divprune", "random", "zoo"])
def test_pruned_video_equals_unpatched_model_fed_kept_tokens(family, method, model_factory):
    model = model_factory(family)
    inputs, n = _video_inputs()
    with vtprune.patched(model, method, **opts(method, keep=5)), torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, -4:]
        st = vtprune.stats(model)
    assert st.visual_tokens_in == [n] and st.visual_tokens_kept == [5]
    inner = model.model
    ids = inputs["input_ids"][0]
    visual = (ids == VIDEO_ID).nonzero().squeeze(1)
    with torch.no_grad():
        embeds = inner.get_input_embeddings()(inputs["input_ids"])
        feats = torch.cat(
            list(inner.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output)
        )
        embeds[0, visual] = feats
        pos, _ = inner.get_rope_index(
            inputs["input_ids"],
            image_grid_thw=None,
            video_grid_thw=inputs["video_grid_thw"],
            attention_mask=inputs["attention_mask"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
        )
        keep = torch.ones(ids.numel(), dtype=torch.bool)
        keep[visual] = False
        keep[visual[st.kept_indices[0]]] = True
        route = dict(
            inputs_embeds=embeds[:, keep],
            position_ids=pos[..., keep],
            attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
        )
        ref_logits = model(**route).logits[:, -1]
        ref_tokens = model.generate(**route, max_new_tokens=4, do_sample=False)[:, -4:]
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_next_video"])
def test_a_video_unit_knows_its_frames_and_an_image_does_not(family, model_factory, monkeypatch):
    """``VisionInputs.frames``: a video's frames as the LLM sees them (Qwen-VL: temporal patches; LLaVA-NeXT-Video:
    sampled frames), None for an image; the tokens are ``frames`` equal runs."""
    from tiny import make_inputs, video_inputs

    from vtprune.registry import get_method

    cls = get_method("random").method_cls
    seen = []
    original = cls.select

    def select(self, image):
        seen.append((image.n, image.frames))
        return original(self, image)

    monkeypatch.setattr(cls, "select", select)
    model = model_factory(family)
    if family == "llava_next_video":
        pix, sizes = video_inputs(model, frames=(3,))
        inputs = make_inputs(model, family, [(2, 1, 3)])
        ids = torch.cat([torch.tensor([[5] + [VIDEO_ID] * sizes[0]]), inputs["input_ids"]], 1)
        inputs = dict(inputs, **pix, input_ids=ids, attention_mask=torch.ones_like(ids))
        frames, images = 3, 1
    else:
        inputs, _ = _video_inputs()
        frames, images = 2, 0
    with vtprune.patched(model, "random", keep=2), torch.no_grad():
        model(**inputs)
    videos = [(n, f) for n, f in seen if f is not None]
    assert len(videos) == 1 and videos[0][1] == frames and videos[0][0] % frames == 0
    assert len(seen) - len(videos) == images
