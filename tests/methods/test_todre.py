"""ToDRE: stage-1 diversity with the CLS pivot, stage-2 late drop, against independent routes."""

import pytest
import torch
from tiny import make_inputs, split_rows

import vtprune
from vtprune import functional as F
from vtprune.methods.todre import ToDRE


def _features_and_pivot(model, inputs):
    inner = model.model
    with torch.no_grad():
        feats = inner.get_image_features(inputs["pixel_values"]).pooler_output[0]
        att = inner.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    layers = len(att)
    cls_row = att[layers - 2][0, :, 0, 1:].mean(0)  # layer L-2, head mean, CLS key dropped
    return feats, int(F.topk_indices(cls_row, 1)[0])


@pytest.mark.parametrize("diversity", ["kcenter", "maxsum"])
def test_stage1_is_diversity_from_the_cls_pivot(diversity, model_factory):
    model = model_factory("llava", attn="eager")
    inputs = make_inputs(model, "llava", [(4, 1, 6)])
    feats, first = _features_and_pivot(model, inputs)
    select = F.kcenter_select if diversity == "kcenter" else F.maxsum_select
    ref = select(feats, 6, first=first).sort().values
    with vtprune.patched(model, "todre", keep=6, diversity=diversity, late_drop=False), torch.no_grad():
        model(**inputs)
        st = vtprune.stats(model)
    assert st.kept_indices[0].tolist() == ref.tolist()
    assert st.late_drop_layer is None and st.late_dropped is None


def _route_with_late_drop(model, inputs, kept, drop_layer):
    """Unpatched layers fed the kept tokens; from ``drop_layer`` on, the text tokens only (manual forward)."""
    inner, lm = model.model, model.model.language_model
    ids = inputs["input_ids"][0]
    visual = (ids == model.config.image_token_id).nonzero().squeeze(1)
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    keep[visual] = False
    keep[visual[kept]] = True
    with torch.no_grad():
        embeds = inner.get_input_embeddings()(inputs["input_ids"])
        embeds[0, visual] = inner.get_image_features(inputs["pixel_values"]).pooler_output[0]
        pos = torch.arange(ids.numel())[keep][None]
        hidden = model(
            inputs_embeds=embeds[:, keep],
            position_ids=pos,
            attention_mask=torch.ones_like(pos),
            output_hidden_states=True,
        ).hidden_states[drop_layer]
        text = ~torch.isin(torch.arange(ids.numel())[keep], visual)
        h, pos = hidden[:, text], pos[:, text]
        rope = lm.rotary_emb(h, pos)
        for layer in lm.layers[drop_layer:]:
            h = layer(h, attention_mask=None, position_embeddings=rope, position_ids=None)
            h = h[0] if isinstance(h, tuple) else h
        return model.lm_head(lm.norm(h))[:, -1]


def test_late_drop_removes_every_visual_token_from_layer_k2(model_factory):
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(4, 1, 6)])
    with vtprune.patched(model, "todre", keep=5, drop_threshold=1.0), torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        st = vtprune.stats(model)
        cached = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
    assert st.late_dropped == [True] and st.late_drop_layer == 7 * 4 // 8 == 3
    torch.testing.assert_close(
        logits, _route_with_late_drop(model, inputs, st.kept_indices[0], 3), rtol=1e-5, atol=1e-5
    )
    assert torch.equal(cached, uncached)
    with vtprune.patched(model, "todre", keep=5, late_drop=False), torch.no_grad():
        model(**inputs)
        assert vtprune.stats(model).prefill_flops > st.prefill_flops


def test_late_drop_batch_equals_rows_alone(model_factory, monkeypatch):
    model = model_factory("llava")
    specs = [(3, 1, 4), (9, 1, 2), (2, 1, 12)]
    batch, singles = split_rows(model, "llava", specs)
    shares = []
    original = ToDRE.drop_all
    monkeypatch.setattr(ToDRE, "drop_all", lambda self, share: shares.append(share) or original(self, share))
    with vtprune.patched(model, "todre", keep=5, drop_threshold=0.0), torch.no_grad():
        for one in singles:
            model(**one)
    assert len(shares) == 3 and len(set(shares)) == 3
    low, mid, _ = sorted(shares)
    threshold = (low + mid) / 2  # the lowest-share row drops, the others keep their tokens
    with vtprune.patched(model, "todre", keep=5, drop_threshold=threshold), torch.no_grad():
        logits = model(**batch).logits[:, -1]
        dropped = vtprune.stats(model).late_dropped
        tokens = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, -4:]
        assert sum(dropped) == 1
        for i, one in enumerate(singles):
            torch.testing.assert_close(model(**one).logits[0, -1], logits[i], rtol=1e-4, atol=1e-4)
            assert vtprune.stats(model).late_dropped == [dropped[i]]
            assert torch.equal(model.generate(**one, max_new_tokens=4, do_sample=False)[0, -4:], tokens[i])


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(diversity="maxmin"), "diversity must be one of"),
        (dict(drop_threshold=1.5), r"drop_threshold must be a number in \[0, 1\]"),
        (dict(late_drop=False, drop_layer=2), "only apply with late_drop=True"),
        (dict(drop_layer=4), "layer=4 is out of range"),
        (dict(cls_layer=9), "cls_layer=9 is out of range"),
    ],
)
def test_bad_todre_options(options, match, model_factory):
    with pytest.raises(ValueError, match=match):
        vtprune.patch(model_factory("llava"), "todre", keep=4, **options)
