"""Every registered method x every supported family, on tiny random-weight models.

Correctness is checked against independent routes: the unpatched model fed only the kept tokens, each batch
row run alone, the model before patching.
"""

import pytest
import torch
from conftest import MULTI_POINT_METHODS, budget, opts, refused, supports
from tiny import (
    FAMILIES,
    assert_keep_all_is_bit_identical,
    make_inputs,
    route_greedy,
    run_recording_layer_lengths,
    split_rows,
)
from tiny import greedy as _generate
from tiny import last_logits as _last_logits

import vtprune

METHODS = vtprune.list_methods(host="vlm", modality="image")  # videos only: tests/methods/test_video_evs_vidcom2.py
CASES = [(m, f) for m in METHODS for f in FAMILIES]
SUPPORTED = [c for c in CASES if supports(*c)]
UNSUPPORTED = [c for c in CASES if refused(*c)]
ROWS = [(5, 1, 4), (2, 1, 9)]  # (text before, images, text after) per batch row


@pytest.mark.parametrize("method,family", SUPPORTED)
def test_keep_all_is_bit_identical(method, family, model_factory):
    model = model_factory(family)
    assert_keep_all_is_bit_identical(model, make_inputs(model, family, ROWS), method, **opts(method, ratio=1.0))


@pytest.mark.parametrize("method,family", UNSUPPORTED)
def test_unsupported_signal_raises(method, family, model_factory):
    model = model_factory(family)
    with pytest.raises(ValueError, match="CLS|multi-crop|linear_attention"):
        vtprune.patch(model, method, **opts(method, keep=4))
    assert not vtprune.is_patched(model)


@pytest.mark.parametrize("method,family", [c for c in SUPPORTED if c[0] not in MULTI_POINT_METHODS])
def test_layers_after_pruning_point_see_text_plus_k(method, family, model_factory):
    model = model_factory(family)
    inputs = make_inputs(model, family, [(6, 1, 5)])
    seq = inputs["input_ids"].shape[1]
    seen, st = run_recording_layer_lengths(model, inputs, method, **opts(method, keep=3))
    n = st.visual_tokens_in[0]
    assert st.visual_tokens_kept == [3] and n > 3
    assert st.kept_indices[0].tolist() == sorted(st.kept_indices[0].tolist()) and len(st.kept_indices[0]) == 3
    start = 0 if st.stage == "vision" else st.layer
    late = st.late_dropped is not None and st.late_dropped[0]
    for i, length in seen:
        expected = seq - n + 3 if i >= start else seq
        if late and i >= st.late_drop_layer:  # a late drop removed every visual token (todre stage 2)
            expected = seq - n
        assert length == expected, (i, length)
    assert st.prefill_flops < st.prefill_flops_full
    assert st.select_ms >= 0


def _kept_positions(model, inputs, st):
    """Sequence positions (row 0) of the text tokens and the kept visual tokens."""
    ids = inputs["input_ids"][0]
    visual = torch.isin(ids, torch.tensor(model.model.config.image_token_id)).nonzero().squeeze(1)
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[visual] = False
    keep[visual[st.kept_indices[0]]] = True
    return keep.nonzero().squeeze(1)


def _full_embeds_and_positions(model, family, inputs):
    inner = model.model
    with torch.no_grad():
        embeds = inner.get_input_embeddings()(inputs["input_ids"])
        kw = {k: inputs[k] for k in ("image_sizes", "image_grid_thw") if k in inputs}
        feats = torch.cat(list(inner.get_image_features(inputs["pixel_values"], **kw).pooler_output))
        mask = (inputs["input_ids"] == inner.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))
        if family.startswith("qwen"):
            pos, _ = inner.get_rope_index(
                inputs["input_ids"],
                image_grid_thw=inputs["image_grid_thw"],
                video_grid_thw=None,
                attention_mask=inputs["attention_mask"],
                mm_token_type_ids=inputs["mm_token_type_ids"],
            )
        else:
            pos = torch.arange(embeds.shape[1])[None]
    return embeds, pos


def _selects_only(method):
    """Vision-stage methods that keep tokens as they are (merging methods are checked in their own tests)."""
    cls = vtprune.registry.get_method(method).method_cls
    return cls.stage == "vision" and not cls.merges


@pytest.mark.parametrize(
    "method,family", [c for c in SUPPORTED if _selects_only(c[0]) and not c[1].startswith("qwen3_vl")]
)
def test_vision_stage_equals_unpatched_model_fed_kept_tokens(method, family, model_factory):
    model = model_factory(family)
    inputs = make_inputs(model, family, [(6, 1, 5)])
    with vtprune.patched(model, method, **opts(method, keep=4)):
        tokens = _generate(model, inputs, n=5)
        logits = _last_logits(model, inputs)
        st = vtprune.stats(model)
    keep = _kept_positions(model, inputs, st)
    embeds, pos = _full_embeds_and_positions(model, family, inputs)
    route = dict(
        inputs_embeds=embeds[:, keep],
        position_ids=pos[..., keep],
        attention_mask=torch.ones(1, keep.numel(), dtype=torch.long),
    )
    if "token_type_ids" in inputs:  # Gemma 3: the bidirectional image block restricted to the kept image tokens
        route["token_type_ids"] = inputs["token_type_ids"][:, keep]
    with torch.no_grad():
        ref_logits = model(**route).logits[:, -1].float()
        if family == "gemma3":  # its generate does not take inputs_embeds
            ref_tokens = route_greedy(model, route, 5)
        else:
            ref_tokens = model.generate(**route, max_new_tokens=5, do_sample=False)[:, -5:]
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("method,family", SUPPORTED)
def test_left_padded_batch_equals_rows_alone(method, family, model_factory):
    model = model_factory(family)
    specs = [(3, 1, 4), (9, 2, 2), (2, 1, 12)] if family != "llava_next" else [(3, 1, 4), (2, 1, 9)]
    batch, singles = split_rows(model, family, specs)
    with vtprune.patched(model, method, **opts(method, ratio=0.3)):
        logits = _last_logits(model, batch)
        tokens = _generate(model, batch)
        kept = vtprune.stats(model).visual_tokens_kept
        for i, one in enumerate(singles):
            torch.testing.assert_close(_last_logits(model, one)[0], logits[i], rtol=1e-4, atol=1e-4)
            assert vtprune.stats(model).visual_tokens_kept == [kept[i]]
            assert torch.equal(_generate(model, one)[0], tokens[i])
    assert len(set(kept)) > 1 or family == "llava" or method == "pdrop"  # rows keep different numbers of tokens
    # (pdrop at ratio=0.3: the last stage keeps int(n lam^3) = 1 of both llava_next images)


@pytest.mark.parametrize(
    "method,family", [c for c in SUPPORTED if vtprune.registry.get_method(c[0]).method_cls.stage == "vision"]
)
def test_generation_with_cache_equals_without(method, family, model_factory):
    model = model_factory(family)
    inputs = make_inputs(model, family, ROWS)
    with vtprune.patched(model, method, **opts(method, keep=5)):
        assert torch.equal(_generate(model, inputs, use_cache=True), _generate(model, inputs, use_cache=False))


@pytest.mark.parametrize("method,family", SUPPORTED)
def test_unpatch_restores_model_exactly(method, family, model_factory):
    model = model_factory(family)
    inputs = make_inputs(model, family, ROWS)
    ref = _last_logits(model, inputs)
    impl = model.config._attn_implementation

    def hook_counts():
        return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]

    before = hook_counts()
    vtprune.patch(model, method, **budget(method, 3))
    assert model.config._attn_implementation == impl == "sdpa"
    assert not torch.equal(_last_logits(model, inputs), ref)
    vtprune.unpatch(model)
    assert hook_counts() == before
    assert "get_image_features" not in vars(model.model)
    assert model.config._attn_implementation == impl
    assert torch.equal(_last_logits(model, inputs), ref)
    vtprune.patch(model, "random", keep=2)  # patch again with another method
    vtprune.unpatch(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_inputs_without_images_are_a_noop(family, model_factory):
    model = model_factory(family)
    inputs = make_inputs(model, family, [(7, 0, 3), (4, 0, 6)])
    ref = _last_logits(model, inputs)
    with vtprune.patched(model, "fastv", keep=2):
        assert torch.equal(_last_logits(model, inputs), ref)
        assert vtprune.stats(model) is None


def test_patched_context_unpatches_on_error(model_factory):
    model = model_factory("llava")
    with pytest.raises(RuntimeError, match="boom"):
        with vtprune.patched(model, "random", keep=2):
            raise RuntimeError("boom")
    assert not vtprune.is_patched(model)


def test_patched_context_removes_only_its_own_patch(model_factory):
    # the body may unpatch (and patch again) itself: exit neither raises "not patched" nor removes the body's own
    # patch, and an error in the body is not masked by one from the exit
    model = model_factory("llava")
    with vtprune.patched(model, "random", keep=2):
        vtprune.unpatch(model)
    assert not vtprune.is_patched(model)
    with vtprune.patched(model, "random", keep=2):
        vtprune.unpatch(model)
        vtprune.patch(model, "cls", keep=3)
    assert [m.name for m in model._vtprune_session.methods] == ["cls"]
    vtprune.unpatch(model)
    with pytest.raises(RuntimeError, match="boom"):
        with vtprune.patched(model, "random", keep=2):
            vtprune.unpatch(model)
            raise RuntimeError("boom")
    assert not vtprune.is_patched(model)


def test_stats_flops_match_flops_module(model_factory):
    from vtprune import flops

    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(6, 1, 5)])
    seq = inputs["input_ids"].shape[1]
    with vtprune.patched(model, "fastv", keep=4, layer=2), torch.no_grad():
        model(**inputs)
        st = vtprune.stats(model)
    text, n = model.config.text_config, st.visual_tokens_in[0]
    vision = flops.vision_flops(model.config, num_images=1)
    assert st.prefill_flops_full == flops.decoder_prefill_flops(text, seq) + vision
    assert st.prefill_flops == flops.decoder_prefill_flops(text, [seq, seq, seq - n + 4, seq - n + 4]) + vision
    assert st.stage == "llm" and st.layer == 2


def test_config_object_and_json_round_trip():
    cfg = vtprune.FastVConfig(keep=64, layer=3)
    again = vtprune.PruneConfig.from_json(cfg.to_json())
    assert again == cfg and type(again) is vtprune.FastVConfig
    assert vtprune.RandomConfig(ratio=0.25).budget(576) == 144
    assert vtprune.RandomConfig(keep=600).budget(576) == 576
    with pytest.raises(TypeError, match="unknown option"):
        vtprune.PruneConfig.from_dict({"method": "fastv", "keep": 3, "layr": 2})


def test_patch_with_config_instance(model_factory):
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(6, 1, 5)])
    with vtprune.patched(model, vtprune.CLSConfig(keep=5, start_layer=1)), torch.no_grad():
        model(**inputs)
        assert vtprune.stats(model).visual_tokens_kept == [5]


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(method="fastvv", keep=4), ValueError, "Did you mean 'fastv'"),
        (dict(method="random", keep=0), ValueError, "keep must be >= 1"),
        (dict(method="random", keep=-3), ValueError, "keep must be >= 1"),
        (dict(method="random", keep="5"), TypeError, "keep must be an int"),
        (dict(method="random", ratio=0.0), ValueError, r"ratio must be in \(0, 1\]"),
        (dict(method="random", ratio=1.5), ValueError, r"ratio must be in \(0, 1\]"),
        (dict(method="random", keep=4, ratio=0.5), ValueError, "not both"),
        (dict(method="random"), ValueError, "needs a budget"),
        (dict(method="random", keep=4, sead=1), TypeError, r"unknown option\(s\) \['sead'\]"),
        (dict(method="fastv", keep=4, layer=4), ValueError, "layer=4 is out of range"),
        (dict(method="cls", keep=4, start_layer=3), ValueError, "no vision layer"),
        (dict(method=3, keep=4), TypeError, "method must be"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, exc, match, model_factory):
    model = model_factory("llava")
    method = kwargs.pop("method")
    with pytest.raises(exc, match=match):
        vtprune.patch(model, method, **opts(method, **kwargs))
    assert not vtprune.is_patched(model)


def test_numpy_budgets_are_plain_numbers():
    # a sweep's budgets often come from numpy (np.arange, a DataFrame column): numpy ints / floats are ints / floats,
    # stored as Python numbers (JSON round-trip); bools and tensors stay refused
    import numpy as np

    cfg = vtprune.RandomConfig(keep=np.int64(4))
    assert cfg.keep == 4 and type(cfg.keep) is int
    assert vtprune.PruneConfig.from_json(cfg.to_json()) == cfg
    cfg = vtprune.RandomConfig(ratio=np.float32(0.25))
    assert cfg.ratio == 0.25 and type(cfg.ratio) is float
    with pytest.raises(TypeError, match="keep must be an int"):
        vtprune.RandomConfig(keep=np.bool_(True))
    with pytest.raises(TypeError, match="keep must be an int"):
        vtprune.RandomConfig(keep=torch.tensor(4))
    with pytest.raises(ValueError, match="keep must be >= 1"):
        vtprune.RandomConfig(keep=np.int32(0))


def test_text_only_model_is_rejected():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    )
    with pytest.raises(ValueError, match=r"model_type='llama'.*supported model types: .*\bllava\b.*\bqwen2_vl\b"):
        vtprune.patch(lm, "random", keep=4)
    with pytest.raises(TypeError, match="expected a transformers model"):
        vtprune.patch("llava", "random", keep=4)


def test_double_patch_and_unpatch_errors(model_factory):
    model = model_factory("llava")
    vtprune.patch(model, "random", keep=4)
    with pytest.raises(ValueError, match="already patched.*unpatch"):
        vtprune.patch(model, "fastv", keep=4)
    vtprune.unpatch(model)
    with pytest.raises(ValueError, match="not patched"):
        vtprune.unpatch(model)


@pytest.mark.parametrize("method,family", SUPPORTED)
def test_inference_mode_gives_the_same_selection(method, family, model_factory):
    # lmms-eval and most serving code run models under torch.inference_mode
    model = model_factory(family)
    inputs = make_inputs(model, family, [(5, 1, 4)])
    with vtprune.patched(model, method, **budget(method, 3)):
        with torch.no_grad():
            ref = _last_logits(model, inputs)
            kept = vtprune.stats(model).kept_indices
        with torch.inference_mode():
            assert torch.equal(_last_logits(model, inputs), ref)
            assert all(torch.equal(a, b) for a, b in zip(vtprune.stats(model).kept_indices, kept))
