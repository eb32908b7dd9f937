"""Method-specific checks against independent computations on the unpatched model."""

import torch
from tiny import make_inputs

import vtprune
from vtprune import functional as F


def test_divprune_keeps_kcenter_of_projected_features(model_factory):
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(4, 1, 6)])
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"]).pooler_output[0]
    with vtprune.patched(model, "divprune", keep=6), torch.no_grad():
        model(**inputs)
        kept = vtprune.stats(model).kept_indices[0]
    assert kept.tolist() == sorted(F.kcenter_select(feats, 6).tolist())


def _dart_reference(model, inputs, layer, keep, per_pivot_fn):
    """DART's kept set from the unpatched model's own hidden states (eager route, no hooks)."""
    lm = model.model.language_model
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        h_prev = out.hidden_states[layer - 1]  # input of layer K-1
        attn = lm.layers[layer - 1].self_attn
        x = lm.layers[layer - 1].input_layernorm(h_prev)
        b, s, _ = x.shape
        k = attn.k_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)
        pos = torch.arange(s)[None]
        cos, sin = lm.rotary_emb(x, pos)
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        k = apply_rotary_pos_emb(k, k, cos, sin)[1].transpose(1, 2).reshape(b, s, -1)[0]
        normed = lm.norm(out.hidden_states[layer])[0]  # output of layer K-1, final-normed
    ids = inputs["input_ids"][0]
    where = (ids == model.config.image_token_id).nonzero().squeeze(1)
    start, n = int(where[0]), where.numel()
    return F.dart_select(normed, k, start, n, per_pivot_fn(s - start - n))


def test_dart_matches_reference_from_unpatched_hidden_states(model_factory):
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(4, 1, 6)])
    with vtprune.patched(model, "dart", keep=10), torch.no_grad():
        model(**inputs)
        kept = vtprune.stats(model).kept_indices[0]
    # exact budget: 4 image pivots + 6 picks over 8 pivots -> [1, 1, 1, 1, 1, 1, 0, 0]
    ref = _dart_reference(model, inputs, 2, 10, lambda text: [1] * 6 + [0] * 2)
    assert kept.tolist() == ref.tolist() and len(kept) == 10


def test_dart_official_rounding_keeps_pivots_plus_k_div_8_per_pivot(model_factory):
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(4, 1, 6)])
    with vtprune.patched(model, "dart", keep=8, budget_rounding="official"), torch.no_grad():
        model(**inputs)
        st = vtprune.stats(model)
    assert st.visual_tokens_kept == [4 + 8 * 1]  # 4 image pivots + 1 pick for each of 8 pivots (like 64 -> 68)
    ref = _dart_reference(model, inputs, 2, 8, lambda text: 1)
    assert st.kept_indices[0].tolist() == ref.tolist()
