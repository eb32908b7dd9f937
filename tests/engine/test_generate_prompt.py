"""Which tokens are the prompt, for every way ``generate`` calls a patched model.

A decoder point scores the visual tokens with the last *prompt* token's attention (and text raters / pivots from the
prompt's text). ``generate``'s forwards do not always run exactly the prompt: assisted decoding (prompt lookup, an
assistant model) runs the prompt's first forward on the prompt plus candidate tokens, ``prefill_chunk_size`` splits it
into chunks, a cache passed in already holds part of the conversation. Expected values: the patched model's plain
greedy ``generate`` (the tests in test_cache.py / test_qwen3.py establish that it equals the unpatched model fed only
the kept tokens), or, for a cache passed in, that independent route itself (:func:`test_cache._reference`).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import budget
from test_cache import _reference
from tiny import cache_keyword, make_inputs
from transformers import DynamicCache

import vtprune

#: a tail that repeats (11, 12, ...): prompt lookup proposes the tokens after its earlier occurrence as candidates
TAIL = [11, 12, 13, 14, 15, 16, 11, 12]
GREEDY = {"max_new_tokens": 5, "do_sample": False}
#: methods that read the prompt's text: decoder points (the last prompt token, text raters / pivots) and a vision-entry
#: method reading the text after the image (cdpruner, text="llm")
TEXT_METHODS = ["fastv", "dart", "pdrop", "sparsevlm", "pact", "todre", "cdpruner"]


def _inputs(model, family):
    x = make_inputs(model, family, [(5, 1, len(TAIL))])
    x["input_ids"][0, -len(TAIL) :] = torch.tensor(TAIL)
    return x


def _options(method):
    return budget(method, 8) | ({"text": "llm"} if method == "cdpruner" else {})


def _run(model, x, **extra):
    """Generated tokens and what the prompt's prefill selected (kept indices, FLOPs)."""
    with torch.no_grad():
        out = model.generate(**x, **GREEDY, **extra)[:, x["input_ids"].shape[1] :]
    st = vtprune.stats(model)
    return out, [k.tolist() for k in st.kept_indices], st.prefill_flops


@pytest.fixture(scope="module")
def assistant():
    from tiny import build

    return build("llava", seed=1)


@pytest.mark.parametrize("method", TEXT_METHODS)
def test_prompt_lookup_selects_on_the_prompt(method, model_factory):
    model = model_factory("llava")
    x = _inputs(model, "llava")
    with vtprune.patched(model, method, **_options(method)):
        tokens, kept, flops = _run(model, x)
        got = _run(model, x, prompt_lookup_num_tokens=3)
    assert torch.equal(got[0], tokens)
    assert got[1:] == (kept, flops)  # the prompt's selection, and its prefill counted without the candidates


@pytest.mark.parametrize("method", ["fastv", "sparsevlm"])
def test_assistant_model_decoding_selects_on_the_prompt(method, model_factory, assistant):
    model = model_factory("llava")
    x = _inputs(model, "llava")
    with vtprune.patched(model, method, **_options(method)):
        tokens, kept, flops = _run(model, x)
        got = _run(model, x, assistant_model=assistant)
    assert torch.equal(got[0], tokens)
    assert got[1:] == (kept, flops)


def test_prompt_lookup_on_qwen3_vl_selects_on_the_prompt(model_factory):
    model = model_factory("qwen3_vl")
    x = _inputs(model, "qwen3_vl")
    with vtprune.patched(model, "fastv", keep=8):
        tokens, kept, flops = _run(model, x)
        got = _run(model, x, prompt_lookup_num_tokens=3)
    assert torch.equal(got[0], tokens)
    assert got[1:] == (kept, flops)


@pytest.mark.parametrize("family,method", [("qwen3_vl", "fastv"), ("llava", "dart"), ("llava", "random")])
def test_chunked_prefill_with_images_is_refused(family, method, model_factory):
    # a decoder point would select with the first chunk's last token (Qwen3-VL FastV: other tokens than greedy), and
    # transformers hands each chunk its visual features as one tensor (a chunk of two images would be one "image")
    model = model_factory(family)
    x = _inputs(model, family)
    s = x["input_ids"].shape[1]
    with torch.no_grad():
        unpatched = model.generate(**x, **GREEDY, prefill_chunk_size=s - 3)
    with vtprune.patched(model, method, **_options(method)):
        tokens = _run(model, x)[0]
        for chunk in (s - 3, s):
            with pytest.raises(ValueError, match=rf"prefill_chunk_size={chunk}\) with images.*prefill_chunk_size=None"):
                _run(model, x, prefill_chunk_size=chunk)
        assert torch.equal(_run(model, x)[0], tokens)  # still usable
        text = {k: x[k][:, :5] for k in ("input_ids", "attention_mask")}  # no images: chunks run unpruned
        with torch.no_grad():
            assert model.generate(**text, **GREEDY, prefill_chunk_size=2).shape[1] == 5 + GREEDY["max_new_tokens"]
    with torch.no_grad():  # and unpatched, chunks run as before
        assert torch.equal(model.generate(**x, **GREEDY, prefill_chunk_size=s - 3), unpatched)


@pytest.mark.parametrize("method", ["fastv", "random"])
def test_an_empty_cache_passed_in_is_a_prompt_like_none(method, model_factory):
    model = model_factory("llava")
    x = _inputs(model, "llava")
    key = cache_keyword(model)
    with vtprune.patched(model, method, keep=8):
        tokens, kept, flops = _run(model, x)
        assert _run(model, x, **{key: DynamicCache()})[1:] == (kept, flops)
        got = _run(model, x, **{key: DynamicCache()}, prompt_lookup_num_tokens=3)
    assert torch.equal(got[0], tokens)
    assert got[1:] == (kept, flops)


@pytest.mark.parametrize("method", ["fastv", "dart", "random"])
def test_a_prefix_cache_continues_the_prefix_selection(method, model_factory):
    # the prompt is the forward that holds the images (here a prefix the caller ran): the rest of the prompt, given to
    # generate with the cache, continues it like a second turn (no re-selection). (Prompt lookup on a cache passed in
    # gives other tokens than greedy on the unpatched model too, transformers 5.24: not checked here.)
    model = model_factory("llava")
    x = _inputs(model, "llava")
    s, n = x["input_ids"].shape[1], GREEDY["max_new_tokens"]
    prefix = {k: v[:, : s - 4] if k in ("input_ids", "attention_mask") else v for k, v in x.items()}
    rest = {k: v for k, v in x.items() if k != "pixel_values"}
    key = cache_keyword(model)
    with vtprune.patched(model, method, keep=8), torch.no_grad():
        cache = DynamicCache()
        model(**prefix, **{key: cache})
        st = vtprune.stats(model)
        kept, layer = st.kept_indices[0], st.layer or 0
        plain = model.generate(**rest, **{key: copy.deepcopy(cache)}, **GREEDY)[:, s:]
        with pytest.raises(ValueError, match="new images on a KV cache"):  # its images already in the cache
            model.generate(**x, **{key: copy.deepcopy(cache)}, **GREEDY)
    ref, _ = _reference(model, "llava", prefix, kept, x["input_ids"], n, layer=layer)
    assert torch.equal(plain, ref)


def test_a_loop_that_expands_the_batch_after_the_prompt_is_refused(model_factory):
    # contrastive search (transformers 5.24 / 5.25: the hub repository transformers-community/contrastive-search)
    # repeats the cache's rows after the prompt's forward: the pruned prompt's layout has the prompt's rows
    model = model_factory("llava")
    x = _inputs(model, "llava")
    key = cache_keyword(model)
    with vtprune.patched(model, "fastv", keep=8), torch.no_grad():
        out = model(**x, **{key: DynamicCache()}, use_cache=True)
        cache = getattr(out, key)
        cache.batch_repeat_interleave(2)
        step = {
            "input_ids": out.logits[:, -1].topk(2).indices.reshape(2, 1),
            "attention_mask": torch.ones(2, x["input_ids"].shape[1] + 1, dtype=torch.long),
        }
        with pytest.raises(ValueError, match="2 rows, but its prompt was pruned with 1"):
            model(**step, **{key: cache})


def test_beam_search_on_a_passed_pruned_cache_names_the_cause(model_factory):
    # a second turn with num_beams > 1 on the first turn's cache: generate hands the prompt's rows expanded to the
    # beams while the cache (and its pruned layout) has the prompt's rows (the unpatched model fails there too, on
    # a shape error); the error says so and how to do it
    model = model_factory("llava")
    x = make_inputs(model, "llava", [(5, 1, 4)])
    with vtprune.patched(model, "random", keep=4), torch.no_grad():
        o1 = model.generate(**x, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        ids = torch.cat([o1.sequences, torch.full((1, 2), 11)], 1)
        cache = o1.get("cache") or o1.get("past_key_values")
        with pytest.raises(ValueError, match=r"2 rows, but its prompt was pruned with 1.*num_beams"):
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=2,
                num_beams=2,
                **{cache_keyword(model): cache},
            )
