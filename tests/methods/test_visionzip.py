"""VisionZip: dominant + merged contextual tokens, against a from-scratch reading of the official algorithm fed
to the unpatched model."""

import pytest
import torch
from tiny import make_inputs

import vtprune
from vtprune import functional as F


def test_visionzip_select_small_case_by_hand():
    scores = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.3, 0.05])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [1.0, 0.0]])
    kept, merge = F.visionzip_select(scores, keys, dominant=2, contextual=2)
    # dominant: 1, 3; rest [0, 2, 4, 5], step 2 -> targets 0 and 4; 2 -> target 0 (cos ~1), 5 -> target 0
    assert kept.tolist() == [0, 1, 3, 4]
    expected = torch.zeros(4, 6)
    expected[0, [0, 2, 5]] = torch.tensor([1.0, 0.5, 0.5])  # target 0 + mean of {2, 5}
    expected[1, 1] = expected[2, 3] = expected[3, 4] = 1.0  # dominant; target 4 absorbed nothing
    assert torch.equal(merge, expected)
    with pytest.raises(ValueError, match="contextual must be"):
        F.visionzip_select(scores, keys, dominant=5, contextual=2)
    with pytest.raises(ValueError, match="must agree on N"):
        F.visionzip_select(scores, keys[:5], dominant=2, contextual=2)


def _official_reading(hidden, cls_row, keys, dominant, contextual):
    """The official clip_encoder.py steps, written out for one image (CLS already removed from every input)."""
    n = hidden.shape[0]
    top = torch.topk(cls_row, dominant).indices
    is_dom = torch.zeros(n, dtype=torch.bool)
    is_dom[top] = True
    rest = torch.arange(n)[~is_dom]
    metric = keys[rest] / keys[rest].norm(dim=-1, keepdim=True)
    step = max(1, rest.numel() // contextual)
    target_slots = torch.arange(0, rest.numel(), step)[:contextual]
    others = torch.tensor([i for i in range(rest.numel()) if i not in target_slots.tolist()])
    sim = metric[others] @ metric[target_slots].T
    onehot = torch.zeros(others.numel(), contextual).scatter_(1, sim.argmax(1, keepdim=True), 1.0)
    counts = onehot.sum(0).clamp(min=1)[:, None]
    context = hidden[rest[target_slots]] + (onehot.T @ hidden[rest[others]]) / counts
    out = {int(i): hidden[i] for i in top}
    out.update({int(rest[s]): context[j] for j, s in enumerate(target_slots)})
    return out  # original patch index -> vision-space vector


def test_visionzip_feeds_the_official_tokens_to_the_lm(model_factory):
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(4, 1, 6)])
    inner = model.model
    tower = inner.vision_tower
    with torch.no_grad():
        out = tower(inputs["pixel_values"], output_hidden_states=True)
        layer = len(tower.encoder.layers) - 2
        x = tower.encoder.layers[layer].layer_norm1(out.hidden_states[layer])
        attn = tower.encoder.layers[layer].self_attn
        q, k = attn.q_proj(x), attn.k_proj(x)
        h, dh = attn.num_heads, attn.head_dim
        qh, kh = q.view(1, -1, h, dh).transpose(1, 2), k.view(1, -1, h, dh).transpose(1, 2)
        cls_row = torch.softmax(qh[:, :, :1] @ kh.transpose(-1, -2) * attn.scale, -1)[0, :, 0, 1:].sum(0)
        keys = kh[0].mean(0)[1:]
        hidden = out.hidden_states[-2][0, 1:]  # the projector's input
        tokens = _official_reading(hidden, cls_row, keys, dominant=4, contextual=2)
    with vtprune.patched(model, "visionzip", keep=6, contextual=2), torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        st = vtprune.stats(model)
    assert st.kept_indices[0].tolist() == sorted(tokens) and st.visual_tokens_kept == [6]
    ids = inputs["input_ids"][0]
    visual = (ids == model.config.image_token_id).nonzero().squeeze(1)
    with torch.no_grad():
        embeds = inner.get_input_embeddings()(inputs["input_ids"])
        kept = sorted(tokens)
        embeds[0, visual[kept]] = inner.multi_modal_projector(torch.stack([tokens[i] for i in kept]))
        keep = torch.ones(ids.numel(), dtype=torch.bool)
        keep[visual] = False
        keep[visual[kept]] = True
        pos = torch.arange(ids.numel())[keep][None]
        ref = model(inputs_embeds=embeds[:, keep], position_ids=pos, attention_mask=torch.ones_like(pos)).logits[:, -1]
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_default_split_follows_the_official_ratios():
    cfg = vtprune.VisionZipConfig(keep=64)
    assert [cfg.split(k) for k in (64, 128, 192, 1)] == [(54, 10), (108, 20), (162, 30), (1, 0)]
    with pytest.raises(ValueError, match="leaves no dominant token"):
        vtprune.VisionZipConfig(keep=8, contextual=8).split(8)


@pytest.mark.parametrize(
    "options,match",
    [(dict(contextual=-1), "contextual must be None or an int"), (dict(layer=7), "layer=7 is out of range")],
)
def test_bad_visionzip_options(options, match, model_factory):
    with pytest.raises(ValueError, match=match):
        vtprune.patch(model_factory("llava"), "visionzip", keep=4, **options)
