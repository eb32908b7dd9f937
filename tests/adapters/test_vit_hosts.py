"""Token reduction inside vision transformers: every ViT method on every host (timm, transformers CLIP / SigLIP,
open_clip), built tiny with random weights.

Independent route: a timm ViT run block by block with eager attention written here (proportional attention, keys
from ``qkv``) and the readings of the official merges from ``test_vit_functional`` — no vtprune hook involved.
"""

import math

import pytest
import torch
from test_vit_functional import _official_pitome, _official_tome
from torch import nn

import vtprune
from vtprune.functional import vit as V

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")

from open_clip.transformer import VisionTransformer as OCViT  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel  # noqa: E402

METHODS = vtprune.list_vit_methods()
HOSTS = ["timm", "timm_registers", "clip", "siglip", "open_clip", "open_clip_seq_first", "open_clip_clip"]
IMG = 32


def _build(host):
    torch.manual_seed(0)
    if host.startswith("timm"):
        kw = dict(reg_tokens=2) if host == "timm_registers" else {}
        return TimmViT(img_size=IMG, patch_size=4, embed_dim=32, depth=4, num_heads=4, num_classes=5, **kw).eval()
    cfg = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=IMG, patch_size=4
    )
    if host == "clip":
        return CLIPVisionModel(CLIPVisionConfig(**cfg)).eval()
    if host == "siglip":
        return SiglipVisionModel(SiglipVisionConfig(**cfg)).eval()
    if host == "open_clip_clip":
        vision = dict(image_size=IMG, patch_size=4, width=32, layers=4, head_width=8, mlp_ratio=2)
        text = dict(context_length=8, vocab_size=50, width=32, heads=4, layers=2)
        return open_clip.model.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()
    model = OCViT(image_size=IMG, patch_size=4, width=32, layers=4, heads=4, mlp_ratio=2, output_dim=16).eval()
    if host == "open_clip_seq_first":
        model.transformer.batch_first = False
        for blk in model.transformer.resblocks:
            blk.attn.batch_first = False
    return model


_MODELS = {}


def _model(host):
    if host not in _MODELS:
        _MODELS[host] = _build(host)
    return _MODELS[host]


def _run(model, x):
    if isinstance(model, (CLIPVisionModel, SiglipVisionModel)):
        out = model(pixel_values=x)
        return torch.cat([out.last_hidden_state.mean(1), out.pooler_output], dim=-1)
    if isinstance(model, open_clip.model.CLIP):
        return model.encode_image(x)
    return model(x)


def _blocks(model):
    if isinstance(model, TimmViT):
        return list(model.blocks)
    if isinstance(model, OCViT):
        return list(model.transformer.resblocks)
    if isinstance(model, open_clip.model.CLIP):
        return list(model.visual.transformer.resblocks)
    return list(getattr(model, "vision_model", model).encoder.layers)


def _prefix(host):
    return {"timm": 1, "timm_registers": 3, "clip": 1, "siglip": 0}.get(host, 1)


def _images(n=3):
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("host", HOSTS)
def test_keep_all_half_batch_unpatch(host):
    model = _model(host)
    x = _images()
    blocks = _blocks(model)
    seq_first = host == "open_clip_seq_first"
    seen = []
    handle = blocks[-1].register_forward_pre_hook(
        lambda m, a, kw: seen.append(a[0].shape[0 if seq_first else 1]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            ref = _run(model, x)
            for method in METHODS:
                with vtprune.patched(model, method, ratio=1.0):
                    assert torch.equal(_run(model, x), ref), (host, method)
                vtprune.patch(model, method, ratio=0.5)
                seen.clear()
                out = _run(model, x)
                patches = 64
                last = seen[-1] - _prefix(host)
                assert last <= patches // 2, (host, method, last)
                assert vtprune.stats(model).patch_tokens_last == last
                assert not torch.allclose(out, ref)
                alone = torch.cat([_run(model, x[i : i + 1]) for i in range(x.shape[0])])
                torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-5)
                vtprune.unpatch(model)
                assert all("forward" not in vars(b) for b in blocks)
                assert torch.equal(_run(model, x), ref), (host, method)
    finally:
        handle.remove()
    for b in blocks:
        assert all(not m._forward_hooks for m in b.modules())


def _eager_timm(model, x, plan, prop_attn):
    """A timm ViT run block by block with eager attention; ``plan(i, metric, probs, h, size) -> (h, size)``."""
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    size = None
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        y = blk.norm1(h)
        b, n, c = y.shape
        qkv = a.qkv(y).reshape(b, n, 3, a.num_heads, c // a.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = a.q_norm(qkv[0]), a.k_norm(qkv[1]), qkv[2]
        logits = (q @ k.transpose(-2, -1)) * a.scale
        if prop_attn and size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        probs = logits.softmax(-1)
        h = h + blk.ls1(a.proj(a.norm((probs @ v).transpose(1, 2).reshape(b, n, c))))
        h, size = plan(i, k.mean(1), probs, h, size)
        h = h + blk.ls2(blk.mlp(blk.norm2(h)))
    return model.forward_head(model.norm(h))


def test_timm_tome_against_official_route():
    model = _model("timm")
    x = _images()
    for r in (5, (8, -1.0)):
        sched = V.tome_schedule(r, 4)

        def plan(i, metric, probs, h, size, sched=sched):
            return _official_tome(metric, h, size, sched[i], True, False) if sched[i] else (h, size)

        with torch.no_grad():
            want = _eager_timm(model, x, plan, prop_attn=True)
            with vtprune.patched(model, "tome", r=r):
                got = model(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_timm_pitome_against_official_route():
    model = _model("timm")
    x = _images()
    margins = [0.75 - 0.75 * i / 4 for i in range(4)]

    def plan(i, metric, probs, h, size):
        return _official_pitome(
            metric,
            h,
            torch.ones_like(h[..., :1]) if size is None else size,
            0.8,
            margins[i],
            True,
            i < math.ceil(4 * 0.5),
        )

    with torch.no_grad():
        want = _eager_timm(model, x, plan, prop_attn=False)
        with vtprune.patched(model, "pitome", layer_ratio=0.8):
            got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_timm_zerotprune_attention_rows_from_eager_route():
    model = _model("timm")
    x = _images()
    sched = V.reduction_schedule(64, 16, 4, cap=lambda n: n - 1)

    def plan(i, metric, probs, h, size):
        r = sched[i]
        if not r:
            return h, size
        r_s = min(r // 2, h.shape[1] - 1 - r)
        dest, t_out = V.zerotprune_match(V.wpr_scores(probs, 30), metric, r - r_s, r_s, protected=1)
        return V.merge_tokens(h, dest, t_out, size)

    with torch.no_grad():
        want = _eager_timm(model, x, plan, prop_attn=False)
        with vtprune.patched(model, "zerotprune", keep=16):
            got = model(x)
            assert vtprune.stats(model).block_tokens == [65, 49, 33, 17]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_input():
    model = _model("timm")
    with pytest.raises(ValueError, match="ratio must be in"):
        vtprune.patch(model, "tome", ratio=0.0)
    with pytest.raises(ValueError, match="ratio must be in"):
        vtprune.patch(model, "pitome", ratio=1.5)
    with pytest.raises(ValueError, match="not one vtprune knows"):
        vtprune.patch(nn.Linear(4, 4), "tome", ratio=0.5)
    with pytest.raises(ValueError, match="Methods that act inside a ViT"):
        vtprune.patch(model, "fastv", keep=8)
    with pytest.raises(ValueError, match="Did you mean 'tome'"):
        vtprune.patch(model, "tomee", ratio=0.5)
    with pytest.raises(TypeError, match="unknown option"):
        vtprune.patch(model, "tome", ratio=0.5, layer=3)
    with pytest.raises(ValueError, match="keep must be >= "):
        vtprune.patch(model, "tome", keep=1)
    with pytest.raises(ValueError, match="not both"):
        vtprune.ToMeConfig(r=4, ratio=0.5)
    assert not vtprune.is_patched(model)


def test_vit_flops_against_flop_counter():
    """``vtprune.flops.vit_flops`` with the per-block token counts of a patched run against torch's FlopCounterMode on
    eager attention; the counter also sees ToMe's similarity products (A x B per merging block) and the head."""
    from torch.utils.flop_counter import FlopCounterMode

    from vtprune.flops import vit_flops

    model = _model("timm")
    x = _images(2)
    head = 2 * 2 * model.head.in_features * model.head.out_features
    for blk in model.blocks:
        blk.attn.fused_attn = False
    try:
        with torch.no_grad():
            with FlopCounterMode(display=False) as counter:
                model(x)
            assert counter.get_total_flops() == vit_flops(model, batch=2) + head
            with vtprune.patched(model, "tome", ratio=0.5):
                with FlopCounterMode(display=False) as counter:
                    model(x)
                st = vtprune.stats(model)
        dh = model.blocks[0].attn.head_dim
        sim = sum(2 * 2 * ((t + 1) // 2) * (t // 2) * dh for t, t_out in st.block_flops_tokens if t_out < t)
        assert counter.get_total_flops() == st.flops + head + sim
        assert st.flops == vit_flops(model, st.block_flops_tokens, batch=2) < st.flops_full
        assert st.block_flops_tokens[-1][0] <= 1 + 32
    finally:
        for blk in model.blocks:
            blk.attn.fused_attn = True


def test_bundled_tiny_vit_loads_and_reduces():
    """The committed tiny ViT: stock timm weights that classify the shapes test scenes well above chance (1/18), and
    keep doing so with half of the patch tokens merged away (the full table: eval/results/vit)."""
    from vtprune import tiny_vit as T  # the loader is package code: no import from eval/

    model, config = T.load()
    x, y = T.test_set(100, size=config["timm_kwargs"]["img_size"])
    full = T.accuracy(model, x, y)
    assert full > 0.5
    with vtprune.patched(model, "tome", ratio=0.5):
        assert T.accuracy(model, x, y) > 0.5
        assert vtprune.stats(model).patch_tokens_last == 24
