"""Signals recomputed from q/k equal the attention weights an eager model reports (independent route)."""

import torch
from tiny import make_inputs

import vtprune
from vtprune.signals import query_attention


def test_last_token_attention_equals_eager_attention_weights(model_factory):
    model = model_factory("llava", attn="eager")
    inputs = make_inputs(model, "llava", [(3, 1, 4), (8, 1, 2)])
    seen = []
    with vtprune.patched(model, "fastv", keep=4, layer=2), torch.no_grad():
        method = getattr(model, vtprune.api._ATTR).method
        select = method.select
        method.select = lambda image: seen.append(image.text_attention) or select(image)
        model(**inputs)
    with torch.no_grad():
        eager = model(**inputs, output_attentions=True).attentions[1]  # layer K-1 = 1: [B, H, S, S]
    assert len(seen) == 2
    for row, attention in enumerate(seen):
        torch.testing.assert_close(attention, eager[row, :, -1].float(), rtol=1e-5, atol=1e-6)


def test_cls_rows_equal_eager_clip_attention(model_factory):
    model = model_factory("llava", attn="eager")
    inputs = make_inputs(model, "llava", [(3, 2, 4)])
    with vtprune.patched(model, "cls", keep=4, start_layer=1), torch.no_grad():
        session = getattr(model, vtprune.api._ATTR)
        out = model.model.get_image_features(inputs["pixel_values"])
        info = session.capture.info(out.pooler_output[1])
    with torch.no_grad():
        eager = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    # layers 1..L-2 = [1, 2] of 4; image 1, its single crop
    expected = torch.stack([eager[1][1, :, 0], eager[2][1, :, 0]])  # [L, H, 1+P]
    torch.testing.assert_close(info.cls_attention[0], expected.float(), rtol=1e-5, atol=1e-6)


def test_query_attention_masks_padding_and_handles_gqa():
    torch.manual_seed(0)
    q = torch.randn(1, 4, 1, 8, dtype=torch.float64)
    k = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[False, True, True, True, True]])
    out = query_attention(q, k, 0.5, mask)
    assert out.dtype == torch.float64
    assert torch.all(out[..., 0] == 0)
    ref = torch.softmax((q[0, 3, 0] @ k[0, 1, 1:].T) * 0.5, -1)  # head 3 uses kv head 1
    torch.testing.assert_close(out[0, 3, 1:], ref)
