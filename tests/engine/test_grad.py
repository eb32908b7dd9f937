"""A patched model with gradients on: training forwards (``labels=``), with and without transformers' gradient
checkpointing, against an independent route: the UNPATCHED model whose language model is fed only the kept tokens
(from the layer each prune point acts at), at their original positions, with the labels of those tokens.

The route takes which tokens each point kept (and, for merging methods, the merged vectors) from the engine's own
compactions (spied on): what is checked is everything else — signals computed inside checkpointed layers, labels
compacted to the kept slots, the loss, and every parameter's gradient (vision tower and projector included).
"""

import copy

import pytest
import torch
from conftest import budget, refused
from tiny import FAMILIES, GEMMA3_WINDOW, make_inputs

import vtprune
from vtprune import functional as F
from vtprune.engine import points as P

METHODS = vtprune.list_methods(host="vlm", modality="image")  # videos only: tests/methods/test_video_evs_vidcom2.py
ROUTE_FAMILIES = ("llava", "qwen2_5_vl")  # 1-D RoPE and 3-D M-RoPE (received attention on the Qwen tower)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # backward on tiny models: a second intra-op thread only adds contention on a shared machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _labels(inputs):
    """Labels for every column (visual tokens too, so a misplaced one changes the loss); the first two ignored."""
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(3, 80, inputs["input_ids"].shape, generator=gen)
    labels[:, :2] = -100
    return labels


class _Spy:
    """Records each compaction ``(start layer, cols [B, L], real [B, L])`` and each merge ``(layer, {(row, col):
    vector})`` the engine makes in one forward."""

    def __init__(self, monkeypatch):
        self.stages, self.merges = [], []
        compact, merge = P.compact, P.merge

        def spy_compact(fwd, keep, start):
            layout = compact(fwd, keep, start)
            self.stages.append((start, fwd.cols.clone(), fwd.real.clone()))
            return layout

        def spy_merge(fwd, x, name, layer=0):
            out = merge(fwd, x, name, layer)
            rows = {}
            for unit in fwd.units:
                if unit.merged is not None:
                    for slot in fwd.slots(unit).tolist():
                        rows[(unit.row, int(fwd.cols[unit.row, slot]))] = out[unit.row, slot]
            if rows:
                self.merges.append((layer, rows))
            return out

        monkeypatch.setattr(P, "compact", spy_compact)
        monkeypatch.setattr(P, "merge", spy_merge)


def _route(model, inputs, labels, spy):
    """Loss of the unpatched ``model`` (batch of one row, no padding) whose LM runs on the kept columns: the vision
    entry's before the LM, each decoder point's from its layer on (their rotary tables, the masks of the kept
    sequence), merged vectors in place of their tokens. Returns (loss, final columns)."""
    lm = model.model.language_model
    types = inputs.get("token_type_ids")  # Gemma 3: each image's tokens attend to each other
    stages = {start: cols[0][real[0]] for start, cols, real in spy.stages}
    merges = {layer: rows for layer, rows in spy.merges}
    state = {"cols": torch.arange(inputs["input_ids"].shape[1])}

    def place(x, layer):  # merged vectors onto the current sequence, then the point's compaction
        cur = state["cols"]
        if layer in merges:
            x = x.clone()
            for (row, col), vec in merges[layer].items():
                x[row, int((cur == col).nonzero())] = vec
        if layer in stages:
            idx = torch.isin(cur, stages[layer]).nonzero().squeeze(1)
            x, state["cols"] = x[:, idx], cur[idx]
        return x

    def lm_pre(mod, args, kwargs):
        if 0 not in stages and 0 not in merges:
            return None
        kwargs["inputs_embeds"] = place(kwargs["inputs_embeds"], 0)
        cols = state["cols"]
        mask = kwargs.get("attention_mask")
        assert mask is None or (torch.is_tensor(mask) and mask.ndim == 2)
        kwargs["attention_mask"] = None if mask is None else mask[:, cols]
        pos = kwargs.get("position_ids")
        kwargs["position_ids"] = cols[None] if pos is None else pos[..., cols]
        state["base"] = cols  # the LM's own masks and rotary tables cover these
        return args, kwargs

    def layer_pre(i):
        def hook(mod, args, kwargs):
            if i > 0 and (i in stages or i in merges):
                hidden = args[0] if args else kwargs.pop("hidden_states")
                args = (place(hidden, i),) + tuple(args[1:])
            base = state.get("base", torch.arange(inputs["input_ids"].shape[1]))
            idx = torch.isin(base, state["cols"]).nonzero().squeeze(1)
            if idx.numel() == base.numel():
                return args, kwargs
            cos, sin = kwargs["position_embeddings"]
            kwargs["position_embeddings"] = (cos[..., idx, :], sin[..., idx, :])
            kwargs["position_ids"] = None
            mask = kwargs.get("attention_mask")
            if torch.is_tensor(mask) and mask.ndim == 2:  # linear-attention layers (Qwen3.5)
                kwargs["attention_mask"] = mask[:, idx]
            elif mask is not None:  # the kept sequence's own mask: causal, image blocks, a sliding window in slots
                n = idx.numel()
                q = torch.arange(n)
                allowed = q[None, :] <= q[:, None]
                if types is not None:
                    t = types[0, state["cols"]]
                    allowed = allowed | ((t[:, None] == 1) & (t[None, :] == 1))
                if (getattr(lm.config, "layer_types", None) or [None] * (i + 1))[i] == "sliding_attention":
                    allowed = allowed & (q[:, None] - q[None, :] < GEMMA3_WINDOW)
                allowed = allowed[None, None]
                kwargs["attention_mask"] = (
                    allowed
                    if mask.dtype == torch.bool
                    else torch.zeros(allowed.shape, dtype=mask.dtype).masked_fill(~allowed, torch.finfo(mask.dtype).min)
                )
            return args, kwargs

        return hook

    hooks = [lm.register_forward_pre_hook(lm_pre, with_kwargs=True)]
    hooks += [layer.register_forward_pre_hook(layer_pre(i), with_kwargs=True) for i, layer in enumerate(lm.layers)]
    try:
        logits = model(**inputs, use_cache=False).logits[0].float()
    finally:
        for h in hooks:
            h.remove()
    cols = state["cols"]
    target = labels[0, cols]
    loss = torch.nn.functional.cross_entropy(logits[:-1], target[1:], ignore_index=-100)
    return loss, cols


def _grads(model):
    return {
        name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for name, p in model.named_parameters()
    }


def _check(model, family, method, options, monkeypatch, checkpointing, k=None):
    model = copy.deepcopy(model)
    inputs = make_inputs(model, family, [(6, 1, 5)])
    labels = _labels(inputs)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    spy = _Spy(monkeypatch)
    with vtprune.patched(model, method, **options):
        out = model(**inputs, labels=labels)
        st = vtprune.stats(model)
        out.loss.backward(retain_graph=bool(spy.merges))  # merged vectors: the route reuses this graph
    assert st is not None and st.visual_tokens_kept[0] < st.visual_tokens_in[0]
    got = _grads(model)
    assert any(g.abs().sum() > 0 for g in got.values())
    model.zero_grad()
    if checkpointing:
        model.gradient_checkpointing_disable()
    ref_loss, cols = _route(model, inputs, labels, spy)
    assert out.logits.shape[1] == cols.numel()
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    ref_loss.backward()
    ref = _grads(model)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("checkpointing", [False, True], ids=["grad", "checkpointing"])
@pytest.mark.parametrize("method,family", [(m, f) for m in METHODS for f in ROUTE_FAMILIES if not refused(m, f)])
def test_training_forward_equals_the_kept_token_route(method, family, checkpointing, model_factory, monkeypatch):
    _check(model_factory(family), family, method, budget(method, 3), monkeypatch, checkpointing)


@pytest.mark.parametrize("family", [f for f in FAMILIES if not refused("fastv", f)])
def test_llm_stage_training_forward_equals_the_route_on_every_family(family, model_factory, monkeypatch):
    _check(model_factory(family), family, "fastv", {"keep": 3}, monkeypatch, checkpointing=True)


def test_labels_that_cannot_follow_the_kept_tokens_are_refused(model_factory):
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(6, 1, 5)])
    labels = _labels(inputs)
    with vtprune.patched(model, "random", keep=4), torch.no_grad():
        with pytest.raises(ValueError, match=r"shift_labels .* Pass labels"):
            model(**inputs, labels=labels, shift_labels=labels)
        with pytest.raises(ValueError, match=r"labels has shape \(1, 10\); .* input_ids \(1, 27\)"):
            model(**inputs, labels=labels[:, :10])
        with pytest.raises(ValueError, match="logits_to_keep=0"):
            model(**inputs, labels=labels, logits_to_keep=1)


def test_a_padded_batch_loss_sums_its_rows_losses(model_factory):
    """Labels are compacted per row (padding slots ignored): with ``num_items_in_batch=1`` (a summed loss, as the
    Trainer's gradient accumulation asks) a left-padded batch's loss is the sum of its rows' losses run alone."""
    model = model_factory("qwen2_5_vl")
    batch = make_inputs(model, "qwen2_5_vl", [(6, 1, 5), (2, 1, 9)])
    gen = torch.Generator().manual_seed(4)
    labels = torch.randint(3, 80, batch["input_ids"].shape, generator=gen).masked_fill(
        batch["attention_mask"] == 0, -100
    )
    with vtprune.patched(model, "fastv", keep=3), torch.no_grad():
        total = model(**batch, labels=labels, num_items_in_batch=1).loss
        rows = []
        for i in range(2):
            real = batch["attention_mask"][i].bool()
            grid = batch["image_grid_thw"][i : i + 1]
            start = int(batch["image_grid_thw"][:i].prod(-1).sum())
            one = {key: batch[key][i : i + 1, real] for key in ("input_ids", "attention_mask", "mm_token_type_ids")}
            one.update(image_grid_thw=grid, pixel_values=batch["pixel_values"][start : start + int(grid.prod())])
            rows.append(model(**one, labels=labels[i : i + 1, real], num_items_in_batch=1).loss)
    torch.testing.assert_close(total, sum(rows), rtol=1e-5, atol=1e-5)


def test_unpatch_restores_the_instances_own_loss_function(model_factory):
    model = copy.deepcopy(model_factory("llava"))
    own = model.loss_function
    model.loss_function = lambda logits, labels, *args, **kwargs: own(logits, labels, *args, **kwargs) * 2
    mine = vars(model)["_loss_function"]
    vtprune.patch(model, "fastv", keep=3)
    assert vars(model)["_loss_function"] is not mine
    vtprune.unpatch(model)
    assert vars(model)["_loss_function"] is mine
    vtprune.patch(model, "random", keep=3)
    vtprune.unpatch(model)
    assert vars(model)["_loss_function"] is mine


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("select", ["zoo", "kcenter-cosine", "kcenter-l2"])
def test_index_selections_take_inputs_that_require_grad(select, native, monkeypatch):
    """A model run with gradients hands its methods features that require grad: the selection reads their values."""
    if not native:
        monkeypatch.setenv("VTPRUNE_NO_EXT", "1")
    gen = torch.Generator().manual_seed(0)
    x, s = torch.randn(12, 8, generator=gen), torch.rand(12, generator=gen)
    call = {
        "zoo": lambda x, s: F.zoo_select(s, x, 4),
        "kcenter-cosine": lambda x, s: F.kcenter_select(x, 4),
        "kcenter-l2": lambda x, s: F.kcenter_select(x, 4, metric="l2"),
    }[select]
    got = call(x.clone().requires_grad_(), s.clone().requires_grad_())
    assert not got.requires_grad and torch.equal(got, call(x, s))
