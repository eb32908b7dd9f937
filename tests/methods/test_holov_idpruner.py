"""holov and idpruner: the pure functions against from-scratch readings of the official loops (on seeded inputs whose
decisions are well separated), bad inputs, the budget fill rules, and a scorer-driven model run against an
independent route. The model-level contract on every family is in the registry-parametrized tests."""

from __future__ import annotations

import pytest
import tiny  # tests/tiny.py (tests/conftest.py puts tests/ on sys.path)
import torch

import vtprune
import vtprune.functional as F
from vtprune.methods.base import ImageInputs, Selection
from vtprune.methods.holov import HoloV, HoloVConfig
from vtprune.methods.idpruner import IDPruner, IDPrunerConfig


def rand(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def attention(seed, n, boost=None):
    """Distinct positive attention weights (a softmax row), optionally multiplied by ``boost`` ([n]) first."""
    a = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1
    if boost is not None:
        a = a * boost
    return a / a.sum()


# ------------------------------------------------------------------ HoloV, official llava/model/utils.py (1d2e65e)


def holov_official(image_tokens, attention, num_patches, new_image_token_num, alpha=0.09, esp=1e-6):
    """The official ``HoloV`` for one image (B = 1), step by step as written there, tracking each emitted token's
    index as the Qwen port does (``final_positions``, -1 for a zero-padding row). Asserts the decisions are well
    separated: no ``weights * k`` within 1e-6 of an integer and no near-tie among the weights the remainder goes to
    or among the attention values a crop ranks."""
    N, D = image_tokens.shape
    patch_size = N // num_patches
    remainder = N % num_patches
    tokens_p, attn_p, starts = [], [], []
    start_idx = 0
    for p in range(num_patches):
        current = patch_size + (1 if p < remainder else 0)
        end_idx = start_idx + current
        if current > 0:
            tokens_p.append(image_tokens[start_idx:end_idx])
            attn_p.append(attention[start_idx:end_idx])
            starts.append(start_idx)
        start_idx = end_idx
    patch_scores = []
    for p in range(len(tokens_p)):
        patch_tokens, patch_attn = tokens_p[p], attn_p[p]
        current = len(patch_tokens)
        if current <= 1:
            patch_scores.append(patch_attn.mean())
            continue
        f = patch_tokens / (patch_tokens.norm(dim=1, keepdim=True) + esp)
        S = torch.mm(f, f.transpose(0, 1))
        S_masked = S * (1 - torch.eye(current, dtype=S.dtype))
        valid = current - 1
        mean_sim = S_masked.sum(dim=1) / valid
        var_sim = ((S_masked - mean_sim.unsqueeze(1)) ** 2).sum(dim=1) / valid
        scaled = patch_attn * 1e3
        var_scaled = var_sim * (torch.mean(torch.abs(scaled)) / (torch.mean(torch.abs(var_sim)) + esp))
        patch_scores.append((scaled + alpha * var_scaled).mean())
        ranked = patch_attn.sort(descending=True).values
        assert bool((ranked[:-1] - ranked[1:] > 1e-9).all()), "attention near-tie in a crop"
    patch_scores = torch.stack(patch_scores)
    weights = patch_scores / (patch_scores.sum() + esp)
    exact = weights * new_image_token_num
    assert bool(((exact - exact.round()).abs() > 1e-6).all()), "an allocation within 1e-6 of an integer"
    allocated = exact.floor().long()
    remaining = new_image_token_num - allocated.sum()
    if remaining > 0:
        _, indices = torch.topk(weights, k=min(remaining.item(), len(weights)))
        ranked = weights.sort(descending=True).values
        cut = min(remaining.item(), len(weights))
        assert cut == len(weights) or float(ranked[cut - 1] - ranked[cut]) > 1e-9, "remainder weights tie"
        for idx in indices[:remaining]:
            allocated[idx] += 1
    positions = []
    for i, alloc in enumerate(allocated):
        size = len(tokens_p[i])
        index = torch.arange(starts[i], starts[i] + size)
        if alloc <= 0:
            continue
        elif alloc >= size:
            positions.append(index)
        else:
            _, top = torch.topk(attn_p[i], k=min(alloc.item(), size))
            positions.append(index[top])
    positions = torch.cat(positions)
    if positions.numel() < new_image_token_num:
        positions = torch.cat([positions, torch.full((new_image_token_num - positions.numel(),), -1)])
    return positions[:new_image_token_num]


HOLOV_CASES = [
    # (seed, N, k, crops): LLaVA-1.5's official setting; uneven crops; one-token crops; the Qwen port's count
    (0, 576, 64, 16),
    (1, 576, 64, None),
    (2, 50, 12, 7),
    (3, 20, 9, 16),
    (4, 1000, 100, None),
    (5, 576, 144, None),
]


@pytest.mark.parametrize("seed,n,k,crops", HOLOV_CASES)
def test_holov_select_matches_the_official_loop(seed, n, k, crops):
    feats, attn = rand(seed, n, 12), attention(seed, n)
    c = crops if crops is not None else max(1, int(((1024 / 576) * n) / k))
    expected = holov_official(feats, attn, c, k)
    got = F.holov_select(feats, attn, k, crops=crops)
    assert got.dtype == torch.int64
    assert got.tolist() == expected[expected >= 0].tolist()  # emission order; the official pads the rest with zeros


def test_holov_select_crop_allotted_more_than_it_has():
    """One crop holds most of the attention: it is allotted more than its 36 tokens, the official code keeps it whole
    and pads the image with zero vectors; the function returns the real tokens only (fewer than k)."""
    n, k = 576, 64
    boost = torch.ones(n, dtype=torch.float64)
    boost[36:72] = 60.0
    feats, attn = rand(6, n, 12), attention(6, n, boost)
    expected = holov_official(feats, attn, 16, k)
    assert int((expected < 0).sum()) > 0  # the case pads
    got = F.holov_select(feats, attn, k)
    assert got.tolist() == expected[expected >= 0].tolist()
    assert got.numel() < k and set(range(36, 72)) <= set(got.tolist())


def test_holov_select_variance_term_and_float32():
    """The official loop's selection for several alpha. (The official rescaling of the variance term to the
    attention's mean makes it a factor ``1 + alpha mean(v) / (mean(v) + 1e-6)`` of each crop's score, nearly the same
    for every crop, so alpha hardly moves the allocation: docs/methods.md.) float32 input gives the float64
    selection on these separated inputs."""
    feats, attn = rand(7, 576, 12), attention(7, 576)
    for alpha in (0.0, 0.09, 5.0):
        expected = holov_official(feats, attn, 16, 64, alpha=alpha)
        assert F.holov_select(feats, attn, 64, alpha=alpha).tolist() == expected[expected >= 0].tolist()
    assert F.holov_select(feats.float(), attn.float(), 64).tolist() == F.holov_select(feats, attn, 64).tolist()


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: F.holov_select(torch.rand(5, 3), torch.rand(4), 2), ValueError, "agree on N"),
        (lambda: F.holov_select(torch.rand(5, 3), torch.rand(5), 6), ValueError, "k must be in"),
        (lambda: F.holov_select(torch.rand(5, 3), torch.rand(5), 0), ValueError, "k must be in"),
        (lambda: F.holov_select(torch.rand(5, 3), -torch.rand(5), 2), ValueError, "non-negative"),
        (lambda: F.holov_select(torch.rand(5, 3), torch.rand(5), 2, crops=0), ValueError, "crops"),
        (lambda: F.holov_select(torch.rand(5, 3), torch.rand(5), 2, crops=True), TypeError, "crops"),
        (lambda: F.holov_select(torch.rand(5, 3), torch.rand(5), 2, alpha=-1.0), ValueError, "alpha"),
        (lambda: F.holov_select(torch.rand(5), torch.rand(5), 2), ValueError, "features"),
        (lambda: F.holov_select(torch.rand(5, 3), [0.1] * 5, 2), TypeError, "cls_attn"),
        (lambda: F.holov_select(torch.rand(5, 3), torch.tensor([0.1, float("nan"), 0, 0, 0]), 2), ValueError, "NaN"),
    ],
)
def test_holov_select_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------ HoloV method: the budget fill rules


def _image(feats, attn, k):
    """One single-crop image whose tokens are its patches (LLaVA-1.5-like), CLS row = [0, attn]."""
    n = feats.shape[0]
    row = torch.cat([torch.zeros(1, dtype=attn.dtype), attn]).view(1, 1, 1, n + 1)
    return ImageInputs(
        n=n,
        k=k,
        features=feats.float(),
        cls_attention=row,
        pack_crop_scores=lambda s: s.reshape(-1),
        token_patches=lambda c, p: torch.arange(c * p).view(-1, 1),
    )


def test_holov_method_fills_the_budget_by_its_own_ranking_or_with_zeros():
    n, k = 576, 64
    boost = torch.ones(n, dtype=torch.float64)
    boost[36:72] = 60.0
    feats, attn = rand(6, n, 12), attention(6, n, boost)
    official = holov_official(feats, attn, 16, k)
    real = official[official >= 0]
    rest = [i for i in attn.argsort(descending=True).tolist() if i not in set(real.tolist())]
    fill = rest[: k - real.numel()]  # the highest-attention tokens left
    expected = sorted(real.tolist() + fill)

    kept = HoloV(HoloVConfig(keep=k)).select(_image(feats, attn, k))
    assert kept.tolist() == expected

    sel = HoloV(HoloVConfig(keep=k, fill="zeros")).select(_image(feats, attn, k))
    assert isinstance(sel, Selection) and sel.kept.tolist() == expected
    pad = torch.tensor([i in set(fill) for i in expected])
    assert bool((sel.merged[pad] == 0).all()) and bool((sel.weights[pad] == 0).all())
    assert torch.equal(sel.merged[~pad], feats.float()[sel.kept[~pad]])

    method = HoloV(HoloVConfig(keep=k, fill="none"))
    assert method.kept_count == "at_most"
    assert method.select(_image(feats, attn, k)).tolist() == sorted(real.tolist())


def test_holov_config_refuses_bad_options():
    for kwargs, match in [
        ({"fill": "pad"}, "fill must be one of"),
        ({"crops": 0}, "crops must be"),
        ({"alpha": -0.5}, "alpha must be"),
        ({"alpha": "x"}, "alpha must be"),
        ({"importance": "mean"}, "importance must be"),
        ({"layer": -1}, "layer must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            HoloVConfig(keep=8, **kwargs)
    assert HoloVConfig.from_dict(HoloVConfig(keep=8, crops=4).to_dict()) == HoloVConfig(keep=8, crops=4)


# ------------------------------------------------------------- IDPruner, official angelslim/.../idpruner.py (67394ce)


def idpruner_official(features, raw_scores, num_to_keep, mmr_lambda=0.5, parallel_k=1):
    """The official ``idpruner`` loop for one image (lines 117-157), default similarity / importance functions."""
    s_min, s_max = raw_scores.min(), raw_scores.max()
    importance = (raw_scores - s_min) / (s_max - s_min + 1e-6)
    fn = features / (features.norm(dim=-1, keepdim=True) + 1e-8)
    similarity = torch.matmul(fn, fn.t())
    N = features.shape[0]
    selected = []
    candidates = torch.ones(N, dtype=torch.bool)
    max_sim = torch.full((N,), -2.0, dtype=features.dtype)
    while len(selected) < num_to_keep:
        k_step = min(parallel_k, num_to_keep - len(selected))
        if len(selected) == 0:
            mmr = importance.clone()
        else:
            mmr = (mmr_lambda * importance) - ((1 - mmr_lambda) * max_sim)
        mmr[~candidates] = -float("inf")
        live = mmr[candidates].sort(descending=True).values
        assert len(live) <= k_step or float(live[k_step - 1] - live[k_step]) > 1e-9, "MMR near-tie"
        _, best = torch.topk(mmr, k=k_step)
        selected.extend(best.tolist())
        candidates[best] = False
        max_sim = torch.maximum(max_sim, similarity[:, best].max(dim=1).values)
    return sorted(selected)


@pytest.mark.parametrize(
    "seed,n,k,lam,par",
    [
        (0, 576, 64, 0.5, 1),
        (1, 200, 37, 0.5, 4),
        (2, 300, 30, 0.8, 1),
        (3, 100, 50, 0.2, 7),
        (4, 40, 40, 0.5, 3),
        (5, 120, 10, 0.0, 1),  # lambda = 0: only the first step reads the importance
        (6, 120, 10, 0.0, 3),
    ],
)
def test_idpruner_select_matches_the_official_loop(seed, n, k, lam, par):
    feats, scores = rand(seed, n, 16), rand(seed + 100, n) * 3 + 1
    got = F.idpruner_select(feats, scores, k, mmr_lambda=lam, parallel_k=par)
    assert got.dtype == torch.int64 and got.tolist() == idpruner_official(feats, scores, k, lam, par)


def test_idpruner_select_extremes_and_normalisation():
    """lambda=1: the top-k of the scores; scores are min-max normalised inside (an affine map of them selects the same
    tokens); float32 input gives the float64 selection on these inputs."""
    feats, scores = rand(5, 300, 16), rand(6, 300)
    top = sorted(scores.topk(40).indices.tolist())
    assert F.idpruner_select(feats, scores, 40, mmr_lambda=1.0).tolist() == top
    base = F.idpruner_select(feats, scores, 40)
    assert F.idpruner_select(feats, scores * 7.0 - 3.0, 40).tolist() == base.tolist()
    assert F.idpruner_select(feats.float(), scores.float(), 40).tolist() == base.tolist()


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: F.idpruner_select(torch.rand(5, 3), torch.rand(4), 2), ValueError, "agree on N"),
        (lambda: F.idpruner_select(torch.rand(5, 3), torch.rand(5), 6), ValueError, "k must be in"),
        (lambda: F.idpruner_select(torch.rand(5, 3), torch.rand(5), 2, mmr_lambda=1.5), ValueError, "mmr_lambda"),
        (lambda: F.idpruner_select(torch.rand(5, 3), torch.rand(5), 2, mmr_lambda=True), ValueError, "mmr_lambda"),
        (lambda: F.idpruner_select(torch.rand(5, 3), torch.rand(5), 2, parallel_k=0), ValueError, "parallel_k"),
        (lambda: F.idpruner_select(torch.rand(5, 3), torch.rand(5), 2, parallel_k=1.5), TypeError, "parallel_k"),
        (lambda: F.idpruner_select(torch.rand(5, 3), torch.rand(5, 1), 2), ValueError, "scores"),
        (lambda: F.idpruner_select(torch.rand(5, 3), torch.full((5,), float("inf")), 2), ValueError, "infinite"),
    ],
)
def test_idpruner_select_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_idpruner_config_refuses_bad_options():
    for kwargs, error, match in [
        ({"mmr_lambda": 2.0}, ValueError, "mmr_lambda must be"),
        ({"parallel_k": 0}, ValueError, "parallel_k must be"),
        ({"parallel_k": True}, ValueError, "parallel_k must be"),
        ({"scorer": 5}, TypeError, "scorer must be"),
        ({"scorer": torch.nn.Identity(), "importance": "cls"}, ValueError, "unused"),
        ({"importance": "mean"}, ValueError, "importance must be"),
    ]:
        with pytest.raises(error, match=match):
            IDPrunerConfig(keep=8, **kwargs)
    with pytest.raises(ValueError, match="in-memory scorer"):
        IDPrunerConfig(keep=8, scorer=torch.nn.Identity()).to_dict()
    assert IDPrunerConfig.from_dict(IDPrunerConfig(keep=8, parallel_k=2).to_dict()).parallel_k == 2


class Scorer(torch.nn.Module):
    """A stand-in for the trained selector: [B, N, D] -> [B, N] raw scores."""

    def __init__(self, dim):
        super().__init__()
        self.proj = torch.nn.Linear(dim, 1)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, vision_hidden):
        return self.proj(vision_hidden).squeeze(-1)


def test_idpruner_with_a_scorer_keeps_the_official_tokens_of_the_projected_features():
    """Independent route: the unpatched model's own projected features, scored by the same scorer, through the
    official loop, give the kept tokens; the patched model reads no vision attention (signals: features only)."""
    model = tiny.build("llava")
    inputs = tiny.make_inputs(model, "llava", [(3, 1, 4)])
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0].double()
    scorer = Scorer(feats.shape[1]).double()
    with torch.no_grad():
        expected = idpruner_official(feats, scorer(feats[None])[0], 6, 0.5, 2)
    cfg = IDPrunerConfig(keep=6, parallel_k=2, scorer=scorer)
    assert IDPruner(cfg).signals == frozenset({"features"})
    vtprune.patch(model, cfg)
    seen = []
    select = IDPruner.select

    def spy(self, image):
        out = select(self, image)
        seen.append(out.tolist())
        return out

    try:
        IDPruner.select = spy
        with torch.no_grad():
            model(**inputs)
    finally:
        IDPruner.select = select
        vtprune.unpatch(model)
    assert seen == [expected]


def test_idpruner_scorer_output_is_checked():
    feats = rand(0, 10, 4).float()
    image = ImageInputs(n=10, k=3, features=feats)
    with pytest.raises(ValueError, match=r"scorer returned \(10, 1\)"):
        IDPruner(IDPrunerConfig(keep=3, scorer=lambda x: x[0, :, :1])).select(image)
    kept = IDPruner(IDPrunerConfig(keep=3, scorer=lambda x: x[0, :, 0])).select(image)
    assert kept.tolist() == idpruner_official(feats.double(), feats.double()[:, 0], 3)
