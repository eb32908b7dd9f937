"""Tiny random-weight VLMs of every supported family, built from configs, with matching prompts.

``build(family)`` -> (model, make_inputs) where ``make_inputs(batch_specs)`` builds left-padded model inputs.
A batch spec per row is ``(text_before, n_images, text_after)``; token ids are drawn from a seeded generator.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeConfig,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    SiglipVisionConfig,
)

FAMILIES = [
    "llava",
    "llava_next",
    "llava_next_video",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_vl_moe",
    "qwen3_5",
    "qwen3_5_moe",
    "internvl",
    "gemma3",
]
#: Qwen3-VL / Qwen3.5 families (interleaved M-RoPE; DeepStack: qwen3_vl*; hybrid linear/full attention: qwen3_5*)
QWEN3 = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
#: LLaVA families with AnyRes (multi-crop) images
ANYRES = ("llava_next", "llava_next_video", "llava_onevision")
VOCAB = 96
IMAGE_ID, VIDEO_ID, VSTART_ID, VEND_ID, PAD_ID = 90, 91, 92, 93, 0

_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=512,
    pad_token_id=PAD_ID,
    bos_token_id=1,
    eos_token_id=2,
)
_CLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=56, patch_size=14
)

_PINPOINTS = [[56, 112], [112, 56], [112, 112]]


def _finish(model):
    model.eval()
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    # a random model must not emit placeholder ids (a re-forward would then see more image tokens than images)
    model.generation_config.suppress_tokens = [IMAGE_ID, VIDEO_ID, VSTART_ID, VEND_ID, PAD_ID]
    return model


def build(family: str, seed: int = 0, attn: str = "sdpa"):
    torch.manual_seed(seed)
    if family == "llava":
        cfg = LlavaConfig(
            vision_config=CLIPVisionConfig(**_CLIP),
            text_config=LlamaConfig(**_TEXT),
            image_token_id=IMAGE_ID,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        model = LlavaForConditionalGeneration(cfg)
    elif family == "llava_next":
        cfg = LlavaNextConfig(
            vision_config=CLIPVisionConfig(**_CLIP),
            text_config=LlamaConfig(**_TEXT),
            image_token_id=IMAGE_ID,
            image_grid_pinpoints=_PINPOINTS,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        model = LlavaNextForConditionalGeneration(cfg)
    elif family == "llava_next_video":
        cfg = LlavaNextVideoConfig(
            vision_config=CLIPVisionConfig(**_CLIP),
            text_config=LlamaConfig(**_TEXT),
            image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID,
            image_grid_pinpoints=_PINPOINTS,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            spatial_pool_mode="average",
            spatial_pool_stride=2,
        )
        model = LlavaNextVideoForConditionalGeneration(cfg)
    elif family == "llava_onevision":
        # SigLIP (no CLS token, all patches are tokens), Qwen2 LM; anyres_max_9 (the checkpoints' setting) never
        # downscales the tiny images (at most 2x2 crops); tests/adapters/test_llava_video.py sets anyres_max_1 to
        # downscale
        cfg = LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**_CLIP, vision_use_head=False),
            text_config=Qwen2Config(**_TEXT),
            image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID,
            image_grid_pinpoints=_PINPOINTS,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
        )
        model = LlavaOnevisionForConditionalGeneration(cfg)
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        vision = dict(depth=2, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        if family == "qwen2_vl":
            vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
            cls_cfg, cls_model = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        else:
            vision.update(
                hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=56, fullatt_block_indexes=[1]
            )
            cls_cfg, cls_model = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        text = dict(_TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
        cfg = cls_cfg(
            vision_config=vision,
            text_config=text,
            image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID,
            vision_start_token_id=VSTART_ID,
            vision_end_token_id=VEND_ID,
        )
        model = cls_model(cfg)
    elif family in QWEN3:
        model = _qwen3(family)
    elif family == "internvl":
        model = _internvl()
    elif family == "gemma3":
        model = _gemma3()
    else:
        raise ValueError(family)
    model.config._attn_implementation = attn
    for sub in (model.config.text_config, model.config.vision_config):
        sub._attn_implementation = attn
    return _finish(model)


_QWEN3_VISION = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    out_hidden_size=64,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    num_position_embeddings=16,
)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
#: Qwen3.5: layers 1 and 2 are full attention, so the default decoder points (fastv / dart K=2, pact K=3) read a
#: full-attention layer; a linear layer comes before (0) and after (3) them. Layer 0 being linear makes layer=1 a
#: refused point
QWEN35_LAYER_TYPES = ["linear_attention", "full_attention", "full_attention", "linear_attention"]


def _qwen3(family: str):
    """Tiny Qwen3-VL (DeepStack taps both vision layers: levels added after decoder layers 0 and 1) and Qwen3.5
    (Gated DeltaNet + gated full attention, partial rotary) models, dense or MoE."""
    text = dict(_TEXT, head_dim=16)
    ids = dict(
        image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=VSTART_ID, vision_end_token_id=VEND_ID
    )
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True}
    if family.startswith("qwen3_vl"):
        text["rope_parameters"] = dict(rope, mrope_section=[2, 3, 3])
        vision = dict(_QWEN3_VISION, deepstack_visual_indexes=[0, 1])
        cfg_cls, model_cls = (
            (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration)
            if family.endswith("moe")
            else (Qwen3VLConfig, Qwen3VLForConditionalGeneration)
        )
    else:
        text.update(
            layer_types=QWEN35_LAYER_TYPES,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_conv_kernel_dim=4,
            rope_parameters=dict(rope, mrope_section=[2, 1, 1], partial_rotary_factor=0.5),
        )
        vision = dict(_QWEN3_VISION)
        cfg_cls, model_cls = (
            (Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration)
            if family.endswith("moe")
            else (Qwen3_5Config, Qwen3_5ForConditionalGeneration)
        )
    if family.endswith("moe"):
        text.update(_MOE, shared_expert_intermediate_size=32) if family.startswith("qwen3_5") else text.update(_MOE)
    return model_cls(cfg_cls(vision_config=vision, text_config=text, **ids))


#: InternVL tiles per image, in turn: 2 tiles + thumbnail, one tile alone, 3 tiles + thumbnail
INTERNVL_TILES = (3, 1, 4)
#: LLM tokens per InternVL tile: 28 / 7 = 4 x 4 patches, pixel-shuffled to 2 x 2
INTERNVL_TILE_TOKENS = 4


def _internvl():
    """Tiny InternVL: InternViT (CLS token, q/k RMS norms as in InternViT-6B, biased q/k/v as in InternViT-300M) of
    4 x 4 patches per tile, pixel shuffle 0.5 (4 tokens per tile), a Qwen3 decoder (q/k norms, as InternVL3.5's)."""
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,
        use_qk_norm=True,
        attention_bias=True,
    )
    text = dict(_TEXT, model_type="qwen3", head_dim=16)
    cfg = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_ID,
        image_seq_length=INTERNVL_TILE_TOKENS,
        downsample_ratio=0.5,
    )
    return InternVLForConditionalGeneration(cfg)


def _internvl_images(model, n_images, gen):
    tiles = [INTERNVL_TILES[i % len(INTERNVL_TILES)] for i in range(n_images)]
    pix = torch.randn(sum(tiles), 3, 28, 28, generator=gen)
    return {"pixel_values": pix}, [t * INTERNVL_TILE_TOKENS for t in tiles]


#: Gemma 3: sliding (local) and full (global) layers alternate, so every decoder point K >= 1 has both types after it
#: and the default points (K=2) read a full layer; the sliding window (8) is shorter than an image's 16 tokens, so
#: the AND(window, OR(causal, image block)) composition of the sliding layers' masks matters
GEMMA3_LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
GEMMA3_WINDOW = 8


def _gemma3():
    """Tiny Gemma 3: a SigLIP tower (8 x 8 patches, no CLS) whose features the projector average-pools 2 x 2 into
    16 tokens per image; image tokens wrapped in boi / eoi and marked by ``token_type_ids`` (bidirectional among
    themselves); a decoder with sliding-window and global layers (own rotary bases)."""
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=112,
        patch_size=14,
        vision_use_head=False,
    )
    text = Gemma3TextConfig(
        **dict(_TEXT, head_dim=16),
        layer_types=GEMMA3_LAYER_TYPES,
        sliding_window=GEMMA3_WINDOW,
        query_pre_attn_scalar=16,
    )
    cfg = Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=16,
        image_token_index=IMAGE_ID,
        boi_token_index=VSTART_ID,
        eoi_token_index=VEND_ID,
    )
    model = Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():  # transformers initialises the projection to zeros (every image token would be alike)
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.05)
    return model


def _llava_images(model, n_images, gen):
    pix = torch.randn(n_images, 3, 56, 56, generator=gen)
    n = (56 // 14) ** 2
    return {"pixel_values": pix}, [n] * n_images


def _next_images(model, n_images, gen, per_row=None):
    sizes = [[56, 112], [112, 112], [112, 56]]
    sizes = torch.tensor([sizes[i % 3] for i in range(n_images)])
    pix = torch.randn(n_images, 5, 3, 56, 56, generator=gen)
    kwargs = {"pixel_values": pix, "image_sizes": sizes}
    if model.config.model_type == "llava_onevision":  # an image of a multi-image prompt is its base crop only
        kwargs["batch_num_images"] = torch.tensor(per_row)
    with torch.no_grad():
        feats = model.model.get_image_features(**kwargs).pooler_output
    return kwargs, [f.shape[0] for f in feats]


def video_inputs(model, frames=(2,), seed=0):
    """``pixel_values_videos`` ``[V, F, 3, 56, 56]`` of ``len(frames)`` videos of ``frames[0]`` frames each (the
    LLaVA video families batch videos of one length) and each video's number of placeholder tokens."""
    if len(set(frames)) != 1:
        raise ValueError(f"videos of one batch share a frame count, got {frames}")
    gen = torch.Generator().manual_seed(seed)
    pix = torch.randn(len(frames), frames[0], 3, 56, 56, generator=gen)
    with torch.no_grad():
        feats = model.model.get_video_features(pix).pooler_output
    return {"pixel_values_videos": pix}, [f.shape[0] for f in feats]


def _qwen_images(model, n_images, gen):
    grids = [[1, 8, 8], [1, 6, 10], [1, 8, 6]]
    grids = torch.tensor([grids[i % 3] for i in range(n_images)])
    patches = int(grids.prod(-1).sum())
    pix = torch.randn(patches, 3 * 2 * 14 * 14, generator=gen)
    return {"pixel_values": pix, "image_grid_thw": grids}, [int(g.prod()) // 4 for g in grids]


def _gemma3_images(model, n_images, gen):
    pix = torch.randn(n_images, 3, 112, 112, generator=gen)
    return {"pixel_values": pix}, [model.config.mm_tokens_per_image] * n_images


_IMAGES = {
    "llava": _llava_images,
    **{f: _next_images for f in ANYRES},
    "internvl": _internvl_images,
    "gemma3": _gemma3_images,
    **{f: _qwen_images for f in FAMILIES if "qwen" in f},
}


def make_inputs(model, family: str, specs, seed: int = 0):
    """Left-padded inputs for rows ``specs = [(text_before, n_images, text_after), ...]``."""
    gen = torch.Generator().manual_seed(seed)
    total_images = sum(s[1] for s in specs)
    extra = {"per_row": [s[1] for s in specs]} if family == "llava_onevision" else {}
    image_kwargs, lengths = _IMAGES[family](model, total_images, gen, **extra) if total_images else ({}, [])
    qwen = family.startswith("qwen")
    wrap = qwen or family in ("internvl", "gemma3")  # <vision_start> / <img> / boi ... <vision_end> / </img> / eoi
    rows, types = [], []
    it = iter(lengths)
    for before, n_img, after in specs:
        ids = torch.randint(3, 80, (before,), generator=gen).tolist()
        tt = [0] * before
        for _ in range(n_img):
            n = next(it)
            block = ([VSTART_ID] if wrap else []) + [IMAGE_ID] * n + ([VEND_ID] if wrap else [])
            ids += block
            tt += ([0] if wrap else []) + [1] * n + ([0] if wrap else [])
        more = torch.randint(3, 80, (after,), generator=gen).tolist()
        ids += more
        tt += [0] * after
        rows.append(ids)
        types.append(tt)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_ID)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    tti = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, types)):
        input_ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
        tti[i, width - len(r) :] = torch.tensor(t)
    out = {"input_ids": input_ids, "attention_mask": mask, **image_kwargs}
    if qwen:
        out["mm_token_type_ids"] = tti
    if family == "gemma3":  # the processor's name for them: image tokens (1) attend to each other bidirectionally
        out["token_type_ids"] = tti
    return out


def split_rows(model, family, specs, seed=0):
    """The same rows as ``make_inputs(specs)``, each built alone (same token ids and images)."""
    batch = make_inputs(model, family, specs, seed)
    singles = []
    img0 = 0
    for i, spec in enumerate(specs):
        n_img = spec[1]
        real = batch["attention_mask"][i].bool()
        one = {"input_ids": batch["input_ids"][i, real][None], "attention_mask": batch["attention_mask"][i, real][None]}
        for key in ("mm_token_type_ids", "token_type_ids"):
            if key in batch:
                one[key] = batch[key][i, real][None]
        if n_img:
            if family in ("llava", "gemma3"):
                one["pixel_values"] = batch["pixel_values"][img0 : img0 + n_img]
            elif family in ANYRES:
                one["pixel_values"] = batch["pixel_values"][img0 : img0 + n_img]
                one["image_sizes"] = batch["image_sizes"][img0 : img0 + n_img]
                if "batch_num_images" in batch:
                    one["batch_num_images"] = batch["batch_num_images"][i : i + 1]
            elif family == "internvl":
                tiles = [INTERNVL_TILES[i % len(INTERNVL_TILES)] for i in range(img0 + n_img)]
                start = sum(tiles[:img0])
                one["pixel_values"] = batch["pixel_values"][start : start + sum(tiles[img0:])]
            else:
                grids = batch["image_grid_thw"]
                start = int(grids[:img0].prod(-1).sum())
                stop = start + int(grids[img0 : img0 + n_img].prod(-1).sum())
                one["pixel_values"] = batch["pixel_values"][start:stop]
                one["image_grid_thw"] = grids[img0 : img0 + n_img]
        img0 += n_img
        singles.append(one)
    return batch, singles


def run_recording_layer_lengths(model, inputs, method, **options):
    """Patch ``model`` with ``method`` (a name with ``options``, a config or a schedule), run one forward and
    unpatch. Returns ``(seen, stats)``: ``seen`` = ``[(layer index, sequence length)]`` as each decoder layer
    received it (the spies are added after the engine's own layer hooks, so they see what the engine left)."""
    import vtprune

    seen = []
    vtprune.patch(model, method, **options)
    hooks = [
        layer.register_forward_pre_hook(
            lambda mod, a, kw, i=i: seen.append((i, (a[0] if a else kw["hidden_states"]).shape[1])), with_kwargs=True
        )
        for i, layer in enumerate(model.model.language_model.layers)
    ]
    try:
        with torch.no_grad():
            model(**inputs)
        st = vtprune.stats(model)
    finally:
        for h in hooks:
            h.remove()
        vtprune.unpatch(model)
    return seen, st


def cache_keyword(model) -> str:
    """The KV-cache keyword of ``model``'s forward and ``generate``: ``cache`` (transformers >= 5.24) or
    ``past_key_values`` (5.23)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def last_logits(model, inputs):
    """Last-position logits (float32) of one forward; 1-D-position models get position ids numbered from the mask,
    as ``generate`` numbers them (so a left-padded row and the row alone see the same positions)."""
    if "mm_token_type_ids" not in inputs and "position_ids" not in inputs:
        mask = inputs["attention_mask"]
        inputs = dict(inputs, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        return model(**inputs).logits[:, -1].float()


def greedy(model, inputs, n=4, **kw):
    """The ``n`` tokens greedy ``generate`` appends."""
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, **kw)[:, -n:]


def assert_keep_all_is_bit_identical(model, inputs, method, **options):
    """Patched with a budget that keeps everything, ``model`` gives the unpatched last logits and greedy tokens
    bit for bit, and its stats say nothing was pruned."""
    import vtprune

    ref_logits, ref_tokens = last_logits(model, inputs), greedy(model, inputs)
    with vtprune.patched(model, method, **options):
        assert torch.equal(last_logits(model, inputs), ref_logits)
        assert torch.equal(greedy(model, inputs), ref_tokens)
        st = vtprune.stats(model)
        assert st.visual_tokens_kept == st.visual_tokens_in
        assert st.prefill_flops == st.prefill_flops_full


def keep_columns(visual_row: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Bool [S]: every text column and the kept visual ones (``kept`` indexes the row's visual tokens)."""
    keep = ~visual_row
    keep[visual_row.nonzero().squeeze(1)[kept]] = True
    return keep


def layer_route(model, prompt, kept, layer):
    """Last logits ``[1, V]`` of a layer-by-layer run of the UNPATCHED language model on one row that drops the unkept
    visual tokens before decoder layer ``layer``. ``prompt = (embeds [1, S, D], positions, visual [1, S] bool,
    levels)``: the row's input embeddings with the visual features in place, its position ids (1-D or M-RoPE), its
    visual mask, and (Qwen3-VL's DeepStack) one ``[V, D]`` row per visual token (prompt order) for each level added
    after decoder layer i, or None. Kept tokens keep their positions; a level joins the visual rows still present."""
    embeds, pos, visual, levels = prompt
    lm = model.model.language_model
    keep = keep_columns(visual[0], kept)
    rows = torch.full(visual.shape[1:], -1, dtype=torch.long)
    rows[visual[0]] = torch.arange(int(visual.sum()))
    with torch.no_grad():
        h = embeds
        cos, sin = lm.rotary_emb(h, pos)
        for i, decoder_layer in enumerate(lm.layers):
            if i == layer:
                h, cos, sin, rows = h[:, keep], cos[:, keep], sin[:, keep], rows[keep]
            h = decoder_layer(h, position_embeddings=(cos, sin), attention_mask=None, position_ids=None)
            h = h[0] if isinstance(h, tuple) else h
            if levels is not None and i < len(levels):
                present = rows >= 0
                h = h.clone()
                h[0, present] = h[0, present] + levels[i][rows[present]]
        return model.lm_head(lm.norm(h)[:, -1]).float()


def route_greedy(model, route, n):
    """The ``n`` greedy tokens the UNPATCHED ``model`` appends to ``route`` (``inputs_embeds`` ``[1, T, D]``, 1-D
    ``position_ids``, ``attention_mask`` and, Gemma 3, ``token_type_ids``), re-run from scratch for every token (each
    new token embedded, at the next position, of type 0), with tiny.py's suppressed tokens. For hosts whose
    ``generate`` does not take ``inputs_embeds`` (Gemma 3); returns ``[1, n]``."""
    embed = model.get_input_embeddings()
    route = dict(route)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(**route).logits[:, -1].float()
            logits[:, model.generation_config.suppress_tokens] = float("-inf")
            tok = logits.argmax(-1, keepdim=True)
            out.append(tok)
            route["inputs_embeds"] = torch.cat([route["inputs_embeds"], embed(tok)], 1)
            route["position_ids"] = torch.cat([route["position_ids"], route["position_ids"][:, -1:] + 1], 1)
            route["attention_mask"] = torch.cat([route["attention_mask"], torch.ones_like(tok)], 1)
            if "token_type_ids" in route:
                route["token_type_ids"] = torch.cat([route["token_type_ids"], torch.zeros_like(tok)], 1)
    return torch.cat(out, 1)


@contextlib.contextmanager
def vision_aspect(model, value):
    """LLaVA-OneVision with another ``vision_aspect_ratio`` (``anyres_max_2`` bilinearly downscales the tiny
    2x2-crop grids, 8x8 patches to 5x5 and unpadded 6x8 to 4x6, as a 7B model's images beyond 9 crops' worth of
    patches are; 1x2-crop images are not); a model without that setting runs unchanged."""
    if not hasattr(model.config, "vision_aspect_ratio"):
        yield
        return
    old = model.config.vision_aspect_ratio
    model.config.vision_aspect_ratio = value
    try:
        yield
    finally:
        model.config.vision_aspect_ratio = old
