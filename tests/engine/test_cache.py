"""A pruned prompt's KV cache behaves like the unpruned prompt's to every consumer.

Each expected value comes from an independent route on the *unpatched* model, never from the patched model under
another name:

* vision-stage methods: the unpatched model fed only the kept tokens (``inputs_embeds``) at their original position
  ids, re-run without a cache for every new token (positions of later tokens numbered as for the unpruned prompt);
* llm-stage methods: the unpatched model fed the whole conversation without a cache, with decoder layers >= K given
  a hand-built 4-D mask that hides the dropped visual tokens (layers < K see everything, as in the pruned model);
* hand-written decode loops: the same model's ``generate`` per-step logits (the engine must not tell them apart).
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import budget, opts, supports
from tiny import (
    FAMILIES,
    IMAGE_ID,
    PAD_ID,
    QWEN3,
    VEND_ID,
    VIDEO_ID,
    VSTART_ID,
    cache_keyword,
    make_inputs,
    split_rows,
)

import vtprune

METHODS = vtprune.list_methods(host="vlm", modality="image")  # videos only: tests/methods/test_video_evs_vidcom2.py
SUPPORTED = [(m, f) for m in METHODS for f in FAMILIES if supports(m, f)]
SUPPRESSED = [IMAGE_ID, VIDEO_ID, VSTART_ID, VEND_ID, PAD_ID]  # tiny.py's generation_config.suppress_tokens
GREEDY = dict(do_sample=False, return_dict_in_generate=True, output_logits=True)


# -- transformers' cache keyword (``cache=`` from 5.24, ``past_key_values=`` before) -------------------------------


def _cache_of(out):
    """The cache a model / generate output carries, read without touching a deprecated alias."""
    for name in ("cache", "past_key_values"):
        value = out.get(name) if hasattr(out, "get") else None
        if value is not None:
            return value
    raise AssertionError(f"no cache in {type(out).__name__}")


def _argmax(logits):
    """Greedy choice under tiny.py's suppress_tokens (what generate does)."""
    logits = logits.clone()
    logits[..., SUPPRESSED] = float("-inf")
    return logits.argmax(-1)


# -- independent references on the unpatched model -----------------------------------------------------------
def _visual_ids(family):
    return (IMAGE_ID, VIDEO_ID) if family.startswith("qwen") else (IMAGE_ID,)


def _prompt_features(model, family, inputs):
    """The visual features of row 0, in prompt order, for ``ids == IMAGE_ID`` and ``ids == VIDEO_ID`` separately."""
    inner = model.model
    out = {}
    if "pixel_values" in inputs:
        kw = {k: inputs[k] for k in ("image_sizes", "image_grid_thw") if k in inputs}
        out[IMAGE_ID] = torch.cat(list(inner.get_image_features(inputs["pixel_values"], **kw).pooler_output))
    if "pixel_values_videos" in inputs:
        feats = inner.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
        out[VIDEO_ID] = torch.cat(list(feats))
    return out


def _embeds(model, inputs, ids, features):
    """``inputs_embeds`` of the conversation ``ids`` [1, T] (prompt = ``inputs``' first S ids) as the unpatched
    model builds them (``features``: :func:`_prompt_features`)."""
    inner = model.model
    embeds = inner.get_input_embeddings()(ids)
    prompt = ids[:, : inputs["input_ids"].shape[1]]
    for token_id, feats in features.items():
        where = (prompt[0] == token_id).nonzero().squeeze(1)
        embeds[0, where] = feats.to(embeds.dtype)
    return embeds


def _full_inputs(inputs, ids):
    """The model inputs of the conversation ``ids`` (prompt + text continuation), batch 1, no cache."""
    s = inputs["input_ids"].shape[1]
    full = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
    if "mm_token_type_ids" in inputs:
        tt = inputs["mm_token_type_ids"]
        full["mm_token_type_ids"] = torch.cat([tt, tt.new_zeros(1, ids.shape[1] - s)], 1)
    return full


def _positions(model, family, inputs, ids):
    """Position ids of the unpruned conversation ``ids``: arange for LLaVA, M-RoPE (get_rope_index) for Qwen."""
    if not family.startswith("qwen"):
        return torch.arange(ids.shape[1])[None]
    full = _full_inputs(inputs, ids)
    pos, _ = model.model.get_rope_index(
        ids,
        mm_token_type_ids=full["mm_token_type_ids"],
        image_grid_thw=full.get("image_grid_thw"),
        video_grid_thw=full.get("video_grid_thw"),
        attention_mask=full["attention_mask"],
    )
    return pos


def _dropped(family, inputs, kept, total):
    """bool [total]: the conversation columns a pruned prompt (row 0, ``kept`` = stats().kept_indices[0]) dropped."""
    ids = inputs["input_ids"][0]
    visual = torch.isin(ids, torch.tensor(_visual_ids(family))).nonzero().squeeze(1)
    drop = torch.zeros(total, dtype=torch.bool)
    drop[visual] = True
    drop[visual[kept]] = False
    return drop


def _gemma3_masks(model, types, keep):
    """Gemma 3's masks by layer type, bool ``[1, 1, T, T]``, for decoder layers after a point that dropped the columns
    ``~keep`` ``[T]`` (``types`` ``[T]``: the conversation's token types), built by hand: every query sees the kept
    keys before it and the kept tokens of its own image (one block: each image's kept tokens, as in a prompt of the
    kept tokens alone); a sliding layer only those within ``sliding_window`` slots of the kept-token sequence."""
    t = keep.numel()
    rank = keep.long().cumsum(0) - 1  # slot of each column in the sequence of kept tokens
    image = (types == 1) & keep
    start = image & ~torch.cat([torch.zeros(1, dtype=torch.bool), image[:-1] | ((types == 1) & ~keep)[:-1]])
    block = torch.where(image, torch.cumsum(start.long(), 0), -1)  # each image's run of kept tokens: one id
    same = (block[:, None] == block[None, :]) & (block[:, None] >= 0)
    base = (torch.ones(t, t, dtype=torch.bool).tril() | same) & keep[None, :]
    window = model.config.text_config.sliding_window
    near = (rank[:, None] - rank[None, :]) < window
    return {"full_attention": base[None, None], "sliding_attention": (base & near)[None, None]}


def _reference(model, family, inputs, kept, ids, n, layer=0, compact=False):
    """Greedy continuation (``n`` tokens) of the conversation ``ids`` [1, T] by the UNPATCHED model, on the pruned
    prompt (``kept``), re-run from scratch (``inputs_embeds``, explicit position ids) for every token. ``layer`` 0:
    the kept tokens only, at their original positions (``compact``: renumbered 0, 1, ...; Gemma 3: with the kept
    tokens' ``token_type_ids``, so each image's kept tokens are one bidirectional block); ``layer`` K > 0: every
    token at its position, with decoder layers >= K masked off the dropped ones. Returns (tokens [1, n], logits
    [n, 1, V])."""
    assert not vtprune.is_patched(model)
    logits_all = []
    state = {}
    types_of = model.config.text_config.layer_types if family == "gemma3" else None

    def hook(mod, args, kwargs, index):
        kwargs["attention_mask"] = state["mask"][types_of[index]] if types_of else state["mask"]
        return args, kwargs

    layers = model.model.language_model.layers
    hooks = (
        [
            lay.register_forward_pre_hook(functools.partial(hook, index=i), with_kwargs=True)
            for i, lay in enumerate(layers)
            if i >= layer
        ]
        if layer
        else []
    )
    try:
        with torch.no_grad():
            features = _prompt_features(model, family, inputs)
            for _ in range(n):
                t = ids.shape[1]
                keep = ~_dropped(family, inputs, kept, t)
                embeds, pos = _embeds(model, inputs, ids, features), _positions(model, family, inputs, ids)
                extra = {}
                if "token_type_ids" in inputs:  # Gemma 3
                    types = torch.cat(
                        [inputs["token_type_ids"][0], torch.zeros(t - inputs["input_ids"].shape[1], dtype=torch.long)]
                    )
                if layer:
                    state["mask"] = (torch.ones(t, t, dtype=torch.bool).tril() & keep[None, :])[None, None]
                    if types_of:
                        state["mask"] = _gemma3_masks(model, types, keep)
                    keep = torch.ones(t, dtype=torch.bool)
                if "token_type_ids" in inputs:
                    extra["token_type_ids"] = types[keep][None]
                pos = pos[..., keep]
                if compact:
                    pos = torch.arange(int(keep.sum()))[None]
                out = model(
                    inputs_embeds=embeds[:, keep],
                    position_ids=pos,
                    attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
                    **extra,
                )
                logits = out.logits[:, -1].float()
                logits_all.append(logits)
                ids = torch.cat([ids, _argmax(logits)[:, None]], 1)
    finally:
        for h in hooks:
            h.remove()
    return ids[:, -n:], torch.stack(logits_all)


# -- 1. a second turn on a pruned cache ----------------------------------------------------------------------------
#: the references here feed the unpatched model ``inputs_embeds`` (and 4-D masks for decoder points): no DeepStack
#: levels (Qwen3-VL) and no 2-D padding masks for linear-attention layers (Qwen3.5 decoder points). Those families'
#: routes are built in tests/adapters/test_qwen3.py
ROUTE_FAMILIES = [f for f in FAMILIES if f not in QWEN3]
TURN_CASES = [(m, f) for f in ROUTE_FAMILIES for m in ("random", "fastv")] + [
    ("dart", "llava"),
    ("divprune", "qwen2_vl"),
    ("random", "qwen3_5"),
    ("divprune", "qwen3_5_moe"),
]


@pytest.mark.parametrize("method,family", TURN_CASES)
def test_second_turn_on_a_pruned_cache_equals_unpatched_model_fed_kept_tokens(method, family, model_factory):
    model = model_factory(family)
    x = make_inputs(model, family, [(5, 1, 4)])
    s = x["input_ids"].shape[1]
    more = torch.tensor([[11, 12, 13]])
    with vtprune.patched(model, method, **opts(method, keep=5)):
        o1 = model.generate(**x, max_new_tokens=6, **GREEDY)
        st = vtprune.stats(model)
        kept, layer = st.kept_indices[0], st.layer or 0
        assert st.visual_tokens_kept == [5] < st.visual_tokens_in
        ids2 = torch.cat([o1.sequences, more], 1)
        cache = _cache_of(o1)
        assert cache.get_seq_length() == s + 5  # the unpruned length: prompt + 5 decoded tokens hold KV
        o2 = model.generate(
            input_ids=ids2,
            attention_mask=torch.ones_like(ids2),
            max_new_tokens=4,
            **{cache_keyword(model): cache},
            **GREEDY,
        )
        assert torch.equal(o2.sequences[:, : ids2.shape[1]], ids2)
        assert _cache_of(o2).get_seq_length() == ids2.shape[1] + 3
    ref1, ref_logits1 = _reference(model, family, x, kept, x["input_ids"], 6, layer=layer)
    assert torch.equal(o1.sequences[:, s:], ref1)
    torch.testing.assert_close(torch.stack(o1.logits).float(), ref_logits1, rtol=1e-4, atol=1e-4)
    ref2, ref_logits2 = _reference(model, family, x, kept, ids2, 4, layer=layer)
    assert torch.equal(o2.sequences[:, ids2.shape[1] :], ref2)
    torch.testing.assert_close(torch.stack(o2.logits).float(), ref_logits2, rtol=1e-4, atol=1e-4)


# -- 2. hand-written decode loops ----------------------------------------------------------------------------------
LOOP_METHODS = ("cls", "random", "fastv", "dart")
LOOP_CASES = [(m, f, b) for m in LOOP_METHODS for f in FAMILIES if supports(m, f) for b in (1, 2)]
LOOP_ROWS = {1: [(5, 1, 4)], 2: [(5, 1, 4), (2, 1, 9)]}  # batch 2: row 0 left-padded (same length otherwise)


def _manual_loop(model, x, n, cache=None):
    """``model(**x)`` then ``n - 1`` single-token steps on the returned cache, no generate; per-step last logits
    [n, B, V], the cache, and the position ids the language model received at the first decode step."""
    kw = cache_keyword(model)
    first = dict(x, use_cache=True)
    if cache is not None:
        first[kw] = cache
    qwen = "mm_token_type_ids" in x
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs.get("position_ids")), with_kwargs=True
    )
    try:
        with torch.no_grad():
            out = model(**first)
            logits = [out.logits[:, -1].float()]
            mask = x["attention_mask"]
            for _ in range(n - 1):
                tok = _argmax(logits[-1])[:, None]
                mask = torch.cat([mask, torch.ones_like(tok)], 1)
                step = dict(input_ids=tok, attention_mask=mask, use_cache=True, **{kw: _cache_of(out)})
                if qwen and mask.shape[0] == 1:
                    # no mask: Qwen numbers the step from the cache's reported length + its rope_deltas (a 2-D mask
                    # without position_ids breaks stock Qwen2-VL decode in transformers 5.24, patched or not)
                    del step["attention_mask"]
                elif qwen:  # left-padded: position ids as generate computes them (mask-numbered text position + delta)
                    text = (mask.cumsum(-1) - 1)[:, -1:]
                    step["position_ids"] = (text + model.model.rope_deltas)[None].expand(3, -1, -1)
                out = model(**step)
                logits.append(out.logits[:, -1].float())
    finally:
        hook.remove()
    return torch.stack(logits), _cache_of(out), seen[1] if len(seen) > 1 else None


@pytest.mark.parametrize("method,family,batch", LOOP_CASES)
def test_hand_written_decode_loop_equals_generate(method, family, batch, model_factory):
    model = model_factory(family)
    x = make_inputs(model, family, LOOP_ROWS[batch])
    with vtprune.patched(model, method, **opts(method, keep=5)), torch.no_grad():
        ref = model.generate(**x, max_new_tokens=5, **GREEDY)
        ref_kept = vtprune.stats(model).kept_indices
        logits, cache, _ = _manual_loop(model, x, 5)
        kept = vtprune.stats(model).kept_indices
        assert cache.get_seq_length() == x["input_ids"].shape[1] + 4  # the unpruned length
    assert all(torch.equal(a, b) for a, b in zip(kept, ref_kept))
    torch.testing.assert_close(logits, torch.stack(ref.logits).float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("method", ["random", "fastv"])
@pytest.mark.parametrize("batch", [1, 2])
def test_qwen_decode_loop_on_an_explicit_dynamic_cache(method, family, batch, model_factory):
    from transformers import DynamicCache

    model = model_factory(family)
    x = make_inputs(model, family, LOOP_ROWS[batch])
    # the unpruned prompt's M-RoPE numbering: the first decode token comes right after each row's largest position
    pos, _ = model.model.get_rope_index(
        x["input_ids"],
        mm_token_type_ids=x["mm_token_type_ids"],
        image_grid_thw=x["image_grid_thw"],
        attention_mask=x["attention_mask"],
    )
    expected_first = pos.masked_fill(~x["attention_mask"].bool()[None], -1).amax(-1) + 1  # [3, B]
    seen = []
    with vtprune.patched(model, method, **opts(method, keep=5)), torch.no_grad():
        hook = model.model.language_model.register_forward_pre_hook(
            lambda mod, args, kwargs: seen.append(kwargs.get("position_ids")), with_kwargs=True
        )
        try:
            ref = model.generate(**x, max_new_tokens=4, **GREEDY)
        finally:
            hook.remove()
        logits, cache, first = _manual_loop(model, x, 4, cache=DynamicCache(config=model.config))
        assert cache.get_seq_length() == x["input_ids"].shape[1] + 3
    assert first[-3:, :, 0].tolist() == seen[1][-3:, :, 0].tolist() == expected_first.tolist()
    torch.testing.assert_close(logits, torch.stack(ref.logits).float(), rtol=1e-4, atol=1e-4)


# -- 3. static caches are refused ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", ["random", "fastv"])
def test_static_cache_is_refused_and_the_model_stays_usable(method, family, model_factory):
    from transformers import StaticCache

    model = model_factory(family)
    x = make_inputs(model, family, [(5, 1, 4)])
    kw = cache_keyword(model)
    with vtprune.patched(model, method, **opts(method, keep=5)), torch.no_grad():
        before = model.generate(**x, max_new_tokens=4, do_sample=False)
        with pytest.raises(ValueError, match="static"):
            model.generate(**x, max_new_tokens=4, do_sample=False, cache_implementation="static")
        with pytest.raises(ValueError, match="StaticCache"):
            model.generate(
                **x, max_new_tokens=4, do_sample=False, **{kw: StaticCache(config=model.config, max_cache_len=64)}
            )
        with pytest.raises(ValueError, match="StaticCache"):
            model(**x, **{kw: StaticCache(config=model.config, max_cache_len=64)}, use_cache=True)
        after = model.generate(**x, max_new_tokens=4, do_sample=False)  # nothing left behind by the failed calls
        logits, _, _ = _manual_loop(model, x, 2)
    assert torch.equal(after, before)
    assert torch.equal(_argmax(logits[0]), before[:, x["input_ids"].shape[1]])


# -- 4. generate(use_cache=False) with llm-stage methods -----------------------------------------------------------
NOCACHE_CASES = [
    ("llava", "fastv", {}),
    ("llava", "fastv", {"debias": True}),
    ("llava", "dart", {}),
    ("llava", "pact", {}),
    ("qwen2_vl", "fastv", {}),
    ("qwen2_vl", "dart", {}),
    ("qwen2_5_vl", "fastv", {}),
]


@pytest.mark.parametrize("family,method,options", NOCACHE_CASES)
@pytest.mark.parametrize("batch", [1, 2])
def test_llm_stage_generation_without_cache_equals_with_cache(family, method, options, batch, model_factory):
    model = model_factory(family)
    x = make_inputs(model, family, LOOP_ROWS[batch])
    with vtprune.patched(model, method, **opts(method, keep=5, **options)), torch.no_grad():
        cached = model.generate(**x, max_new_tokens=6, use_cache=True, **GREEDY)
        kept, layer = vtprune.stats(model).kept_indices, vtprune.stats(model).layer
        uncached = model.generate(**x, max_new_tokens=6, use_cache=False, **GREEDY)
        assert all(torch.equal(a, b) for a, b in zip(vtprune.stats(model).kept_indices, kept))
    assert torch.equal(uncached.sequences, cached.sequences)
    torch.testing.assert_close(torch.stack(uncached.logits), torch.stack(cached.logits), rtol=1e-4, atol=1e-4)
    if batch == 1:  # and both equal the independent route
        ref, _ = _reference(model, family, x, kept[0], x["input_ids"], 6, layer=layer)
        assert torch.equal(cached.sequences[:, -6:], ref)


# -- 5. the selection does not depend on left padding (plain forward, no position ids) ---------------------------
PAD_ROWS = [(5, 1, 4), (2, 1, 4)]  # on LLaVA: pads [0, 3]
# keep=16 is every token of a tiny LLaVA image (a no-op there); llava_next's images have 52 and 88
PAD_CASES = [(m, f, 5) for m, f in SUPPORTED] + [
    ("dart", "llava", 16),
    ("dart", "llava", 15),
    ("dart", "llava_next", 16),
]


@pytest.mark.parametrize("method,family,keep", PAD_CASES)
def test_plain_forward_on_left_padded_batch_equals_rows_alone(method, family, keep, model_factory):
    model = model_factory(family)
    batch, singles = split_rows(model, family, PAD_ROWS)
    if family == "llava":
        assert (1 - batch["attention_mask"]).sum(1).tolist() == [0, 3]
    with vtprune.patched(model, method, **budget(method, keep)), torch.no_grad():
        logits = model(**batch).logits[:, -1].float()
        st = vtprune.stats(model)
        for i, one in enumerate(singles):
            torch.testing.assert_close(model(**one).logits[0, -1].float(), logits[i], rtol=1e-4, atol=1e-4)
            alone = vtprune.stats(model)
            assert alone.visual_tokens_kept == [st.visual_tokens_kept[i]]
            assert torch.equal(alone.kept_indices[0], st.kept_indices[i])


# -- 6. Qwen without mm_token_type_ids -----------------------------------------------------------------------------
def _without_types(model, family):
    x = make_inputs(model, family, [(5, 1, 4)])
    return x, {k: v for k, v in x.items() if k != "mm_token_type_ids"}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_forward_without_mm_token_type_ids_raises(family, model_factory):
    model = model_factory(family)
    x, bare = _without_types(model, family)
    with vtprune.patched(model, "random", keep=5), torch.no_grad():
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            model(**bare)
        model(**x)  # still usable with it
        assert vtprune.stats(model).visual_tokens_kept == [5]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_generate_without_mm_token_type_ids_raises(family, model_factory):
    # generate (5.23, 5.24) encodes the images itself and calls forward with mm_encoder_outputs (no pixel_values) and
    # 1-D position ids when mm_token_type_ids is missing: the pruned prompt must not silently run on those
    model = model_factory(family)
    _, bare = _without_types(model, family)
    with vtprune.patched(model, "random", keep=5), torch.no_grad():
        with pytest.raises(ValueError, match="mm_token_type_ids"):
            model.generate(**bare, max_new_tokens=2, do_sample=False)


# -- 7. Qwen: a video before an image ------------------------------------------------------------------------------
def _video_then_image():
    gen = torch.Generator().manual_seed(1)
    vgrid, igrid = torch.tensor([[2, 4, 6]]), torch.tensor([[1, 8, 8]])
    nv, ni = int(vgrid.prod()) // 4, int(igrid.prod()) // 4  # 12 video tokens, 16 image tokens
    ids = [5, 6, VSTART_ID] + [VIDEO_ID] * nv + [VEND_ID, 7, 8, VSTART_ID] + [IMAGE_ID] * ni + [VEND_ID, 9, 10, 11]
    types = [0, 0, 0] + [2] * nv + [0, 0, 0, 0] + [1] * ni + [0] * 4
    return (
        dict(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            pixel_values=torch.randn(int(igrid.prod()), 3 * 2 * 14 * 14, generator=gen),
            image_grid_thw=igrid,
            pixel_values_videos=torch.randn(int(vgrid.prod()), 3 * 2 * 14 * 14, generator=gen),
            video_grid_thw=vgrid,
            mm_token_type_ids=torch.tensor([types]),
        ),
        nv,
        ni,
    )


@pytest.mark.parametrize(
    "family,method", [("qwen2_vl", "random"), ("qwen2_5_vl", "random"), ("qwen2_vl", "divprune"), ("qwen2_vl", "fastv")]
)
def test_kept_indices_follow_prompt_order_with_a_video_before_an_image(family, method, model_factory):
    model = model_factory(family)
    x, nv, ni = _video_then_image()
    with vtprune.patched(model, method, **opts(method, keep=5)), torch.no_grad():
        out = model.generate(**x, max_new_tokens=4, **GREEDY)
        st = vtprune.stats(model)
    kept = st.kept_indices[0]
    assert st.visual_tokens_in == [nv + ni] and st.visual_tokens_kept == [10]
    assert int((kept < nv).sum()) == 5  # the first 5 indices are the video's (it comes first in the prompt)
    if method == "random":  # the method's own rule, per unit: randperm(n, seed 0)[:k], sorted

        def pick(n):
            return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:5].sort().values

        assert kept.tolist() == torch.cat([pick(nv), nv + pick(ni)]).tolist()
    # the unpatched model fed the prompt's visual tokens (in prompt order) at ``kept`` gives the same continuation
    ref, ref_logits = _reference(model, family, x, kept, x["input_ids"], 4, layer=st.layer or 0)
    assert torch.equal(out.sequences[:, -4:], ref)
    torch.testing.assert_close(torch.stack(out.logits).float(), ref_logits, rtol=1e-4, atol=1e-4)


# -- 8. positions="compact": decode continues from the pruned length ---------------------------------------------
@pytest.mark.parametrize("method", ["random", "divprune"])
def test_compact_decode_loop_and_second_turn_continue_from_pruned_length(method, model_factory):
    model = model_factory("llava")
    x = make_inputs(model, "llava", [(5, 1, 4)])
    s = x["input_ids"].shape[1]
    more = torch.tensor([[11, 12, 13]])
    with vtprune.patched(model, method, **opts(method, keep=5, positions="compact")), torch.no_grad():
        logits, _, _ = _manual_loop(model, x, 5)
        kept = vtprune.stats(model).kept_indices[0]
        o1 = model.generate(**x, max_new_tokens=6, **GREEDY)
        ids2 = torch.cat([o1.sequences, more], 1)
        o2 = model.generate(
            input_ids=ids2,
            attention_mask=torch.ones_like(ids2),
            max_new_tokens=4,
            **{cache_keyword(model): _cache_of(o1)},
            **GREEDY,
        )
    ref1, ref_logits1 = _reference(model, "llava", x, kept, x["input_ids"], 6, compact=True)
    torch.testing.assert_close(logits, ref_logits1[:5], rtol=1e-4, atol=1e-4)  # the hand-written loop
    assert torch.equal(o1.sequences[:, s:], ref1)
    ref2, ref_logits2 = _reference(model, "llava", x, kept, ids2, 4, compact=True)
    assert torch.equal(o2.sequences[:, ids2.shape[1] :], ref2)
    torch.testing.assert_close(torch.stack(o2.logits).float(), ref_logits2, rtol=1e-4, atol=1e-4)
    # and the original numbering would not have matched (the check can fail)
    _, unpruned_numbering = _reference(model, "llava", x, kept, ids2, 4)
    assert not torch.allclose(unpruned_numbering, ref_logits2, rtol=1e-4, atol=1e-4)


def test_compact_decode_loop_on_llm_stage_equals_generate(model_factory):
    model = model_factory("llava")
    x = make_inputs(model, "llava", [(5, 1, 4)])
    with vtprune.patched(model, "fastv", keep=5, positions="compact"), torch.no_grad():
        ref = model.generate(**x, max_new_tokens=5, **GREEDY)
        logits, _, _ = _manual_loop(model, x, 5)
    torch.testing.assert_close(logits, torch.stack(ref.logits).float(), rtol=1e-4, atol=1e-4)


def test_compact_hand_written_loop_on_left_padded_batch_equals_rows_alone(model_factory):
    # compact numbers a left-padded row's kept tokens from 0 at its first real token: a decode step without
    # position_ids must continue that numbering, not (cache length incl. the row's padding) + t - dropped
    model = model_factory("llava")
    batch, singles = split_rows(model, "llava", LOOP_ROWS[2])
    assert (1 - batch["attention_mask"]).sum(1).tolist() == [2, 0]
    with vtprune.patched(model, "random", keep=5, positions="compact"), torch.no_grad():
        logits, _, _ = _manual_loop(model, batch, 4)
        for i, one in enumerate(singles):
            alone, _, _ = _manual_loop(model, one, 4)
            torch.testing.assert_close(logits[:, i], alone[:, 0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["random", "fastv"])
def test_forward_without_cache_uses_no_deprecated_cache_name(method, model_factory, monkeypatch):
    # an output without a cache (use_cache=False) must not make vtprune read the deprecated ``past_key_values``
    # alias (5.24 logs a deprecation through its logger, which the FutureWarning filter does not catch)
    from transformers.utils import generic

    if not hasattr(generic.ModelOutput, "_replace_old_cache_name"):
        pytest.skip("this transformers has no renamed cache field")
    model = model_factory("llava")
    x = make_inputs(model, "llava", [(5, 1, 4)])
    said = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: said.append(msg))  # not lru-cached
    with torch.no_grad():
        model(**x, use_cache=False)
        assert said == []  # the unpatched model does not read the alias
        with vtprune.patched(model, method, **opts(method, keep=5)):
            model(**x, use_cache=False)
    assert not [m for m in said if "deprecated" in m]


# -- 9. copies of a pruned cache, and caches that outlive their patch -------------------------------------------------
@pytest.mark.parametrize("method", ["divprune", "fastv"])
def test_a_deep_copy_of_a_pruned_cache_continues_like_the_original(method, model_factory):
    """The copy reports its own length (not the original's, which grew meanwhile) and continues identically."""
    import copy

    model = model_factory("llava")
    x = make_inputs(model, "llava", [(5, 1, 4), (2, 1, 9)])
    with vtprune.patched(model, method, **opts(method, keep=6)):
        o1 = model.generate(**x, max_new_tokens=3, **GREEDY)
        snap = copy.deepcopy(_cache_of(o1))
        ids2 = torch.cat([o1.sequences, torch.tensor([[11, 12], [13, 14]])], 1)
        turn = dict(
            input_ids=ids2,
            attention_mask=torch.cat([x["attention_mask"], torch.ones(2, 5, dtype=torch.long)], 1),
            max_new_tokens=3,
            **GREEDY,
        )
        length = snap.get_seq_length()
        on_original = model.generate(**turn, **{cache_keyword(model): _cache_of(o1)})
        assert snap.get_seq_length() == length  # the original grew; the copy did not
        on_copy = model.generate(**turn, **{cache_keyword(model): snap})
    assert torch.equal(on_copy.sequences, on_original.sequences)
    torch.testing.assert_close(torch.stack(on_copy.logits), torch.stack(on_original.logits), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["divprune", "fastv"])
def test_a_pruned_cache_after_unpatch_or_another_patch_is_refused(method, model_factory):
    model = model_factory("llava")
    x = make_inputs(model, "llava", [(5, 1, 4)])
    with vtprune.patched(model, method, **opts(method, keep=6)):
        cache = _cache_of(model.generate(**x, max_new_tokens=2, **GREEDY))
    ids = torch.tensor([[11]])
    step = dict(input_ids=ids, attention_mask=torch.ones(1, x["input_ids"].shape[1] + 2, dtype=torch.long))
    with pytest.raises(ValueError, match="patch that pruned a prompt can continue its cache"):
        model(**step, **{cache_keyword(model): cache})  # unpatched model
    with vtprune.patched(model, "random", keep=6):
        with pytest.raises(ValueError, match="patch that pruned a prompt can continue its cache"):
            model(**step, **{cache_keyword(model): cache})  # another patch


def test_a_patched_model_cannot_be_deep_copied(model_factory):
    import copy

    model = model_factory("llava")
    with vtprune.patched(model, "random", keep=4):
        with pytest.raises(TypeError, match="cannot be deep-copied.*unpatch"):
            copy.deepcopy(model)
    copy.deepcopy(model)  # unpatched: fine


def test_sequence_lengths_checks_its_arguments(model_factory):
    model = model_factory("llava")
    x = make_inputs(model, "llava", [(5, 1, 4)])
    with vtprune.patched(model, [vtprune.DivPruneConfig(keep=8), vtprune.FastVConfig(keep=4, layer=2)]):
        with torch.no_grad():
            model(**x)
        st = vtprune.stats(model)
    s = x["input_ids"].shape[1]
    assert st.sequence_lengths(0, s, 4) == [s - 8, s - 8, s - 12, s - 12]
    for args, error, match in [
        ((1, s, 4), ValueError, r"row=1 is out of range; allowed: 0 <= row <= 0"),
        ((-1, s, 4), ValueError, "row=-1"),
        ((0, 3, 4), ValueError, "prompt_len=3"),
        ((0, s, 2), ValueError, "num_layers=2 but a prune point acts at layer 2"),
        ((0, float(s), 4), TypeError, "prompt_len must be an int"),
    ]:
        with pytest.raises(error, match=match):
            st.sequence_lengths(*args)


def test_a_cache_that_is_not_a_transformers_cache_is_named(model_factory):
    model = model_factory("llava")
    x = make_inputs(model, "llava", [(5, 1, 4)])
    with (
        vtprune.patched(model, "random", keep=4),
        pytest.raises(TypeError, match="must be a transformers Cache.*tuple"),
    ):
        model(**x, **{cache_keyword(model): ((torch.zeros(1),),)})
