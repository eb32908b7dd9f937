"""PACT / DBDPC: the clustering against a naive re-implementation of the official procedure, the merging math,
the budget rule, and the ``pact`` method in a model: the hidden states entering layer K at the kept tokens are the
cluster means of the unpatched model's layer-K inputs, clustered on independently recomputed layer K-1 keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import make_inputs
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import vtprune
import vtprune.functional as F
from vtprune import kernels

PROPS = settings(max_examples=20, deadline=None)


def keys_with_groups(seed, n, d, groups):
    """Keys scattered around ``groups`` random directions (so clusters exist at moderate cutoffs)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(groups, d, generator=g, dtype=torch.float64)
    pick = torch.randint(0, groups, (n,), generator=g)
    return centres[pick] + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)


def naive_dbdpc(keys, cutoff, dc=2.0):
    """The official DBDPC.fit_variant procedure, re-derived in numpy (float64), with density ties -> lower index."""
    x = np.asarray(keys, dtype=np.float64)
    u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)
    dist = np.maximum(1.0 - u @ u.T, 0.0)
    np.fill_diagonal(dist, 0.0)
    rho = np.exp(-((dist / dc) ** 2)).sum(1)
    n = len(x)
    order = sorted(range(n), key=lambda i: (-rho[i], i))
    rank = np.empty(n, dtype=int)
    rank[order] = np.arange(n)
    centres, free = [], list(range(n))
    while free:
        delta = {i: min([dist[i, j] for j in free if rank[j] < rank[i]], default=np.inf) for i in free}
        fresh = [i for i in free if delta[i] > cutoff]
        centres += fresh
        free = [i for i in free if i not in fresh and all(dist[i, c] > cutoff for c in fresh)]
        if len(fresh) < 10:
            covered = set()
            for i in sorted(free, key=lambda i: rank[i]):
                if i in covered:
                    continue
                centres.append(i)
                covered |= {j for j in free if rank[j] > rank[i] and dist[i, j] <= cutoff}
            break
    centres = sorted(centres)
    labels = np.array(
        [c if c in centres else min(centres, key=lambda c: (dist[i, c], c)) for i, c in enumerate(range(n))]
    )
    labels[centres] = centres
    return labels, dist


@PROPS
@given(st.integers(0, 2**31), st.integers(1, 70), st.integers(1, 12), st.floats(0.0, 1.2))
def test_dbdpc_matches_naive_official_procedure(seed, n, groups, cutoff):
    keys = keys_with_groups(seed, n, 6, groups)
    labels = F.dbdpc_cluster(keys, cutoff)
    expected, dist = naive_dbdpc(keys.numpy(), cutoff)
    assert labels.tolist() == expected.tolist()
    centres = labels.unique()
    assert torch.equal(labels[centres], centres)
    # every token is within the cutoff of its centre; centres are more than the cutoff apart
    assert all(dist[i, labels[i]] <= cutoff + 1e-12 for i in range(n))
    if len(centres) > 1:
        sub = dist[np.ix_(centres.numpy(), centres.numpy())]
        assert (sub[~np.eye(len(centres), dtype=bool)] > cutoff - 1e-12).all()


def test_dbdpc_hand_case():
    # two tight pairs and a loner on the unit circle (degrees): 0, 5 | 90, 94 | 200
    r = torch.deg2rad(torch.tensor([0.0, 5.0, 90.0, 94.0, 200.0], dtype=torch.float64))
    keys = torch.stack([r.cos(), r.sin()], 1)
    labels = F.dbdpc_cluster(keys, 0.01)
    assert labels[0] == labels[1] and labels[2] == labels[3] and labels[4] == 4
    assert len(labels.unique()) == 3
    assert len(F.dbdpc_cluster(keys, 0.0).unique()) == 5
    assert F.dbdpc_cluster(keys, 2.0).unique().numel() == 1


@PROPS
@given(st.integers(0, 2**31), st.integers(2, 60), st.data())
def test_pact_merge_budget_and_means(seed, n, data):
    k = data.draw(st.integers(1, n))
    keys = keys_with_groups(seed, n, 5, data.draw(st.integers(1, 8)))
    hidden = torch.randn(n, 7, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    out = F.pact_merge(hidden, keys, k=k)
    assert out.kept.numel() == k and out.kept.tolist() == sorted(set(out.kept.tolist()))
    # membership: nearest kept centre (cosine distance of keys, lower index on ties); merged = member means
    u = (keys / keys.norm(dim=1, keepdim=True)).numpy()
    dist = np.maximum(1.0 - u @ u.T, 0.0)
    np.fill_diagonal(dist, 0.0)
    kept = out.kept.numpy()
    owner = np.array([i if i in kept else kept[np.argmin(dist[i, kept])] for i in range(n)])
    for slot, c in enumerate(kept):
        members = np.nonzero(owner == c)[0]
        np.testing.assert_allclose(out.merged[slot].numpy(), hidden.numpy()[members].mean(0), rtol=1e-12)
        assert out.sizes[slot] == len(members)
    # with the budget not binding, the fixed cutoff decides (official PACT)
    free = F.pact_merge(hidden, keys, cutoff=0.3)
    assert torch.equal(free.kept, F.dbdpc_cluster(keys, 0.3).unique())


@PROPS
@given(st.integers(0, 2**31), st.integers(2, 40), st.data())
def test_dbdpc_budget_exact_count_and_nearest_centres(seed, n, data):
    k = data.draw(st.integers(1, n))
    keys = keys_with_groups(seed, n, 5, data.draw(st.integers(1, 8)))
    labels, used = F.dbdpc_cluster(keys, 0.0, k=k, return_cutoff=True)
    centres = labels[labels == torch.arange(n)].numpy()
    assert len(centres) == k and used >= 0.0
    u = (keys / keys.norm(dim=1, keepdim=True)).numpy()
    dist = np.maximum(1.0 - u @ u.T, 0.0)
    np.fill_diagonal(dist, 0.0)
    owner = np.array([i if i in centres else centres[np.argmin(dist[i, centres])] for i in range(n)])
    assert labels.tolist() == owner.tolist()
    # a budget equal to the fixed cutoff's count of centres leaves that clustering as it is
    fixed = F.dbdpc_cluster(keys, 0.3)
    count = int((fixed == torch.arange(n)).sum())
    free, cutoff = F.dbdpc_cluster(keys, 0.3, k=count, return_cutoff=True)
    assert torch.equal(free, fixed) and cutoff == 0.3


def test_pact_merge_retrieval():
    # importance keeps tokens 0..3 (clustered); pruned 4 is near 0's key, pruned 5 is far from every centre
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [1.0, 0.05], [1.0, 1.0]])
    hidden = torch.arange(12.0).view(6, 2)
    importance = torch.tensor([9.0, 8.0, 7.0, 6.0, 1.0, 0.0])
    out = F.pact_merge(hidden, keys, cutoff=0.1, importance=importance, prune_keep=4 / 6)
    assert out.kept.tolist() == [0, 1, 2, 3]
    assert out.sizes.tolist() == [2, 1, 1, 1]  # 5 is 0.29 from its nearest centres: beyond 1.5 x 0.1
    torch.testing.assert_close(out.merged[0], (hidden[0] + hidden[4]) / 2)
    torch.testing.assert_close(out.merged[1:], hidden[1:4])


def test_pact_errors():
    h, k = torch.rand(5, 3), torch.rand(5, 2)
    with pytest.raises(ValueError, match="give a token budget k, a cutoff"):
        F.pact_merge(h, k)
    with pytest.raises(ValueError, match=r"k must be in \[1, 5\]"):
        F.pact_merge(h, k, k=6)
    with pytest.raises(ValueError, match="same N"):
        F.pact_merge(h, torch.rand(4, 2), k=2)
    with pytest.raises(ValueError, match=r"cutoff must be a number in \[0.0, inf\], got -1"):
        F.dbdpc_cluster(k, -1)
    with pytest.raises(ValueError, match=r"k must be in \[1, 5\]"):
        F.dbdpc_cluster(k, k=0)
    with pytest.raises(TypeError, match="return_cutoff must be True or False, got 1"):
        F.dbdpc_cluster(k, return_cutoff=1)
    with pytest.raises(ValueError, match="layer must be an int >= 1"):
        vtprune.registry.get_method("pact").config_cls(keep=4, layer=0)


@pytest.mark.parametrize("force_torch", [False, True])
def test_pact_in_model_hidden_states_are_cluster_means(force_torch, model_factory, monkeypatch):
    if force_torch:
        monkeypatch.setattr(kernels, "native", lambda device: False)
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(5, 1, 4)])
    layers = model.model.language_model.layers
    K = (
        vtprune.registry.get_method("pact")
        .method_cls(vtprune.registry.get_method("pact").config_cls(keep=5))
        .layer(len(layers))
    )
    assert K == len(layers) - 1  # tiny 4-layer model: the official layer 4 is capped to 3

    captured = {}
    hooks = [
        layers[K].register_forward_pre_hook(
            lambda m, a, kw: captured.__setitem__("h", (a[0] if a else kw["hidden_states"]).clone()), with_kwargs=True
        ),
        layers[K - 1].register_forward_pre_hook(
            lambda m, a, kw: captured.__setitem__(
                "prev", ((a[0] if a else kw["hidden_states"]).clone(), kw["position_embeddings"])
            ),
            with_kwargs=True,
        ),
    ]
    try:
        with torch.no_grad():
            model(**inputs)  # unpatched: full layer-K inputs and layer K-1 inputs
    finally:
        for h in hooks:
            h.remove()
    full_h, (prev_h, (cos, sin)) = captured["h"][0], captured["prev"]
    with vtprune.patched(model, "pact", keep=5), torch.no_grad():
        spy = layers[K].register_forward_pre_hook(  # after patch: runs after the engine's pruning hook
            lambda m, a, kw: captured.__setitem__("h", (a[0] if a else kw["hidden_states"]).clone()), with_kwargs=True
        )
        try:
            model(**inputs)
        finally:
            spy.remove()
        st_ = vtprune.stats(model)
    pruned_h = captured["h"][0]

    ids = inputs["input_ids"][0]
    visual = (ids == model.config.image_token_id).nonzero().squeeze(1)
    start, n = int(visual[0]), visual.numel()
    # layer K-1's post-RoPE keys, recomputed from its input
    attn = layers[K - 1].self_attn
    with torch.no_grad():
        k = attn.k_proj(layers[K - 1].input_layernorm(prev_h))
        k = k.view(1, k.shape[1], -1, attn.head_dim).transpose(1, 2)
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        keys = k.transpose(1, 2).reshape(k.shape[2], -1)
    expected = F.pact_merge(full_h[start : start + n], keys[start : start + n], k=5)
    assert st_.visual_tokens_kept == [5] and st_.kept_indices[0].tolist() == expected.kept.tolist()
    # kept tokens sit, in order, where the image was; text before them is untouched
    torch.testing.assert_close(pruned_h[start : start + 5], expected.merged, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pruned_h[:start], full_h[:start], rtol=0, atol=0)
    assert not torch.allclose(expected.merged, full_h[start + expected.kept])  # merging changed something
