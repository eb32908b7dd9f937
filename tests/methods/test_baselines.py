"""vispruner, cdpruner and pool: the pure functions against from-scratch readings of the official code, and the
methods on the tiny models against the unpatched model (keep-all, batch, cache: test_patch.py / test_cache.py)."""

import pytest
import torch
from tiny import make_inputs

import vtprune
from vtprune import functional as F


# -- from-scratch readings of the official code (written here, independently of vtprune) ---------------------------
def _vispruner_official(attn, feats, T, ratio):
    """Theia-4869/VisPruner llava_arch.encode_images for one image (B = 1), plus the odd-R rule."""
    t_imp = int(T * ratio)
    t_div = T - t_imp
    order = attn.argsort(descending=True)
    imp, res = order[:t_imp].tolist(), order[t_imp:].tolist()
    if t_div == 0:
        return sorted(imp)
    x = feats / feats.norm(dim=-1, keepdim=True)
    while True:
        R = len(res)
        r = min(8, R - t_div)
        if r <= 0:
            break
        a, b = res[::2], res[1::2]
        s = (x[a] @ x[b].T).max(dim=-1).values
        keep_a = s.argsort(descending=True)[r:].tolist()
        res = [a[i] for i in keep_a] + b
    return sorted(imp + res)


def _cdpruner_official(feats, img, txt, T, theta=None):
    """Theia-4869/CDPruner llava_arch.encode_images for one image (B = 1)."""
    x = feats / feats.norm(dim=-1, keepdim=True)
    sim = x @ x.T
    e = img / img.norm(dim=-1, keepdim=True)
    q = txt / txt.norm(dim=-1, keepdim=True)
    rel = (-(e @ q.T)).mean(dim=-1)
    rel = (rel - rel.min() + 1e-6) / (rel.max() - rel.min())
    if theta is not None:
        rel = torch.exp(theta / (2 * (1 - theta)) * rel)
    kernel = rel[:, None] * sim * rel[None, :]
    n = kernel.shape[0]
    cis = torch.zeros(T, n, dtype=kernel.dtype)
    di2s = kernel.diagonal().clone()
    picks = []
    for i in range(T):
        j = int(torch.argmax(di2s))
        picks.append(j)
        eis = (kernel[j] - cis[:i, j] @ cis[:i]) / di2s[j].sqrt()
        cis[i] = eis
        di2s -= eis**2
        di2s[j] = -float("inf")
    return sorted(picks)


def _separated(n, c, seed):
    gen = torch.Generator().manual_seed(seed)
    attn = torch.randperm(n, generator=gen).double() / n + 0.01  # distinct scores
    feats = torch.randn(n, c, generator=gen, dtype=torch.float64)  # high-dim Gaussians: distinct cosines
    return attn, feats


@pytest.mark.parametrize("n,T,ratio", [(64, 16, 0.5), (144, 32, 0.5), (100, 20, 0.25), (64, 10, 0.0), (50, 12, 1.0)])
def test_vispruner_matches_official_reading(n, T, ratio):
    for seed in range(3):
        attn, feats = _separated(n, 256, seed)
        assert F.vispruner_select(attn, feats, T, ratio).tolist() == _vispruner_official(attn, feats, T, ratio)


def test_vispruner_odd_residual_rule_and_official_failure():
    """T=100, r=0.75 on 576 tokens: the official code fails (odd R); here the unpaired A token is scored too."""
    attn, feats = _separated(576, 64, 0)
    with pytest.raises(IndexError, match="shape mismatch"):  # the official indexing, literally (B = 1)
        t_imp = int(100 * 0.75)
        res = attn.argsort(descending=True)[None, t_imp:]
        x = feats / feats.norm(dim=-1, keepdim=True)
        while True:
            R = res.shape[1]
            r = min(8, R - (100 - t_imp))
            if r <= 0:
                break
            a, b = x[res[0, ::2]][None], x[res[0, 1::2]][None]
            d = (a @ b.transpose(-1, -2)).max(-1).values.argsort(-1, descending=True)[:, r:]
            res = torch.cat([res[..., ::2][torch.arange(1)[:, None].expand(-1, R // 2 - r), d], res[..., 1::2]], -1)
    kept = F.vispruner_select(attn, feats, 100, 0.75)
    assert kept.tolist() == _vispruner_official(attn, feats, 100, 0.75) and kept.numel() == 100


def test_vispruner_properties_on_realistic_features():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(8, 32, generator=gen)
    feats = base[torch.randint(0, 8, (196,), generator=gen)] + 0.05 * torch.randn(196, 32, generator=gen)
    attn = torch.softmax(torch.randn(196, generator=gen) * 3, 0)
    kept = F.vispruner_select(attn, feats, 40, 0.5)
    assert kept.numel() == 40 and torch.equal(kept, kept.unique())
    assert set(attn.topk(20).indices.tolist()) <= set(kept.tolist())  # the important half
    assert F.vispruner_select(attn, feats, 40, 1.0).tolist() == sorted(attn.topk(40).indices.tolist())
    assert F.vispruner_select(attn.half(), feats.half(), 40, 0.5).numel() == 40


@pytest.mark.parametrize("n,T,M,theta", [(64, 16, 1, None), (144, 40, 2, None), (80, 20, 1, 0.5)])
def test_cdpruner_matches_official_reading(n, T, M, theta):
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        feats = torch.randn(n, 96, generator=gen, dtype=torch.float64)
        img, txt = (
            torch.randn(n, 24, generator=gen, dtype=torch.float64),
            torch.randn(M, 24, generator=gen, dtype=torch.float64),
        )
        assert F.cdpruner_select(feats, img, txt, T, theta).tolist() == _cdpruner_official(feats, img, txt, T, theta)


def test_cdpruner_sign_and_rank_exhaustion_rules():
    # sign: with identical similarity, the first pick is the token LEAST cosine-similar to the text (official -c)
    feats = torch.eye(4, dtype=torch.float64)
    txt = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    img = torch.tensor([[1.0, 0.0], [0.5, 0.5], [-1.0, 0.2], [0.0, 1.0]], dtype=torch.float64)
    assert F.cdpruner_select(feats, img, txt, 1).tolist() == [2]
    # duplicated tokens: rank 2, k = 3 -> the third pick is the most relevant unpicked token
    dup = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    img = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.1], [-1.0, 0.0]], dtype=torch.float64)
    kept = F.cdpruner_select(dup, img, txt, 3)
    rel = F.cdpruner_relevance(img, txt)
    assert rel.argmax() == 3 and kept.numel() == 3 and 3 in kept.tolist()
    # constant relevance: the kernel is the plain similarity
    assert torch.equal(F.cdpruner_relevance(torch.ones(3, 2), torch.ones(1, 2)), torch.ones(3))


@pytest.mark.parametrize("h,w,k", [(4, 4, 4), (24, 24, 64), (6, 9, 6), (3, 5, 15)])
def test_pool_windows_equal_adaptive_avg_pool_on_exact_grids(h, w, k):
    first, weights = F.pool_windows(h, w, k)
    x = torch.randn(7, h, w, dtype=torch.float64)
    oh = {(4, 4, 4): 2, (24, 24, 64): 8, (6, 9, 6): 2, (3, 5, 15): 3}[(h, w, k)]
    ref = torch.nn.functional.adaptive_avg_pool2d(x[None], (oh, k // oh))[0].reshape(7, -1).T
    torch.testing.assert_close(weights.double() @ x.reshape(7, -1).T, ref)
    grid = torch.arange(h * w).view(h, w)
    rows = [i * h // oh for i in range(oh)]
    cols = [j * w // (k // oh) for j in range(k // oh)]
    assert first.tolist() == [int(grid[r, c]) for r in rows for c in cols]


@pytest.mark.parametrize("h,w,k", [(4, 4, 13), (24, 24, 28), (4, 4, 3), (1, 30, 7), (5, 2, 9)])
def test_pool_windows_exact_budget_cover_and_means(h, w, k):
    first, weights = F.pool_windows(h, w, k)
    assert first.numel() == k and torch.equal(first, first.unique())
    assert bool(((weights > 0).sum(0) > 0).all())  # every token in some window
    torch.testing.assert_close(weights.sum(1), torch.ones(k))
    assert bool((weights[torch.arange(k), first] > 0).all())  # the first token belongs to its window


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: F.vispruner_select(torch.rand(5), torch.rand(4, 3), 2, 0.5), ValueError, "agree on N"),
        (lambda: F.vispruner_select(torch.rand(5), torch.rand(5, 3), 6, 0.5), ValueError, "k must be in"),
        (lambda: F.vispruner_select(torch.rand(5), torch.rand(5, 3), 2, 1.5), ValueError, "important_ratio"),
        (lambda: F.vispruner_select(torch.rand(5, 1), torch.rand(5, 3), 2, 0.5), ValueError, "cls_attn"),
        (lambda: F.vispruner_select([0.1] * 5, torch.rand(5, 3), 2, 0.5), TypeError, "cls_attn"),
        (lambda: F.cdpruner_select(torch.rand(5, 4), torch.rand(4, 3), torch.rand(1, 3), 2), ValueError, "agree on N"),
        (lambda: F.cdpruner_select(torch.rand(5, 4), torch.rand(5, 3), torch.rand(1, 2), 2), ValueError, "text_embeds"),
        (
            lambda: F.cdpruner_select(torch.rand(5, 4), torch.rand(5, 3), torch.rand(1, 3), 0),
            ValueError,
            "k must be in",
        ),
        (lambda: F.cdpruner_select(torch.rand(5, 4), torch.rand(5, 3), torch.rand(1, 3), 2, 1.0), ValueError, "theta"),
        (
            lambda: F.cdpruner_select(torch.full((5, 4), float("nan")), torch.rand(5, 3), torch.rand(1, 3), 2),
            ValueError,
            "NaN",
        ),
        (lambda: F.pool_windows(4, 4, 17), ValueError, "k must be in"),
        (lambda: F.pool_windows(0, 4, 1), ValueError, "height"),
    ],
)
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# -- model level ---------------------------------------------------------------------------------------------------
def _kept_after_patch(model, inputs, method, **options):
    with vtprune.patched(model, method, **options), torch.no_grad():
        model(**inputs)
        return vtprune.stats(model)


def test_vispruner_keeps_the_official_tokens_from_the_eager_tower(model_factory):
    model = model_factory("llava", "eager")
    inputs = make_inputs(model, "llava", [(4, 1, 6)])
    tower = model.model.vision_tower
    with torch.no_grad():
        out = tower(inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
        attn = out.attentions[-2][0, :, 0, 1:].mean(0)  # layer L-2 (hidden_states[-2]'s layer), CLS key dropped
        feats = out.hidden_states[-2][0, 1:]
    for keep, ratio in [(6, 0.5), (9, 0.5), (5, 0.25)]:
        st = _kept_after_patch(model, inputs, "vispruner", keep=keep, important_ratio=ratio)
        assert st.kept_indices[0].tolist() == _vispruner_official(attn, feats, keep, ratio)


def test_vispruner_anyres_selects_patches_within_the_image_budget(model_factory):
    model = model_factory("llava_next")
    inputs = make_inputs(model, "llava_next", [(4, 1, 6)])
    st = _kept_after_patch(model, inputs, "vispruner", keep=12)
    assert st.visual_tokens_kept == [12]
    ids = inputs["input_ids"][0]
    visual = (ids == model.config.image_token_id).nonzero().squeeze(1)
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
    newline = (feats == model.model.image_newline.to(feats.dtype)).all(-1)
    assert newline.any() and not newline[st.kept_indices[0]].any()  # row separators carry no patch: not kept
    assert visual.numel() == feats.shape[0]


def _text_after_image(model, inputs):
    ids = inputs["input_ids"][0]
    last = int((ids == model.config.image_token_id).nonzero().max())
    with torch.no_grad():
        return model.model.get_input_embeddings()(ids[last + 1 :])


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])
def test_cdpruner_llm_variant_matches_reading_on_unpatched_features(family, model_factory):
    model = model_factory(family)
    inputs = make_inputs(model, family, [(4, 1, 6)])
    kw = {k: inputs[k] for k in ("image_sizes", "image_grid_thw") if k in inputs}
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], **kw).pooler_output[0].double()
    text = _text_after_image(model, inputs).double()
    st = _kept_after_patch(model, inputs, "cdpruner", keep=6, text="llm")
    assert st.kept_indices[0].tolist() == _cdpruner_official(feats, feats, text, 6)


class _WordTokenizer:
    """A stand-in CLIP tokenizer: BOS, one id per word (hashed into the vocabulary), EOS."""

    def __call__(self, text):
        return {"input_ids": [1] + [3 + sum(map(ord, w)) % 90 for w in text.split()] + [2]}


def _tiny_clip(width):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=96,
            max_position_embeddings=77,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=width,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
        ),
        projection_dim=16,
    )
    return CLIPModel(cfg).eval()


@pytest.mark.parametrize("words", [5, 100])  # one 77-token segment, two
def test_cdpruner_clip_variant_matches_reading(words, model_factory):
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(4, 1, 6)])
    clip, tok = _tiny_clip(model.config.vision_config.hidden_size), _WordTokenizer()
    question = " ".join(f"w{i}" for i in range(words))
    with torch.no_grad():
        h = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][0, 1:]
        img = clip.visual_projection(clip.vision_model.post_layernorm(h)).double()
        ids = tok(question)["input_ids"]
        ids = torch.tensor(ids + [0] * (-len(ids) % 77)).view(-1, 77)
        txt = clip.text_projection(clip.text_model(input_ids=ids).pooler_output).double()
        feats = model.model.get_image_features(inputs["pixel_values"]).pooler_output[0].double()
    assert txt.shape[0] == (1 if words == 5 else 2)
    text = {"text": "clip"} if words == 100 else {}  # words=5: text left at its default, "clip" on a CLIP tower
    with vtprune.patched(model, "cdpruner", keep=6, clip_model=clip, clip_tokenizer=tok, **text), torch.no_grad():
        assert model._vtprune_session.methods[0].text == "clip"
        vtprune.set_instructions(model, [question])
        model(**inputs)
        kept = vtprune.stats(model).kept_indices[0]
        with pytest.raises(ValueError, match="set_instructions"):  # forgotten after one prompt
            model(**inputs)
        vtprune.set_instructions(model, [question, question])
        with pytest.raises(ValueError, match="one instruction per prompt row"):
            model(**inputs)
    assert kept.tolist() == _cdpruner_official(feats, img, txt, 6)


def test_cdpruner_clip_variant_with_beams_and_return_sequences(model_factory):
    """generate repeats each prompt row for beams / return sequences: every copy reads its row's instruction (one
    per prompt row, as documented), so each copy keeps the tokens of its row alone."""
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(4, 1, 6), (3, 1, 5)])
    clip, tok = _tiny_clip(model.config.vision_config.hidden_size), _WordTokenizer()
    questions = ["what color is the circle", "is there a square"]
    with vtprune.patched(model, "cdpruner", keep=5, clip_model=clip, clip_tokenizer=tok), torch.no_grad():
        vtprune.set_instructions(model, questions)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        rows = [k.tolist() for k in vtprune.stats(model).kept_indices]
        for kw, copies in ((dict(num_beams=2), 2), (dict(do_sample=True, num_return_sequences=3), 3)):
            vtprune.set_instructions(model, questions)
            model.generate(**inputs, max_new_tokens=2, **kw)
            assert [k.tolist() for k in vtprune.stats(model).kept_indices] == [r for r in rows for _ in range(copies)]
    assert rows[0] != rows[1]


def test_cdpruner_clip_variant_accepts_open_clip(model_factory):
    """An open_clip CLIP (and its SimpleTokenizer, untruncated: two 77-token segments) gives the kept set of the
    reading with ``ln_post(h) @ proj`` and ``encode_text`` per segment."""
    open_clip = pytest.importorskip("open_clip")
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(4, 1, 6)])
    torch.manual_seed(0)
    width = model.config.vision_config.hidden_size
    clip = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=56, patch_size=14, width=width, layers=1, head_width=16, mlp_ratio=2),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    ).eval()
    tok = open_clip.get_tokenizer("ViT-B-32")  # the bundled BPE vocabulary: offline
    question = " ".join(["red square left of the blue circle"] * 12)  # > 77 tokens
    ids = [tok.sot_token_id, *tok.encode(question), tok.eot_token_id]
    assert 77 < len(ids) <= 154
    with torch.no_grad():
        h = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][0, 1:]
        img = (clip.visual.ln_post(h) @ clip.visual.proj).double()
        txt = clip.encode_text(torch.tensor(ids + [0] * (154 - len(ids))).view(2, 77)).double()
        feats = model.model.get_image_features(inputs["pixel_values"]).pooler_output[0].double()
    with vtprune.patched(model, "cdpruner", keep=6, text="clip", clip_model=clip, clip_tokenizer=tok), torch.no_grad():
        vtprune.set_instructions(model, [question])
        model(**inputs)
        kept = vtprune.stats(model).kept_indices[0]
    assert kept.tolist() == _cdpruner_official(feats, img, txt, 6)
    with pytest.raises(ValueError, match="needs clip_tokenizer"):
        with vtprune.patched(model, "cdpruner", keep=6, text="clip", clip_model=clip), torch.no_grad():
            vtprune.set_instructions(model, [question])
            model(**inputs)
    clip.visual.proj = None
    with pytest.raises(TypeError, match="no output projection"):
        vtprune.CDPrunerConfig(keep=4, text="clip", clip_model=clip)


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_next_video"])
def test_cdpruner_default_on_a_clip_tower_is_the_papers_and_needs_clip_model(family, model_factory):
    """text=None resolves to "clip" on CLIP towers: without clip_model, patch refuses and names both ways out; the
    config is left as given; text="llm" is taken as asked."""
    model = model_factory(family)
    with pytest.raises(ValueError, match=r"defaults to the paper's text='clip'.*pass clip_model=.*or text='llm'"):
        vtprune.patch(model, "cdpruner", keep=4)
    assert not vtprune.is_patched(model)
    cfg = vtprune.CDPrunerConfig(keep=4, text="llm")
    with vtprune.patched(model, cfg):
        assert model._vtprune_session.methods[0].text == "llm"
    assert vtprune.CDPrunerConfig(keep=4, clip_model="some/clip").text == "clip"


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl", "internvl", "gemma3"])
def test_cdpruner_default_elsewhere_is_the_llm_variant(family, model_factory):
    """Towers that are not CLIP (SigLIP, Qwen's, InternViT) have no paper method: text=None resolves to "llm" (the
    kept set equals an explicit text="llm" run), the config keeps None, and text="clip" is refused at patch."""
    model = model_factory(family)
    inputs = make_inputs(model, family, [(4, 1, 6)])
    cfg = vtprune.CDPrunerConfig(keep=5)
    with vtprune.patched(model, cfg), torch.no_grad():
        assert model._vtprune_session.methods[0].text == "llm"
        model(**inputs)
        default = vtprune.stats(model).kept_indices[0]
    assert cfg.text is None
    assert _kept_after_patch(model, inputs, "cdpruner", keep=5, text="llm").kept_indices[0].tolist() == default.tolist()
    with pytest.raises(ValueError, match=r"text='clip' .* not CLIP; use text='llm'"):
        vtprune.patch(
            model, "cdpruner", keep=4, text="clip", clip_model=_tiny_clip(32), clip_tokenizer=_WordTokenizer()
        )
    assert not vtprune.is_patched(model)


def test_cdpruner_clip_variant_bad_inputs(model_factory):
    with pytest.raises(ValueError, match="needs clip_model"):
        vtprune.patch(model_factory("llava"), "cdpruner", keep=4, text="clip")
    with pytest.raises(ValueError, match="text must be None or one of"):
        vtprune.CDPrunerConfig(keep=4, text="bert")
    with pytest.raises(ValueError, match="would be unused"):
        vtprune.CDPrunerConfig(keep=4, text="llm", clip_model="x")
    with pytest.raises(ValueError, match="clip_tokenizer= is the tokenizer of clip_model="):  # not dropped unused
        vtprune.CDPrunerConfig(keep=4, clip_tokenizer="some/clip")
    with pytest.raises(TypeError, match="CLIPModel .* or an open_clip CLIP"):
        vtprune.CDPrunerConfig(keep=4, text="clip", clip_model=torch.nn.Linear(2, 2))
    cfg = vtprune.CDPrunerConfig(keep=4, text="clip", clip_model="some/clip")
    assert vtprune.PruneConfig.from_json(cfg.to_json()) == cfg
    model = model_factory("llava")  # a CLIP tower, but clip_model's vision width is not the tower's
    inputs = make_inputs(model, "llava", [(4, 1, 6)])
    with vtprune.patched(
        model,
        "cdpruner",
        keep=4,
        clip_model=_tiny_clip(model.config.vision_config.hidden_size + 8),
        clip_tokenizer=_WordTokenizer(),
    ):
        vtprune.set_instructions(model, ["what is this"])
        with pytest.raises(ValueError, match="width"):
            model(**inputs)
    model = model_factory("qwen2_vl")
    with pytest.raises(TypeError, match="list of str"):
        with vtprune.patched(model, "cdpruner", keep=4):
            vtprune.set_instructions(model, "what")
    with pytest.raises(ValueError, match="not patched"):
        vtprune.set_instructions(model, ["what"])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_pool_feeds_window_means_at_first_positions(family, model_factory):
    model = model_factory(family)
    inputs = make_inputs(model, family, [(4, 1, 6)])
    kw = {k: inputs[k] for k in ("image_sizes", "image_grid_thw") if k in inputs}
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], **kw).pooler_output[0]
    h, w = 4, 4  # tiny.py: LLaVA 56 px / 14 -> 4 x 4; Qwen grid 8 x 8 patches / 2 -> 4 x 4
    grid = feats.T.reshape(1, -1, h, w)
    pooled = torch.nn.functional.adaptive_avg_pool2d(grid, (2, 2))[0].reshape(feats.shape[1], -1).T
    kept = [0, 2, 8, 10]
    with vtprune.patched(model, "pool", keep=4), torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        st = vtprune.stats(model)
    assert st.kept_indices[0].tolist() == kept
    ids = inputs["input_ids"][0]
    visual = (ids == model.config.image_token_id).nonzero().squeeze(1)
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(inputs["input_ids"])
        embeds[0, visual[kept]] = pooled.to(embeds.dtype)
        keep = torch.ones(ids.numel(), dtype=torch.bool)
        keep[visual] = False
        keep[visual[kept]] = True
        if family.startswith("qwen"):
            pos, _ = model.model.get_rope_index(
                inputs["input_ids"],
                image_grid_thw=inputs["image_grid_thw"],
                video_grid_thw=None,
                attention_mask=inputs["attention_mask"],
                mm_token_type_ids=inputs["mm_token_type_ids"],
            )
            pos = pos[..., keep]
        else:
            pos = torch.arange(ids.numel())[keep][None]
        ref = model(
            inputs_embeds=embeds[:, keep],
            position_ids=pos,
            attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
        ).logits[:, -1]
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_pool_anyres_pools_every_crop(model_factory):
    model = model_factory("llava_next")
    inputs = make_inputs(model, "llava_next", [(4, 1, 6)])
    st = _kept_after_patch(model, inputs, "pool", keep=10)
    assert st.visual_tokens_kept == [10]
    assert st.kept_indices[0][0] == 0  # the base crop's first window starts at its first patch
    st = _kept_after_patch(model, inputs, "pool", keep=2)  # below the number of grids: the largest grids
    assert st.visual_tokens_kept == [2]


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_pool_refuses_a_cls_visual_token_at_patch(family):
    # vision_feature_select_strategy="full" feeds the CLS token to the LLM: a crop's tokens are no square grid, which
    # pool used to find only at the first forward ("a crop of 17 patches is not a square grid")
    import tiny
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    cfg_cls, model_cls = {
        "llava": (LlavaConfig, LlavaForConditionalGeneration),
        "llava_next": (LlavaNextConfig, LlavaNextForConditionalGeneration),
    }[family]
    extra = {"image_grid_pinpoints": [[56, 112]]} if family == "llava_next" else {}
    cfg = cfg_cls(
        vision_config=CLIPVisionConfig(**tiny._CLIP),
        text_config=LlamaConfig(**tiny._TEXT),
        image_token_id=tiny.IMAGE_ID,
        vision_feature_select_strategy="full",
        **extra,
    )
    model = model_cls(cfg)
    with pytest.raises(ValueError, match=r"pool.*CLS.*vision_feature_select_strategy='full'.*'default'"):
        vtprune.patch(model, "pool", keep=4)
    assert not vtprune.is_patched(model)
    vtprune.patch(model, "divprune", keep=4)  # a method that does not read the grid runs there
    vtprune.unpatch(model)


def test_pool_pools_each_temporal_step_of_a_video(model_factory):
    from test_cache import _video_then_image

    model = model_factory("qwen2_vl")
    x, nv, _ = _video_then_image()  # video: 2 steps of 2 x 3 tokens; image: 4 x 4
    with vtprune.patched(model, "pool", keep=4), torch.no_grad():
        model(**x)
        st = vtprune.stats(model)
    # each step's share is 2 windows of its 2 x 3 grid (columns 0-1 and 1-2); the image's 4 are its 2 x 2 pooling
    assert st.kept_indices[0].tolist() == [0, 1, 6, 7] + [nv + i for i in (0, 2, 8, 10)]


def test_cdpruner_llm_variant_without_text_after_the_image_reads_the_text_before(model_factory):
    model = model_factory("llava")
    inputs = make_inputs(model, "llava", [(5, 1, 0)])
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"]).pooler_output[0].double()
        text = model.model.get_input_embeddings()(ids[ids != model.config.image_token_id]).double()
    st = _kept_after_patch(model, inputs, "cdpruner", keep=5, text="llm")
    assert st.kept_indices[0].tolist() == _cdpruner_official(feats, feats, text, 5)
