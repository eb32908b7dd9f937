"""Schedules: ``vtprune.patch(model, [cfg_a, cfg_b])``, methods composed at their own prune points.

Each pair's points come one after the other: a vision-stage method at the vision entry then an llm-stage method
before decoder layer K, or an llm-stage method at K1 then another at K2 > K1. Checks, per pair and family:

* keep-all (ratio=1.0 at both points) is bit-identical to the unpatched model;
* decoder layers see the full prompt before the first point, text + first budget between the points, text +
  second budget after the second one;
* ``stats().stages`` has one entry per point in model order; top-level counts / kept indices are those after the
  last point, a subset of the first point's kept set (from the first method run alone); FLOPs count both points;
* a left-padded batch equals its rows run alone; generation with cache equals generation without.

Independent routes (a first method, then fastv): the first method run alone gives its kept set; fastv's selection
is recomputed from the eager attention weights of the UNPATCHED model (same weights) — fed only the kept tokens at
their original positions (vision first), or every token with layers >= K1 masked off the first point's dropped ones
(llm first) — and the logits / generated tokens come from the unpatched model with hand-built 4-D masks hiding
fastv's dropped tokens from layers >= K (as in test_cache.py).

A decoder point that follows another decoder point (llm + llm, or fastv then ToDRE's late drop) starts from the
rotary tables the earlier point left (a regression test: it once took the host's, numbered for the uncompacted
sequence).

Runtime: every (vision method, llm method) pair and a few (llm, llm) pairs run on ``llava``; the other families run a
representative subset (every llm method and several vision methods appear on each family, where supported); about
15 s on two CPU cores.
"""

from __future__ import annotations

import pytest
import torch
from conftest import MULTI_POINT_METHODS, supports
from tiny import (
    FAMILIES,
    IMAGE_ID,
    PAD_ID,
    VEND_ID,
    VIDEO_ID,
    VSTART_ID,
    assert_keep_all_is_bit_identical,
    make_inputs,
    run_recording_layer_lengths,
    split_rows,
)
from tiny import greedy as _generate
from tiny import last_logits as _last_logits

import vtprune
from vtprune import flops
from vtprune.registry import get_method

NUM_LAYERS = 4  # tiny.py's language models
SUPPRESSED = [IMAGE_ID, VIDEO_ID, VSTART_ID, VEND_ID, PAD_ID]  # tiny.py's generation_config.suppress_tokens


def _stage(name: str) -> str:
    return get_method(name).method_cls.stage


VISION = [m for m in vtprune.list_methods(host="vlm", modality="image") if _stage(m) == "vision"]
LLM = [
    m for m in vtprune.list_methods(host="vlm", modality="image") if _stage(m) == "llm" and m not in MULTI_POINT_METHODS
]  # one-point ones


def _default_layer(name: str) -> int:
    spec = get_method(name)
    return spec.method_cls(spec.config_cls(keep=1)).layer(NUM_LAYERS)


def _spec(text: str) -> tuple[str, int | None]:
    """``"fastv@2"`` -> ("fastv", 2); ``"random"`` -> ("random", None); an llm method without ``@K``: its default."""
    name, _, layer = text.partition("@")
    if _stage(name) == "llm":
        return name, int(layer) if layer else _default_layer(name)
    assert not layer, text
    return name, None


def _cfg(spec: tuple[str, int | None], **budget) -> vtprune.PruneConfig:
    name, layer = spec
    data = {"method": name, **budget}
    if layer is not None:
        data["layer"] = layer
    if name == "todre":
        data["late_drop"] = False  # one point (its late drop at 7L/8 has its own schedule test below)
    if name == "cdpruner":
        data["text"] = "llm"  # its default on CLIP towers (text="clip") needs a CLIP text tower the tiny models lack
    return vtprune.PruneConfig.from_dict(data)


LLM_PAIRS = [("fastv@1", "dart@2"), ("dart@1", "fastv@3"), ("fastv@2", "pact@3"), ("pact@1", "dart@3")]
#: llava: every registered (vision, llm) pair + the llm pairs; other families: a representative subset (runtime)
PAIRS_BY_FAMILY = {
    "llava": [(v, lm) for v in VISION for lm in LLM] + LLM_PAIRS,
    "llava_next": [("random", "fastv"), ("cls", "dart"), ("todre", "pact"), ("zoo", "fastv"), ("fastv@1", "dart@2")],
    "llava_next_video": [("cls", "fastv"), ("pool", "dart")],
    "llava_onevision": [("zoo", "fastv"), ("random", "pact")],
    "qwen2_vl": [("divprune", "fastv"), ("zoo", "dart"), ("random", "pact"), ("dart@1", "fastv@3")],
    "qwen2_5_vl": [("random", "fastv"), ("divprune", "pact"), ("fastv@2", "pact@3"), ("fastv@1", "dart@2")],
    # DeepStack levels (injected after layers 0 and 1) sliced at the vision entry and again at layer 1 / 2
    "qwen3_vl": [("divprune", "fastv"), ("fastv@1", "dart@2")],
    "qwen3_vl_moe": [("random", "pact")],
    # hybrid decoder: layer 0 linear, so no point at K=1; layers after the points include a linear one
    "qwen3_5": [("zoo", "fastv"), ("fastv@2", "pact@3")],
    "qwen3_5_moe": [("random", "dart")],
    # tiles joined into one image; CLS rows pooled through the pixel shuffle
    "internvl": [("cls", "dart"), ("vispruner", "fastv"), ("fastv@1", "dart@2")],
    # image blocks rebuilt at the vision entry and again at layer 1 / 2; local and global layers after each point
    "gemma3": [("divprune", "fastv"), ("zoo", "pact"), ("fastv@1", "dart@2")],
}
assert set(PAIRS_BY_FAMILY) == set(FAMILIES)
CASES = [
    pytest.param(_spec(a), _spec(b), family, id=f"{a}+{b}-{family}")
    for family, pairs in PAIRS_BY_FAMILY.items()
    for a, b in pairs
    if supports(a.partition("@")[0], family) and supports(b.partition("@")[0], family)
]
K1, K2 = 8, 4  # budgets of the first and second point (visual tokens per image)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread for this module: on two shared, busy cores two spinning threads make these tiny models
    10-50x slower (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _first_point_layer(spec) -> int:
    return 0 if spec[1] is None else spec[1]


# -- per pair ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("first,second,family", CASES)
def test_keep_all_schedule_is_bit_identical(first, second, family, model_factory):
    model = model_factory(family)
    inputs = make_inputs(model, family, [(5, 1, 4), (2, 1, 9)])
    assert_keep_all_is_bit_identical(model, inputs, [_cfg(first, ratio=1.0), _cfg(second, ratio=1.0)])


@pytest.mark.parametrize("first,second,family", CASES)
def test_layers_see_text_plus_each_budget_and_stats_per_point(first, second, family, model_factory):
    model = model_factory(family)
    inputs = make_inputs(model, family, [(6, 1, 5)])
    seq = inputs["input_ids"].shape[1]
    with vtprune.patched(model, _cfg(first, keep=K1)), torch.no_grad():  # the first method alone
        model(**inputs)
        alone = vtprune.stats(model)
    seen, st = run_recording_layer_lengths(model, inputs, [_cfg(first, keep=K1), _cfg(second, keep=K2)])
    n = st.visual_tokens_in[0]
    assert n > K1 and alone.visual_tokens_in == [n] and alone.visual_tokens_kept == [K1]
    # sequence lengths: full prompt before the first point, text + K1 between the points, text + K2 after
    p1, p2 = _first_point_layer(first), second[1]
    lengths = [seq if i < p1 else seq - n + K1 if i < p2 else seq - n + K2 for i in range(NUM_LAYERS)]
    assert seen == list(enumerate(lengths))
    # one stage per point, in model order
    assert [(s.method, s.stage, s.layer, s.visual_tokens_kept, s.late_drop) for s in st.stages] == [
        (first[0], _stage(first[0]), first[1], [K1], False),
        (second[0], "llm", second[1], [K2], False),
    ]
    assert all(s.select_ms >= 0 for s in st.stages)
    assert st.stage == "llm" and st.layer == second[1]
    assert st.visual_tokens_kept == [K2]
    kept, first_kept = st.kept_indices[0].tolist(), alone.kept_indices[0].tolist()
    assert kept == sorted(set(kept)) and len(kept) == K2 and set(kept) <= set(first_kept)
    # FLOPs: each layer charged for the sequence it ran on (vision tower as for the first method alone)
    text = model.config.text_config
    vision = alone.prefill_flops_full - flops.decoder_prefill_flops(text, seq)
    assert st.prefill_flops_full == alone.prefill_flops_full
    assert st.prefill_flops == flops.decoder_prefill_flops(text, lengths) + vision
    assert st.prefill_flops < alone.prefill_flops


@pytest.mark.parametrize("first,second,family", CASES)
def test_schedule_batch_equals_rows_alone(first, second, family, model_factory):
    model = model_factory(family)
    specs = [(3, 1, 4), (9, 2, 2), (2, 1, 12)] if family != "llava_next" else [(3, 1, 4), (2, 1, 9)]
    batch, singles = split_rows(model, family, specs)
    with vtprune.patched(model, [_cfg(first, ratio=0.5), _cfg(second, ratio=0.5)]):
        logits = _last_logits(model, batch)
        tokens = _generate(model, batch)
        st = vtprune.stats(model)
        kept, stages = st.visual_tokens_kept, [s.visual_tokens_kept for s in st.stages]
        assert len(stages) == 2 and all(b <= a for a, b in zip(stages[0], stages[1]))
        for i, one in enumerate(singles):
            torch.testing.assert_close(_last_logits(model, one)[0], logits[i], rtol=1e-4, atol=1e-4)
            alone = vtprune.stats(model)
            assert alone.visual_tokens_kept == [kept[i]]
            assert [s.visual_tokens_kept for s in alone.stages] == [[s[i]] for s in stages]
            assert torch.equal(_generate(model, one)[0], tokens[i])
    assert len(set(kept)) > 1  # rows keep different numbers of tokens


@pytest.mark.parametrize("first,second,family", CASES)
def test_schedule_generation_with_cache_equals_without(first, second, family, model_factory):
    model = model_factory(family)
    inputs = make_inputs(model, family, [(5, 1, 4), (2, 1, 9)])
    with vtprune.patched(model, [_cfg(first, keep=K1), _cfg(second, keep=K2)]):
        cached = _generate(model, inputs, use_cache=True)
        assert vtprune.stats(model).visual_tokens_kept == [K2, K2]
        assert torch.equal(_generate(model, inputs, use_cache=False), cached)


# -- independent route: a first method's kept set, then fastv (then, optionally, a late drop) ---------------------
def _embeds_and_positions(model, family, ids, inputs):
    """Unpatched ``inputs_embeds`` and position ids of the conversation ``ids`` [1, T] (prompt = ``inputs``)."""
    inner = model.model
    s = inputs["input_ids"].shape[1]
    embeds = inner.get_input_embeddings()(ids)
    kw = {k: inputs[k] for k in ("image_sizes", "image_grid_thw") if k in inputs}
    feats = torch.cat(list(inner.get_image_features(inputs["pixel_values"], **kw).pooler_output))
    where = (ids[0, :s] == IMAGE_ID).nonzero().squeeze(1)
    embeds[0, where] = feats.to(embeds.dtype)
    if not family.startswith("qwen"):
        return embeds, torch.arange(ids.shape[1])[None]
    tt = inputs["mm_token_type_ids"]
    tt = torch.cat([tt, tt.new_zeros(1, ids.shape[1] - s)], 1)
    pos, _ = inner.get_rope_index(
        ids,
        image_grid_thw=inputs["image_grid_thw"],
        video_grid_thw=None,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=tt,
    )
    return embeds, pos


def _masked_run(model, inputs, family, ids, cols, hidden_from, **kw):
    """The UNPATCHED ``model`` on the prompt columns ``cols`` (bool [S]) of the conversation ``ids`` [1, T] at their
    original positions; decoder layer i masked (additive 4-D mask, causal) off the prompt columns
    ``hidden_from[i]`` (bool [S])."""
    s = inputs["input_ids"].shape[1]
    t = ids.shape[1]
    keep = torch.cat([cols, torch.ones(t - s, dtype=torch.bool)])
    m = int(keep.sum())
    embeds, pos = _embeds_and_positions(model, family, ids, inputs)
    neg = torch.finfo(embeds.dtype).min

    def hook(i):
        hide = torch.cat([hidden_from[i], torch.zeros(t - s, dtype=torch.bool)])[keep]
        allowed = torch.ones(m, m, dtype=torch.bool).tril() & ~hide[None, :]
        mask = torch.zeros(m, m, dtype=embeds.dtype).masked_fill(~allowed, neg)[None, None]
        return lambda mod, args, kwargs: (args, {**kwargs, "attention_mask": mask})

    layers = model.model.language_model.layers
    hooks = [lay.register_forward_pre_hook(hook(i), with_kwargs=True) for i, lay in enumerate(layers)]
    try:
        with torch.no_grad():
            return model(
                inputs_embeds=embeds[:, keep],
                position_ids=pos[..., keep],
                attention_mask=torch.ones(1, m, dtype=torch.long),
                **kw,
            )
    finally:
        for h in hooks:
            h.remove()


def _route(model, eager, family, inputs, first_layer, kept1, fastv_layer, k, late_drop=None, n=4):
    """Independent route on the UNPATCHED model (row 0): the prompt whose visual tokens are ``kept1``
    (image-relative) — fed only those if ``first_layer`` is 0 (vision entry), else every token with layers >=
    ``first_layer`` masked off the others; fastv at ``fastv_layer``: the last prompt token's head-mean attention row
    at ``fastv_layer - 1`` from eager attention weights, top ``k`` of the present visual tokens, the rest masked off
    layers >= ``fastv_layer``; ``late_drop``: every visual token masked off layers >= it. Then ``n`` greedy tokens,
    each step re-run from scratch. Returns (kept indices relative to the original visual tokens, tokens [1, n],
    per-step logits [n, 1, V])."""
    assert not vtprune.is_patched(model) and not vtprune.is_patched(eager)
    ids = inputs["input_ids"]
    s = ids.shape[1]
    is_visual = ids[0] == IMAGE_ID
    visual = is_visual.nonzero().squeeze(1)
    present = torch.zeros(s, dtype=torch.bool)
    present[visual[kept1]] = True
    cols = torch.ones(s, dtype=torch.bool)
    if first_layer == 0:
        cols = ~is_visual | present
    hidden_from = [
        is_visual & ~present if i >= first_layer else torch.zeros(s, dtype=torch.bool) for i in range(NUM_LAYERS)
    ]
    out = _masked_run(eager, inputs, family, ids, cols, hidden_from, output_attentions=True)
    row = out.attentions[fastv_layer - 1][0, :, -1].float().mean(0)  # [columns fed]: last token, head mean
    candidates = (present & cols).nonzero().squeeze(1)  # prompt columns of the present visual tokens
    scores = row[(present[cols]).nonzero().squeeze(1)]
    chosen = candidates[torch.argsort(-scores, stable=True)[:k].sort().values]  # ties to the lower index
    present = torch.zeros(s, dtype=torch.bool)
    present[chosen] = True
    for i in range(fastv_layer, NUM_LAYERS):
        hidden_from[i] = is_visual & ~present
        if late_drop is not None and i >= late_drop:
            hidden_from[i] = is_visual.clone()
    steps = []
    for _ in range(n):
        logits = _masked_run(model, inputs, family, ids, cols, hidden_from).logits[:, -1].float()
        steps.append(logits)
        masked = logits.clone()
        masked[:, SUPPRESSED] = float("-inf")
        ids = torch.cat([ids, masked.argmax(-1)[:, None]], 1)
    kept = torch.isin(visual, chosen).nonzero().squeeze(1)
    return kept, ids[:, s:], torch.stack(steps)


ROUTES = (
    [pytest.param("random", None, 2, family, id=f"random+fastv@2-{family}") for family in ("llava", "qwen2_vl")]
    + [pytest.param("divprune", None, 1, family, id=f"divprune+fastv@1-{family}") for family in ("llava", "qwen2_vl")]
    + [
        pytest.param("divprune", None, 3, "qwen2_5_vl", id="divprune+fastv@3-qwen2_5_vl"),
    ]
    + [
        pytest.param(first, layer, 3, family, id=f"{first}@{layer}+fastv@3-{family}")
        for first, layer, family in (("fastv", 1, "llava"), ("dart", 2, "qwen2_vl"))
    ]
)


@pytest.mark.parametrize("first,first_layer,fastv_layer,family", ROUTES)
def test_then_fastv_equals_independent_route(first, first_layer, fastv_layer, family, model_factory):
    model, eager = model_factory(family), model_factory(family, attn="eager")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), eager.state_dict().values()))
    inputs = make_inputs(model, family, [(6, 1, 5)])
    first_cfg = _cfg((first, first_layer), keep=K1)
    with vtprune.patched(model, first_cfg), torch.no_grad():  # the first method alone: its kept set
        model(**inputs)
        kept1 = vtprune.stats(model).kept_indices[0]
    with vtprune.patched(model, [first_cfg, vtprune.FastVConfig(keep=K2, layer=fastv_layer)]):
        out = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        st = vtprune.stats(model)
    kept, tokens, logits = _route(model, eager, family, inputs, first_layer or 0, kept1, fastv_layer, K2)
    assert [s.visual_tokens_kept for s in st.stages] == [[K1], [K2]]
    assert st.kept_indices[0].tolist() == kept.tolist()
    torch.testing.assert_close(torch.stack(out.logits).float(), logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.sequences[:, -4:], tokens)


# -- ToDRE: vision point + late drop at 7L/8, around an llm method --------------------------------------------------
def test_todre_late_drop_and_fastv_make_three_points(model_factory):
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(6, 1, 5)])
    seq = inputs["input_ids"].shape[1]
    todre = vtprune.ToDREConfig(keep=K1, drop_threshold=1.0)  # late drop at 7 * 4 // 8 = 3, always taken
    seen, st = run_recording_layer_lengths(model, inputs, [todre, vtprune.FastVConfig(keep=K2, layer=2)])
    n = st.visual_tokens_in[0]
    assert [(s.method, s.stage, s.layer, s.visual_tokens_kept, s.late_drop) for s in st.stages] == [
        ("todre", "vision", None, [K1], False),
        ("fastv", "llm", 2, [K2], False),
        ("todre", "llm", 3, [0], True),
    ]
    assert st.late_drop_layer == 3 and st.late_dropped == [True]
    assert st.stage == "llm" and st.layer == 2  # the last selecting point
    assert st.visual_tokens_kept == [K2] and len(st.kept_indices[0]) == K2
    lengths = [seq - n + K1, seq - n + K1, seq - n + K2, seq - n]
    assert seen == list(enumerate(lengths))
    text = model.config.text_config
    vision = st.prefill_flops_full - flops.decoder_prefill_flops(text, seq)
    assert st.prefill_flops == flops.decoder_prefill_flops(text, lengths) + vision  # every point counted


def test_todre_fastv_late_drop_equals_independent_route(model_factory):
    model, eager = model_factory("llava"), model_factory("llava", attn="eager")
    inputs = make_inputs(model, "llava", [(6, 1, 5)])
    with vtprune.patched(model, vtprune.ToDREConfig(keep=K1, late_drop=False)), torch.no_grad():  # stage 1 alone
        model(**inputs)
        kept1 = vtprune.stats(model).kept_indices[0]
    schedule = [vtprune.ToDREConfig(keep=K1, drop_threshold=1.0), vtprune.FastVConfig(keep=K2, layer=2)]
    with vtprune.patched(model, schedule):
        out = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        st = vtprune.stats(model)
    kept, tokens, logits = _route(model, eager, "llava", inputs, 0, kept1, 2, K2, late_drop=3)
    assert st.late_dropped == [True] and st.kept_indices[0].tolist() == kept.tolist()
    torch.testing.assert_close(torch.stack(out.logits).float(), logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.sequences[:, -4:], tokens)


def test_todre_late_drop_colliding_with_an_llm_point_raises(model_factory):
    model = model_factory("llava")
    with pytest.raises(
        ValueError,
        match=r"two methods act at one prune point.*'todre' \(late drop\).*'fastv'|"
        r"two methods act at one prune point.*'fastv'.*'todre' \(late drop\)",
    ):
        vtprune.patch(model, [vtprune.ToDREConfig(keep=K1), vtprune.FastVConfig(keep=K2, layer=3)])
    assert not vtprune.is_patched(model)


# -- the API around schedules ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "schedule,options,exc,match",
    [
        ([], {}, ValueError, "empty schedule"),
        ([vtprune.RandomConfig(keep=4), "fastv"], {}, TypeError, r"element 1 is a str \('fastv'\)"),
        ([{"method": "fastv", "keep": 4}], {}, TypeError, r"element 0 is a dict \(\{'method': 'fastv'"),
        ([vtprune.RandomConfig(keep=8), vtprune.FastVConfig(keep=4)], {"keep": 4}, TypeError, "not as keywords"),
        (
            [vtprune.RandomConfig(keep=8), vtprune.DivPruneConfig(keep=4)],
            {},
            ValueError,
            r"one prune point.*'random' \(vision\).*'divprune' \(vision\)",
        ),
        (
            [vtprune.FastVConfig(keep=8, layer=2), vtprune.DARTConfig(keep=4, layer=2)],
            {},
            ValueError,
            r"one prune point.*'fastv'.*layer 2.*'dart'.*layer 2",
        ),
        (
            [vtprune.RandomConfig(keep=8, positions="compact"), vtprune.FastVConfig(keep=4)],
            {},
            ValueError,
            "compact.*single method",
        ),
        (
            [vtprune.RandomConfig(keep=8), vtprune.FastVConfig(keep=4, positions="compact")],
            {},
            ValueError,
            "compact.*single method",
        ),
    ],
    ids=["empty", "string", "dict", "keywords", "two-vision", "two-llm-same-layer", "compact-first", "compact-second"],
)
def test_bad_schedules_raise_clear_errors(schedule, options, exc, match, model_factory):
    model = model_factory("llava")
    with pytest.raises(exc, match=match):
        vtprune.patch(model, schedule, **options)
    assert not vtprune.is_patched(model)


def _stats_fields(st):
    fields = (
        "visual_tokens_in",
        "visual_tokens_kept",
        "stage",
        "layer",
        "prefill_flops",
        "prefill_flops_full",
        "late_drop_layer",
        "late_dropped",
    )
    out = {name: getattr(st, name) for name in fields}
    out["kept_indices"] = [k.tolist() for k in st.kept_indices]
    out["stages"] = [(s.method, s.stage, s.layer, s.visual_tokens_kept, s.late_drop) for s in st.stages]
    return out


@pytest.mark.parametrize(
    "config",
    [
        vtprune.DivPruneConfig(keep=5),
        vtprune.FastVConfig(keep=5, layer=2),
        vtprune.ToDREConfig(keep=5, drop_threshold=1.0),
    ],
    ids=lambda c: c.method,
)
def test_schedule_of_one_equals_the_config_alone(config, model_factory):
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(5, 1, 4), (2, 1, 9)])
    with vtprune.patched(model, config):
        logits, tokens, ref = _last_logits(model, inputs), _generate(model, inputs), vtprune.stats(model)
    for schedule in ([config], (config,)):
        with vtprune.patched(model, schedule):
            assert torch.equal(_last_logits(model, inputs), logits)
            assert _stats_fields(vtprune.stats(model)) == _stats_fields(ref)
            assert torch.equal(_generate(model, inputs), tokens)


def test_list_order_does_not_matter(model_factory):
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(5, 1, 4), (2, 1, 9)])
    a, b, c = vtprune.DivPruneConfig(keep=10), vtprune.FastVConfig(keep=6, layer=1), vtprune.DARTConfig(keep=3)
    results = []
    for schedule in ([a, b, c], [c, a, b], [b, c, a]):
        with vtprune.patched(model, schedule):
            results.append((_last_logits(model, inputs), _stats_fields(vtprune.stats(model))))
    stages = results[0][1]["stages"]
    assert [s[:4] for s in stages] == [
        ("divprune", "vision", None, [10, 10]),
        ("fastv", "llm", 1, [6, 6]),
        ("dart", "llm", 2, [3, 3]),
    ]
    for logits, fields in results[1:]:
        assert torch.equal(logits, results[0][0]) and fields == results[0][1]


def test_patched_context_unpatches_a_schedule_on_exit(model_factory):
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(5, 1, 4)])
    ref = _last_logits(model, inputs)

    def hook_counts():
        return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]

    before = hook_counts()
    schedule = [vtprune.DivPruneConfig(keep=8), vtprune.FastVConfig(keep=4, layer=2)]
    with vtprune.patched(model, schedule) as m:
        assert m is model and vtprune.is_patched(model)
        assert not torch.equal(_last_logits(model, inputs), ref)
    assert not vtprune.is_patched(model) and hook_counts() == before
    assert "generate" not in vars(model) and "get_image_features" not in vars(model.model)
    assert torch.equal(_last_logits(model, inputs), ref)
    with pytest.raises(RuntimeError, match="boom"), vtprune.patched(model, schedule):
        raise RuntimeError("boom")
    assert not vtprune.is_patched(model) and hook_counts() == before


def test_yaml_list_is_a_schedule_patch_accepts(tmp_path, model_factory):
    path = tmp_path / "schedule.yaml"
    path.write_text("- method: divprune\n  keep: 8\n- method: fastv\n  keep: 4\n  layer: 2\n")
    schedule = vtprune.PruneConfig.from_yaml(path)
    assert schedule == [vtprune.DivPruneConfig(keep=8), vtprune.FastVConfig(keep=4, layer=2)]
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(5, 1, 4)])
    with vtprune.patched(model, [vtprune.DivPruneConfig(keep=8), vtprune.FastVConfig(keep=4, layer=2)]):
        ref = _last_logits(model, inputs)
    with vtprune.patched(model, schedule):
        assert torch.equal(_last_logits(model, inputs), ref)
        assert [(s.method, s.visual_tokens_kept) for s in vtprune.stats(model).stages] == [
            ("divprune", [8]),
            ("fastv", [4]),
        ]
