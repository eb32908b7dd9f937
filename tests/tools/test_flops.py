"""vtprune.flops: analytic FLOPs vs torch's FlopCounterMode on tiny random models, per-layer
lengths, KV-cache bytes and error messages.

The counted models run with ``attn_implementation="eager"``: their attention products are plain
matmuls (``aten.bmm``), which every torch version's FlopCounterMode counts. Whether a CPU
``scaled_dot_product_attention`` call is counted depends on the torch version (torch 2.14 does not
count it), so an SDPA model would make these cross-checks version-dependent. Eager and SDPA compute
the same products, so the analytic formula is the same for both."""

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from vtprune import flops

REL_TOL = 0.05
_ATTN_OPS = ("bmm",)  # eager attention: Q K^T and A V are batched matmuls


def _eager(model_cls, cfg):
    """A model of ``cfg`` whose attention (text and vision) runs eagerly, so FlopCounterMode sees it as matmuls
    on every torch version (see the module docstring)."""
    model = model_cls._from_config(cfg, attn_implementation="eager").eval()
    subs = [model.config] + [
        getattr(model.config, n) for n in ("text_config", "vision_config") if getattr(model.config, n, None) is not None
    ]
    assert all(c._attn_implementation == "eager" for c in subs), [c._attn_implementation for c in subs]
    return model


def _frozen(model):
    """``model`` with ``requires_grad`` off. FlopCounterMode's module tracker hooks the gradient of every module input
    that requires grad; from transformers 5.25 (``kernels`` is a dependency) kernel-hub functions such as Qwen3.5's
    ``causal_conv1d_fn`` are ``nn.Module`` instances, and the view of a parameter they receive under ``no_grad``
    makes the tracker raise "Expected gradient function to be set". The counted FLOPs of the Qwen3 decoders do not
    change. Only those are frozen: with frozen parameters torch 2.14 dispatches more of the CLIP / SigLIP towers'
    matmuls as ``bmm``, which the tower tests read as attention."""
    return model.requires_grad_(False)


def _count(fn):
    """(total FLOPs, attention FLOPs) that FlopCounterMode sees while running fn()."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    # eager models only: an SDPA call would be counted or not depending on the torch version
    assert not any("scaled_dot_product" in op for op in by_op), by_op
    attn = sum(n for op, n in by_op.items() if any(a in op for a in _ATTN_OPS))
    return counter.get_total_flops(), attn


def _rel(mine, ref):
    return abs(mine - ref) / ref


def _llama_cfg(**kw):
    base = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    base.update(kw)
    return LlamaConfig(**base)


def _qwen_text(**kw):
    base = dict(
        vocab_size=256,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]},
    )
    base.update(kw)
    return base


def _llava_cfg(cls=LlavaConfig, **kw):
    return cls(
        vision_config=CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        text_config=_llama_cfg(hidden_size=96, num_hidden_layers=2),
        **kw,
    )


def _qwen2vl_cfg():
    return Qwen2VLConfig(
        vision_config=dict(
            depth=2,
            embed_dim=64,
            hidden_size=96,
            num_heads=4,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        text_config=_qwen_text(),
    )


def _qwen25vl_cfg(fullatt=(1, 3)):
    return Qwen2_5_VLConfig(
        vision_config=dict(
            depth=4,
            hidden_size=64,
            intermediate_size=128,
            out_hidden_size=96,
            num_heads=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=list(fullatt),
        ),
        text_config=_qwen_text(),
    )


# ------------------------------------------------------------------ decoder vs FlopCounterMode
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_decoder_prefill_matches_flop_counter(family):
    torch.manual_seed(0)
    if family == "llama":  # GQA 4 heads / 2 kv heads
        cfg, cls = _llama_cfg(num_hidden_layers=3), LlamaForCausalLM
    else:  # Qwen2: q/k/v biases, 6 heads / 2 kv heads
        cfg = Qwen2Config(
            vocab_size=256,
            hidden_size=96,
            intermediate_size=200,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
        )
        cls = Qwen2ForCausalLM
    model = _eager(cls, cfg)
    batch, seq = 2, 37
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    ref, ref_attn = _count(lambda: model(input_ids=ids, logits_to_keep=1, use_cache=False))
    mine = flops.decoder_prefill_flops(cfg, seq, batch=batch, lm_head_tokens=1)
    assert _rel(mine, ref) < REL_TOL, (mine, ref)
    d, h, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    assert ref_attn == batch * cfg.num_hidden_layers * 4 * seq * seq * h * dh  # causal counted as full S x S

    # all logits (lm_head on every token)
    ref_all, _ = _count(lambda: model(input_ids=ids, use_cache=False))
    mine_all = flops.decoder_prefill_flops(cfg, seq, batch=batch, lm_head_tokens=seq)
    assert _rel(mine_all, ref_all) < REL_TOL, (mine_all, ref_all)
    assert mine_all - mine == batch * 2 * (seq - 1) * d * cfg.vocab_size


def test_decoder_layer_flops_by_hand():
    cfg = _llama_cfg()  # D=64, H=4, Hkv=2, Dh=16, I=160
    s, k = 10, 25
    expected = (
        2 * s * 64 * 64 * 2  # q, o
        + 2 * s * 64 * 32 * 2  # k, v (GQA: Hkv*Dh = 32)
        + 2 * 2 * s * k * 64  # QK^T, AV
        + 3 * 2 * s * 64 * 160
    )  # gate, up, down
    assert flops.decoder_layer_flops(cfg, s, kv_len=k) == expected
    assert flops.decoder_layer_flops(cfg, s) == flops.decoder_layer_flops(cfg, s, kv_len=s)
    # explicit head_dim wins over hidden_size // heads
    cfg_hd = _llama_cfg(head_dim=32)
    assert flops.decoder_layer_flops(cfg_hd, s) != flops.decoder_layer_flops(cfg, s)
    assert flops.decoder_layer_flops(cfg, 0) == 0


# ------------------------------------------------------------------ per-layer lengths
def _prune_from_layer(model, k, keep):
    """Forward pre-hooks that make decoder layers >= k see only the `keep` positions."""
    handles = []

    def hook(module, args, kwargs, first):
        if first:
            args = (args[0][:, keep],) + tuple(args[1:])
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            kwargs["position_embeddings"] = tuple(t[:, keep] for t in pe)
        if isinstance(kwargs.get("position_ids"), torch.Tensor):
            kwargs["position_ids"] = kwargs["position_ids"][:, keep]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            kwargs["attention_mask"] = mask[..., keep, :][..., keep]
        return args, kwargs

    for i, layer in enumerate(model.model.layers):
        if i >= k:
            handles.append(
                layer.register_forward_pre_hook(
                    lambda m, a, kw, first=(i == k): hook(m, a, kw, first), with_kwargs=True
                )
            )
    return handles


def test_per_layer_lengths_match_pruned_model():
    torch.manual_seed(0)
    cfg = _llama_cfg()  # 4 layers
    model = _eager(LlamaForCausalLM, cfg)
    seq, k = 40, 2
    keep = torch.arange(0, seq, 3)  # 14 tokens from layer 2 on
    lens = [seq] * k + [len(keep)] * (cfg.num_hidden_layers - k)
    ids = torch.randint(0, cfg.vocab_size, (1, seq))
    handles = _prune_from_layer(model, k, keep)
    try:
        ref, _ = _count(lambda: model(input_ids=ids, logits_to_keep=1, use_cache=False))
    finally:
        for h in handles:
            h.remove()
    mine = flops.decoder_prefill_flops(cfg, lens)
    assert _rel(mine, ref) < REL_TOL, (mine, ref)
    # exactly the sum of the per-layer terms + lm_head on one token
    per_layer = sum(flops.decoder_layer_flops(cfg, s) for s in lens)
    assert mine == per_layer + 2 * cfg.hidden_size * cfg.vocab_size
    assert flops.decoder_prefill_flops(cfg, lens, batch=3) == 3 * mine
    # uniform case: int form == list form == tensor / numpy forms
    full = flops.decoder_prefill_flops(cfg, seq)
    assert full == flops.decoder_prefill_flops(cfg, [seq] * 4)
    assert full == flops.decoder_prefill_flops(cfg, torch.tensor([seq] * 4))
    assert full == flops.decoder_prefill_flops(cfg, np.array([seq] * 4))
    assert full == flops.decoder_prefill_flops(cfg, np.int64(seq))
    assert mine < full


# ------------------------------------------------------------------ vision towers vs FlopCounterMode
def test_llava_clip_tower_and_projector_match_flop_counter():
    torch.manual_seed(0)
    cfg = _llava_cfg()
    model = _eager(LlavaForConditionalGeneration, cfg)
    n_img = 3
    pix = torch.randn(n_img, 3, 32, 32)
    ref, ref_attn = _count(lambda: model.model.get_image_features(pixel_values=pix))
    mine = flops.vision_flops(cfg, num_images=n_img)
    assert _rel(mine, ref) < REL_TOL, (mine, ref)
    # all 3 encoder layers run (not only up to vision_feature_layer=-2), on 16 patches + CLS
    assert ref_attn == n_img * 3 * 4 * 17 * 17 * 64
    # "full" keeps CLS for the projector
    cfg_full = _llava_cfg(vision_feature_select_strategy="full")
    model_full = _eager(LlavaForConditionalGeneration, cfg_full)
    ref_full, _ = _count(lambda: model_full.model.get_image_features(pixel_values=pix))
    assert _rel(flops.vision_flops(cfg_full, num_images=n_img), ref_full) < REL_TOL
    # LLaVA-NeXT: same tower/projector, num_images counts crops
    nxt = _llava_cfg(LlavaNextConfig)
    assert flops.vision_flops(nxt, num_images=5) == 5 * flops.vision_flops(cfg, num_images=1)


def test_qwen2vl_tower_matches_flop_counter():
    torch.manual_seed(0)
    cfg = _qwen2vl_cfg()
    model = _eager(Qwen2VLForConditionalGeneration, cfg)
    grid = torch.tensor([[1, 8, 12], [2, 4, 4]])  # an image and a 2-frame video
    pix = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    ref, ref_attn = _count(lambda: model.model.get_image_features(pixel_values=pix, image_grid_thw=grid))
    mine = flops.vision_flops(cfg, image_grid_thw=grid)
    assert _rel(mine, ref) < REL_TOL, (mine, ref)
    # attention within each frame: 96**2 + 2 * 16**2, 2 blocks, De=64
    assert ref_attn == 2 * 4 * 64 * (96**2 + 2 * 16**2)
    assert mine == flops.vision_flops(cfg, image_grid_thw=[(1, 8, 12), (2, 4, 4)])


def test_qwen25vl_tower_window_attention_matches_flop_counter():
    torch.manual_seed(0)
    cfg = _qwen25vl_cfg(fullatt=(1, 3))
    model = _eager(Qwen2_5_VLForConditionalGeneration, cfg)
    grid = torch.tensor([[1, 12, 20], [2, 8, 8]])
    pix = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    ref, ref_attn = _count(lambda: model.model.get_image_features(pixel_values=pix, image_grid_thw=grid))
    mine = flops.vision_flops(cfg, image_grid_thw=grid)
    assert _rel(mine, ref) < REL_TOL, (mine, ref)
    # window = 112 // 2 // 14 = 4 merged tokens. Image 1: 6 x 10 merged grid -> window rows (4, 2),
    # columns (4, 4, 2): sum of squared window lengths = 2**4 * (16+4) * (16+16+4) = 11520 (vs 240**2 full).
    # Video: 4 x 4 merged grid per frame = one window per frame: 2 * 64**2 = 8192 either way.
    full_sq = 240**2 + 2 * 64**2
    win_sq = 16 * 20 * 36 + 2 * 64**2
    assert ref_attn == 4 * 64 * (2 * full_sq + 2 * win_sq)  # blocks 1, 3 full; blocks 0, 2 windowed
    # all-full-attention config counts more
    assert flops.vision_flops(_qwen25vl_cfg(fullatt=(0, 1, 2, 3)), image_grid_thw=grid) - mine == 4 * 64 * 2 * (
        full_sq - win_sq
    )


def test_internvl_tower_pixel_shuffle_and_projector_match_flop_counter():
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(0)
    cfg = InternVLConfig(
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=[56, 56],
            patch_size=[14, 14],
            use_qk_norm=True,
        ),
        text_config=_qwen_text(rope_parameters={"rope_type": "default"}),
        image_seq_length=4,
    )
    model = _eager(InternVLForConditionalGeneration, cfg)
    tiles = 5
    pix = torch.randn(tiles, 3, 56, 56)
    ref, ref_attn = _count(lambda: model.model.get_image_features(pixel_values=pix))
    mine = flops.vision_flops(cfg, num_images=tiles)
    assert _rel(mine, ref) < REL_TOL, (mine, ref)
    # every tile: 16 patches + CLS, all 3 layers; projector on 4 shuffled tokens of 4 * 64 channels
    assert ref_attn == tiles * 3 * 4 * 17 * 17 * 64
    projector = tiles * (2 * 4 * 256 * 96 + 2 * 4 * 96 * 96)
    assert mine - projector == tiles * (
        2 * 16 * 3 * 14 * 14 * 64 + 3 * (8 * 17 * 64 * 64 + 4 * 17 * 17 * 64 + 4 * 17 * 64 * 128)
    )
    assert flops.prefill_flops(cfg, 40, num_images=tiles) == mine + flops.decoder_prefill_flops(cfg.text_config, 40)
    with pytest.raises(ValueError, match="num_images"):
        flops.vision_flops(cfg, image_grid_thw=[(1, 4, 4)])


def test_prefill_flops_is_vision_plus_decoder():
    cfg = _qwen2vl_cfg()
    grid = [(1, 8, 12)]
    lens = [60, 30]
    total = flops.prefill_flops(cfg, lens, batch=2, image_grid_thw=grid, lm_head_tokens=1)
    assert total == flops.vision_flops(cfg, image_grid_thw=grid) + flops.decoder_prefill_flops(
        cfg.text_config, lens, batch=2
    )
    llava = _llava_cfg()
    assert flops.prefill_flops(llava, 50, num_images=2) == flops.vision_flops(
        llava, num_images=2
    ) + flops.decoder_prefill_flops(llava.text_config, 50)


# ------------------------------------------------------------------ KV cache
def test_kv_cache_bytes_by_hand():
    cfg = _llama_cfg()  # 4 layers, Hkv=2, Dh=16
    lens = [100, 100, 40, 40]
    assert flops.kv_cache_bytes(cfg, lens) == 2 * 2 * 16 * 2 * 280
    assert flops.kv_cache_bytes(cfg, lens, batch=3, dtype=torch.float32) == 2 * 2 * 16 * 4 * 280 * 3
    assert flops.kv_cache_bytes(cfg, 100, dtype="bfloat16") == 2 * 2 * 16 * 2 * 400
    # no num_key_value_heads -> MHA
    mha = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=8)
    assert flops.kv_cache_bytes(mha, 10) == 2 * 4 * 16 * 2 * 10


# ------------------------------------------------------------------ errors
def test_bad_inputs_raise_informative_errors():
    cfg = _llama_cfg()
    with pytest.raises(ValueError, match=r"3 entries.*num_hidden_layers=4"):
        flops.decoder_prefill_flops(cfg, [10, 10, 10])
    with pytest.raises(ValueError, match=r"layer_seq_lens\[1\].*-5"):
        flops.decoder_prefill_flops(cfg, [10, -5, 10, 10])
    with pytest.raises(ValueError, match="seq_len.*-1"):
        flops.decoder_layer_flops(cfg, -1)
    with pytest.raises(ValueError, match="kv_len"):
        flops.decoder_layer_flops(cfg, 4, kv_len=-2)
    with pytest.raises(ValueError, match="batch"):
        flops.decoder_prefill_flops(cfg, 10, batch=-1)
    with pytest.raises(TypeError, match="seq_len.*float"):
        flops.decoder_layer_flops(cfg, 3.5)
    with pytest.raises(TypeError, match="layer_seq_lens"):
        flops.decoder_prefill_flops(cfg, "10")
    with pytest.raises(ValueError, match=r"3 entries.*num_hidden_layers=4"):
        flops.kv_cache_bytes(cfg, [1, 2, 3])
    with pytest.raises(TypeError, match="dtype"):
        flops.kv_cache_bytes(cfg, 10, dtype="float17")
    with pytest.raises(ValueError, match=r"'llama'.*llava.*llava_next.*qwen2_vl.*qwen2_5_vl"):
        flops.vision_flops(cfg)
    with pytest.raises(ValueError, match="image_grid_thw is required"):
        flops.vision_flops(_qwen2vl_cfg())
    with pytest.raises(ValueError, match="image_grid_thw is only used"):
        flops.vision_flops(_llava_cfg(), image_grid_thw=[(1, 4, 4)])
    with pytest.raises(ValueError, match="spatial_merge_size=2"):
        flops.vision_flops(_qwen2vl_cfg(), image_grid_thw=[(1, 5, 4)])
    with pytest.raises(ValueError, match=r"image_grid_thw\[0\]"):
        flops.vision_flops(_qwen2vl_cfg(), image_grid_thw=[(1, 4)])
    with pytest.raises(ValueError, match="num_images"):
        flops.vision_flops(_llava_cfg(), num_images=-1)


# ------------------------------------------------------------------ Qwen3-VL / Qwen3.5 (DeepStack, Gated DeltaNet, MoE)
@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"])
def test_qwen3_decoders_match_flop_counter(family):
    """Dense, MoE (experts run eagerly so FlopCounterMode sees each routed token) and hybrid decoders, at a length
    that pads the delta rule's last chunk. FlopCounterMode does not count ``linalg.solve_triangular``: the two
    unit-triangular solves per chunk and value head (C*(C-1) FLOPs per right-hand column) are added by hand."""
    import tiny

    torch.manual_seed(0)
    cfg = tiny.build(family).config
    model = _frozen(
        type(tiny.build(family))._from_config(cfg, attn_implementation="eager", experts_implementation="eager").eval()
    )
    text = cfg.text_config
    seq = 70
    ref, _ = _count(lambda: model.model.language_model(inputs_embeds=torch.randn(1, seq, text.hidden_size)))
    mine = flops.decoder_prefill_flops(text, seq, lm_head_tokens=0)
    linear = [t for t in (getattr(text, "layer_types", None) or []) if t == "linear_attention"]
    c = flops.DELTA_RULE_CHUNK
    solves = (
        len(linear)
        * text.linear_num_value_heads
        * 2
        * c
        * (c - 1)
        * (text.linear_key_head_dim + text.linear_value_head_dim)
        if linear
        else 0
    )  # 2 chunks at seq 70
    assert mine == ref + solves, (mine, ref, solves)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_qwen3_towers_match_flop_counter(family):
    """Qwen3-VL counts its two DeepStack mergers beside the main one; Qwen3.5 has only the main merger."""
    import tiny

    torch.manual_seed(0)
    cfg = tiny.build(family).config
    model = type(tiny.build(family))._from_config(cfg, attn_implementation="eager").eval()
    grid = torch.tensor([[1, 8, 12], [2, 4, 4]])
    pix = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    ref, ref_attn = _count(lambda: model.model.get_image_features(pixel_values=pix, image_grid_thw=grid))
    mine = flops.vision_flops(cfg, image_grid_thw=grid)
    assert mine == ref, (mine, ref)
    v = cfg.vision_config
    assert ref_attn == v.depth * 4 * v.hidden_size * (96**2 + 2 * 16**2)  # full attention within each frame
    taps = len(getattr(v, "deepstack_visual_indexes", None) or ())
    dm = v.hidden_size * 4
    merger = sum(2 * n * dm * dm + 2 * n * dm * v.out_hidden_size for n in (24, 8))
    no_taps = type(cfg)(**{**cfg.to_dict(), "vision_config": {**v.to_dict(), "deepstack_visual_indexes": []}})
    assert mine - flops.vision_flops(no_taps, image_grid_thw=grid) == taps * merger


# ------------------------------------------------------------------ Gemma 3 (SigLIP, pooling projector, sliding layers)
def test_gemma3_tower_and_projector_match_flop_counter():
    """SigLIP without CLS on 8 x 8 patches, all 4 layers; the projector's average pooling is element-wise (not
    counted), its one matmul maps the 16 pooled tokens."""
    import tiny

    torch.manual_seed(0)
    cfg = tiny.build("gemma3").config
    model = _eager(type(tiny.build("gemma3")), cfg)
    pix = torch.randn(2, 3, 112, 112)
    ref, ref_attn = _count(lambda: model.model.get_image_features(pixel_values=pix))
    mine = flops.vision_flops(cfg, num_images=2)
    assert mine == ref, (mine, ref)
    v = cfg.vision_config
    assert ref_attn == 2 * v.num_hidden_layers * 4 * 64 * 64 * v.hidden_size  # 64 patches, no CLS
    no_proj = mine - 2 * 2 * 16 * v.hidden_size * cfg.text_config.hidden_size
    assert no_proj == 2 * (
        2 * 64 * 3 * 14 * 14 * v.hidden_size
        + v.num_hidden_layers
        * (
            4 * 2 * 64 * v.hidden_size**2
            + 2 * 2 * 64 * 64 * v.hidden_size
            + 2 * 2 * 64 * v.hidden_size * v.intermediate_size
        )
    )
    with pytest.raises(ValueError, match="vision_use_head=True"):
        flops.vision_flops(type(cfg)(**{**cfg.to_dict(), "vision_config": {**v.to_dict(), "vision_use_head": True}}))


def test_gemma3_decoder_matches_flop_counter_and_caps_sliding_layers_by_the_window():
    """Within the window (S <= W) the eager decoder computes what the formula counts; beyond it, the sliding layers'
    attention products cover W keys per query (what a windowed kernel computes) while the global ones cover S."""
    import tiny

    torch.manual_seed(0)
    cfg = tiny.build("gemma3").config
    text = cfg.text_config
    model = _eager(type(tiny.build("gemma3")), cfg)
    w = text.sliding_window
    ref, ref_attn = _count(lambda: model.model.language_model(inputs_embeds=torch.randn(1, w, text.hidden_size)))
    assert flops.decoder_prefill_flops(text, w, lm_head_tokens=0) == ref, ref
    h, dh = text.num_attention_heads, text.head_dim
    s = 37
    sliding = [i for i, t in enumerate(text.layer_types) if t == "sliding_attention"]
    full = flops.decoder_layer_flops(text, s, layer=1)  # a global layer
    for i in sliding:
        assert full - flops.decoder_layer_flops(text, s, layer=i) == 2 * 2 * s * (s - w) * h * dh
        assert flops.decoder_layer_flops(text, 1, kv_len=s, layer=i) == flops.decoder_layer_flops(
            text, 1, kv_len=w, layer=i
        )
