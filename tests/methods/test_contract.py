"""The method contract the engine enforces: what ``select`` returns (count, range, order, type, a Selection's shapes),
the signals a method reads (only those it declared), and schedules whose later step could do nothing.

Toy methods are registered for one test each (``toy``) and removed after it.
"""

import itertools
import re
import warnings
from dataclasses import dataclass

import pytest
import torch
from tiny import make_inputs

import vtprune
from vtprune import registry
from vtprune.config import PruneConfig
from vtprune.methods.base import Method, Selection

_NAMES = itertools.count()


@pytest.fixture
def toy():
    """``toy(select, stage="vision", signals=(), **attrs)`` registers a method under a fresh name and returns it."""
    names = []

    def make(select, stage="vision", signals=(), **attrs):
        name = f"_toy_contract_{next(_NAMES)}"
        config = dataclass(type(f"{name}Config", (PruneConfig,), {"__annotations__": {"layer": int}, "layer": 2}))
        cls = type(
            name,
            (Method,),
            dict(
                stage=stage,
                signals=frozenset(signals),
                select=select,
                layer=lambda self, n: self.config.layer if stage == "llm" else None,
                **attrs,
            ),
        )
        registry.register_method(name, config)(cls)
        names.append(name)
        return name

    yield make
    for name in names:
        registry._METHODS.pop(name)


def _run(model, inputs, method, **options):
    with vtprune.patched(model, method, **options), torch.no_grad():
        model(**inputs)
        return vtprune.stats(model)


@pytest.fixture
def llava(model_factory):
    model = model_factory("llava")
    return model, make_inputs(model, "llava", [(5, 1, 4), (3, 1, 6)])


# -- what select returns -------------------------------------------------------------------------------------------
def test_one_index_too_many_is_refused_naming_the_method_and_point(toy, llava):
    model, inputs = llava
    name = toy(lambda self, image: torch.arange(image.k + 1))
    with pytest.raises(
        RuntimeError,
        match=rf"method '{name}' at '{name}' \(vision\) at the vision entry returned 7 "
        r"indices for an image of 16 visual tokens with a budget of 6; expected "
        "exactly 6",
    ):
        _run(model, inputs, name, keep=6)


def test_too_few_at_a_decoder_point_is_refused(toy, llava):
    model, inputs = llava
    name = toy(lambda self, image: torch.arange(image.k - 2), stage="llm", signals={"hidden"})
    with pytest.raises(
        RuntimeError,
        match=rf"'{name}' \(llm\) at decoder layer 2 returned 8 indices .* expected "
        "exactly 10",
    ):
        _run(model, inputs, name, keep=10)


def test_a_python_list_is_taken_as_indices(toy, llava):
    model, inputs = llava
    as_list = toy(lambda self, image: list(range(0, 2 * image.k, 2)))
    stats = _run(model, inputs, as_list, keep=6)
    assert stats.visual_tokens_kept == [6, 6]
    assert [k.tolist() for k in stats.kept_indices] == [list(range(0, 12, 2))] * 2


@pytest.mark.parametrize(
    "value,match",
    [
        ("lambda image: {'kept': 1}", r"returned dict; expected a 1-D int64 tensor"),
        ("lambda image: torch.arange(image.k).float()", r"dtype torch.float32; expected a 1-D int64"),
        ("lambda image: torch.arange(image.n) < image.k", r"dtype torch.bool \(a keep mask\? return mask.nonzero"),
        ("lambda image: torch.arange(image.k)[None]", r"shape \(1, 6\)"),
        ("lambda image: ['0', '1']", r"returned list; expected"),
    ],
)
def test_wrong_types_are_refused_with_a_type_error(toy, llava, value, match):
    model, inputs = llava
    fn = eval(value)
    name = toy(lambda self, image: fn(image))
    with pytest.raises(TypeError, match=rf"method '{name}' at .*{match}"):
        _run(model, inputs, name, keep=6)


@pytest.mark.parametrize(
    "value,match",
    [
        ("torch.arange(image.k) + image.n - image.k + 1", r"indices from \d+ to 16; expected indices in \[0, 16\)"),
        ("torch.arange(image.k) - 1", r"indices from -1 to 4; expected indices in \[0, 16\)"),
        ("torch.arange(image.k).flip(0)", r"returned indices out of order; expected ascending unique"),
        ("torch.cat([torch.arange(image.k - 1), torch.tensor([image.k - 2])])", r"returned duplicates"),
    ],
)
def test_out_of_range_unsorted_and_duplicate_indices_are_refused(toy, llava, value, match):
    model, inputs = llava
    name = toy(lambda self, image: eval(value, {"torch": torch, "image": image}))
    with pytest.raises(RuntimeError, match=rf"method '{name}' at .*{match}"):
        _run(model, inputs, name, keep=6)


@pytest.mark.parametrize(
    "field,match",
    [
        ("merged", r"Selection.merged of shape \(5, \d+\); expected \[6, D\]"),
        ("weights", r"Selection.weights of shape \(6, 15\); expected \[6, 16\]"),
    ],
)
def test_selection_shapes_are_checked(toy, llava, field, match):
    model, inputs = llava

    def select(self, image):
        kept = torch.arange(image.k)
        merged = image.features[kept]
        weights = torch.nn.functional.one_hot(kept, image.n).float()
        if field == "merged":
            merged = merged[1:]
        else:
            weights = weights[:, 1:]
        return Selection(kept, merged, weights=weights)

    name = toy(select, signals={"features"}, merges=True)
    with pytest.raises(RuntimeError, match=rf"method '{name}' at .*{match}"):
        _run(model, inputs, name, keep=6)


def test_a_declared_count_rule_allows_a_different_count(toy, llava):
    model, inputs = llava
    fewer = toy(lambda self, image: torch.arange(image.k - 3), kept_count="at_most")
    assert _run(model, inputs, fewer, keep=6).visual_tokens_kept == [3, 3]
    more = toy(lambda self, image: torch.arange(image.k + 4), kept_count="own")
    assert _run(model, inputs, more, keep=6).visual_tokens_kept == [10, 10]
    over = toy(lambda self, image: torch.arange(image.k + 1), kept_count="at_most")
    with pytest.raises(RuntimeError, match=r"returned 7 indices .* expected 1 to 6 \(kept_count='at_most'"):
        _run(model, inputs, over, keep=6)


def test_an_unknown_count_rule_is_refused_at_patch(toy, llava):
    model, _ = llava
    name = toy(lambda self, image: torch.arange(image.k), kept_count="exact")
    with pytest.raises(
        ValueError,
        match=rf"method '{name}' declares kept_count='exact'; allowed: "
        r"\('budget', 'at_most', 'own'\)",
    ):
        vtprune.patch(model, name, keep=6)
    assert not vtprune.is_patched(model)


# -- signals a method did not declare ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "stage,declared,read,signal",
    [
        ("llm", {"hidden"}, "image.keys", "keys"),
        ("llm", {"hidden"}, "image.text_attention", "layer_attention' or 'text_attention"),
        ("llm", {"keys"}, "image.hidden", "hidden"),
        ("llm", {"hidden"}, "image.attention_rows", "queries"),
        ("vision", {"features"}, "image.cls_attention", "cls_attention"),
        ("vision", set(), "image.features", "features"),
        ("vision", {"features"}, "image.projector", "projector_inputs"),
        ("vision", {"features"}, "image.extra.get('instruction')", "instruction"),
        ("vision", {"features"}, "image.extra['prompt_embeds']", "prompt_embeds"),
    ],
)
def test_reading_an_undeclared_signal_raises_naming_it(toy, llava, stage, declared, read, signal):
    model, inputs = llava

    def select(self, image):
        eval(read, {"image": image})
        return torch.arange(image.k)

    name = toy(select, stage=stage, signals=declared)
    field = read.split(".", 1)[1].replace(".get(", "[").replace(")", "]")
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            f"method '{name}' read ImageInputs.{field}, which signal "
            f"'{signal}' fills, but it declares signals={sorted(declared)}"
        ),
    ):
        _run(model, inputs, name, keep=6)


def test_declared_signals_and_model_facts_read_as_before(toy, llava):
    model, inputs = llava
    seen = {}

    def select(self, image):  # declared signals are there; facts that are no signal (n, k, extra grid) too
        seen.update(features=tuple(image.features.shape), extra=image.extra.get("grid"), real=image.real_mask)
        return torch.arange(image.k)

    name = toy(select, signals={"features"})
    _run(model, inputs, name, keep=6)
    assert seen["features"][0] == 16 and seen["extra"] is None and seen["real"] is None


# -- schedules whose later step would do nothing ------------------------------------------------------------------
@pytest.mark.parametrize(
    "first,later,match",
    [
        (
            dict(keep=8),
            dict(keep=8),
            r"'fastv' \(llm\) at decoder layer 2 with keep=8 acts after 'divprune' \(vision\) at "
            r"the vision entry with keep=8, so it keeps every token .* \(keep < 8 or ratio < 1\)",
        ),
        (dict(keep=8), dict(keep=12), r"'fastv' .* with keep=12 acts after 'divprune' .* with keep=8"),
        (dict(ratio=0.5), dict(ratio=1.0), r"'fastv' .* with ratio=1.0 acts after 'divprune' .* with ratio=0.5"),
    ],
)
def test_a_later_step_that_keeps_everything_is_refused_at_patch(llava, first, later, match):
    model, _ = llava
    schedule = [vtprune.DivPruneConfig(**first), vtprune.FastVConfig(layer=2, **later)]
    with pytest.raises(ValueError, match=rf"schedule: {match}"):
        vtprune.patch(model, schedule)
    assert not vtprune.is_patched(model)
    # the order the configs come in does not matter: the vision entry acts first
    with pytest.raises(ValueError, match=rf"schedule: {match}"):
        vtprune.patch(model, schedule[::-1])


def test_a_later_step_with_a_smaller_budget_is_accepted(llava):
    model, inputs = llava
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = _run(model, inputs, [vtprune.DivPruneConfig(keep=8), vtprune.FastVConfig(keep=5, layer=2)])
        assert [s.visual_tokens_kept for s in stats.stages] == [[8, 8], [5, 5]]
        assert [s.visual_tokens_nominal for s in stats.stages] == [[8, 8], [5, 5]]
        # keeping everything at every step is a schedule that prunes nothing, as a single method's ratio=1 is
        stats = _run(model, inputs, [vtprune.DivPruneConfig(ratio=1.0), vtprune.FastVConfig(ratio=1.0, layer=2)])
        assert stats.visual_tokens_kept == stats.visual_tokens_in == [16, 16]


def test_a_later_step_known_to_do_nothing_only_per_image_warns(llava):
    model, inputs = llava  # ratio 0.25 of 16 tokens leaves 4; keep=6 then keeps them all
    schedule = [vtprune.DivPruneConfig(ratio=0.25), vtprune.FastVConfig(keep=6, layer=2)]
    with pytest.warns(
        UserWarning,
        match=r"schedule: 'fastv' \(llm\) at decoder layer 2 keeps every token that "
        r"reaches it .* does nothing there",
    ):
        stats = _run(model, inputs, schedule)
    assert [s.visual_tokens_kept for s in stats.stages] == [[4, 4], [4, 4]]


# -- nominal budgets beside the real count -------------------------------------------------------------------------
def test_stats_show_the_nominal_budget_beside_the_real_count(llava):
    model, inputs = llava
    stats = _run(model, inputs, "fastv", keep=6)
    assert stats.visual_tokens_nominal == stats.visual_tokens_kept == [6, 6]
    # sparsevlm's budget picks a row of its per-budget counts: keep=6 of 16 ends at 3 tokens + recycled carriers
    stats = _run(model, inputs, "sparsevlm", keep=6)
    assert stats.visual_tokens_nominal == [6, 6]
    assert stats.visual_tokens_kept == [k.numel() for k in stats.kept_indices]
    assert all(k < 6 for k in stats.visual_tokens_kept)
    assert all(s.visual_tokens_nominal == [6, 6] for s in stats.stages)
    # pdrop's keep= is the average over decoder layers: fewer are left after its last stage
    stats = _run(model, inputs, "pdrop", keep=8)
    assert stats.visual_tokens_nominal == [8, 8] and all(k < 8 for k in stats.visual_tokens_kept)
    # a budget above the image's tokens names every token
    stats = _run(model, inputs, [vtprune.DivPruneConfig(keep=40), vtprune.FastVConfig(keep=6, layer=2)])
    assert [s.visual_tokens_nominal for s in stats.stages] == [[16, 16], [6, 6]]
