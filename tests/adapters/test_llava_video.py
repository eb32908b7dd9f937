"""LLaVA-NeXT-Video and LLaVA-OneVision beyond the method x family tests (tests/engine/test_patch.py and co. cover their
images): the adapters' packing of per-patch quantities against the models' own features (AnyRes-max unpadding and
downscale, newline tokens, both video poolings), videos as one unit whose budget covers all its frames (checked
against the unpatched model fed the kept tokens), OneVision's downscaled and multi-image prompts, beam search, the
refusals, and the FLOPs of SigLIP towers and video frames against torch's FlopCounterMode."""

import pytest
import torch
from conftest import opts
from tiny import IMAGE_ID, PAD_ID, VIDEO_ID, make_inputs, video_inputs
from tiny import vision_aspect as _aspect
from torch.utils.flop_counter import FlopCounterMode

import vtprune
from vtprune import flops
from vtprune import functional as F
from vtprune.adapters import get_adapter

FAMS = ("llava_next_video", "llava_onevision")


def _projector_io(model, fn):
    """Run ``fn()`` and return what the projector received and returned (the last call)."""
    seen = {}

    def hook(mod, args, out):
        seen["in"], seen["out"] = args[0], out

    handle = model.model.multi_modal_projector.register_forward_hook(hook)
    try:
        with torch.no_grad():
            result = fn()
    finally:
        handle.remove()
    return seen["in"], seen["out"], result


def _check_packing(adapter, per_crop, feats, counts, call, newline):
    """``adapter.pack_crop_scores`` of each channel of ``per_crop`` [crops, P, D] equals the model's packed features
    ``feats`` (one [n, D] per image) at every token that is not a newline token; newline tokens get the lowest score."""
    for i, crops in enumerate(torch.split(per_crop, counts)):
        is_newline = (feats[i] == newline).all(-1)
        for c in (0, 5, per_crop.shape[-1] - 1):
            packed = adapter.pack_crop_scores(crops[..., c], call, i)
            assert packed.shape == (feats[i].shape[0],)
            torch.testing.assert_close(packed[~is_newline], feats[i][~is_newline, c], rtol=1e-5, atol=1e-6)
            assert torch.equal(packed[is_newline], packed.min().expand(int(is_newline.sum())))


@pytest.mark.parametrize("aspect", ["anyres_max_9", "anyres_max_2"])
def test_onevision_image_packing_is_the_models_own(aspect, model_factory):
    model = model_factory("llava_onevision")
    adapter = get_adapter(model)
    # rows: one image alone (AnyRes crops) twice, two images (base crop each); anyres_max_2 downscales the 2x2 crops
    inputs = make_inputs(model, "llava_onevision", [(1, 1, 1), (1, 1, 1), (1, 2, 1)])
    call = {k: inputs[k] for k in ("pixel_values", "image_sizes", "batch_num_images")}
    with _aspect(model, aspect):
        _, out, result = _projector_io(model, lambda: model.model.get_image_features(**call))
        feats = list(result.pooler_output)
        counts = adapter.crop_counts(call, len(feats))
        assert counts == [3, 5, 1, 1]  # 56x112: base + 1x2 crops; 112x112: base + 2x2; multi-image: base only
        newline = model.model.image_newline.to(out.dtype)
        _check_packing(adapter, out, feats, counts, call, newline)
    n = [f.shape[0] for f in feats]
    # 112x112 with anyres_max_2: the 8x8 grid is 2x two crops' 4x4 patches -> ratio sqrt(2): bilinear 5x5, 5 newlines
    assert n == [16 + 4 * 9, 16 + (5 * 6 if aspect == "anyres_max_2" else 8 * 9), 17, 17]


def test_next_video_image_packing_is_the_models_own(model_factory):
    model = model_factory("llava_next_video")
    adapter = get_adapter(model)
    inputs = make_inputs(model, "llava_next_video", [(1, 3, 1)])
    call = {k: inputs[k] for k in ("pixel_values", "image_sizes")}
    _, out, result = _projector_io(model, lambda: model.model.get_image_features(**call))
    feats = list(result.pooler_output)
    _check_packing(adapter, out, feats, adapter.crop_counts(call, 3), call, model.model.image_newline.to(out.dtype))


@pytest.mark.parametrize("family", FAMS)
def test_video_packing_is_the_models_own_pooling(family, model_factory):
    model = model_factory(family)
    adapter = get_adapter(model)
    pix, _ = video_inputs(model, (3, 3))
    call = dict(pix)
    projected_in, out, result = _projector_io(model, lambda: model.model.get_video_features(**call))
    feats = list(result.pooler_output)
    assert adapter.crop_counts(call, 2) == [3, 3]
    if family == "llava_onevision":  # projector per patch, then the model's bilinear 2x2 pooling, one newline
        _check_packing(adapter, out, feats, [3, 3], call, model.model.image_newline.to(out.dtype))
        assert feats[0].shape[0] == 3 * 2 * 2 + 1
        return
    # NeXT-Video pools each frame before the projector: a per-patch quantity (the tower's feature layer) pools to
    # the projector's input; one per pooled token (the projector's input itself) is taken as it is
    with torch.no_grad():
        hidden = model.model.vision_tower(
            pix["pixel_values_videos"].flatten(0, 1), output_hidden_states=True
        ).hidden_states[-2][:, 1:]
    for v, (patches, pooled) in enumerate(zip(hidden.split(3), projected_in.split(3))):
        for c in (0, 7):
            torch.testing.assert_close(adapter.pack_crop_scores(patches[..., c], call, v), pooled[..., c].reshape(-1))
            assert torch.equal(adapter.pack_crop_scores(pooled[..., c], call, v), pooled[..., c].reshape(-1))
    assert feats[0].shape[0] == 3 * 2 * 2


# -- videos: one unit per video --------------------------------------------------------------------------------------
def _video_batch(model, rows, frames=2, seed=0):
    """Left-padded rows ``[(text_before, text_after)]`` of one video of ``frames`` frames each, and each row alone."""
    pix, lengths = video_inputs(model, (frames,) * len(rows), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    ids = [
        torch.randint(3, 80, (b,), generator=gen).tolist()
        + [VIDEO_ID] * n
        + torch.randint(3, 80, (a,), generator=gen).tolist()
        for (b, a), n in zip(rows, lengths)
    ]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), PAD_ID)
    mask = torch.zeros_like(input_ids)
    for i, r in enumerate(ids):
        input_ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    batch = dict(input_ids=input_ids, attention_mask=mask, **pix)
    singles = [
        dict(
            input_ids=torch.tensor([r]),
            attention_mask=torch.ones(1, len(r), dtype=torch.long),
            pixel_values_videos=pix["pixel_values_videos"][i : i + 1],
        )
        for i, r in enumerate(ids)
    ]
    return batch, singles, lengths


def _greedy(model, inputs, n=4, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, **kw)[:, -n:]


VIDEO_CASES = [("llava_next_video", m) for m in ("random", "divprune", "zoo", "cls", "todre", "vispruner")] + [
    ("llava_onevision", m) for m in ("random", "divprune", "zoo", "cls", "todre")
]


@pytest.mark.parametrize("family,method", VIDEO_CASES)
def test_pruned_video_equals_unpatched_model_fed_kept_tokens(family, method, model_factory):
    model = model_factory(family)
    _, (inputs,), (n,) = _video_batch(model, [(3, 5)], frames=3)
    with vtprune.patched(model, method, **opts(method, keep=5)), torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        tokens = _greedy(model, inputs)
        st = vtprune.stats(model)
    # LLaVA-OneVision's trailing newline is a structure token: outside the video unit, always kept
    frame_tokens = n - (family == "llava_onevision")
    assert st.visual_tokens_in == [frame_tokens] and st.visual_tokens_kept[0] <= 5
    inner = model.model
    ids = inputs["input_ids"][0]
    visual = (ids == VIDEO_ID).nonzero().squeeze(1)
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    keep[visual] = False
    keep[visual[st.kept_indices[0]]] = True
    keep[visual[frame_tokens:]] = True
    with torch.no_grad():
        embeds = inner.get_input_embeddings()(inputs["input_ids"])
        embeds[0, visual] = inner.get_video_features(inputs["pixel_values_videos"]).pooler_output[0]
        pos = torch.arange(ids.numel())[keep][None]
        route = dict(inputs_embeds=embeds[:, keep], position_ids=pos, attention_mask=torch.ones_like(pos))
        ref_logits = model(**route).logits[:, -1]
        ref_tokens = model.generate(**route, max_new_tokens=4, do_sample=False)[:, -4:]
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, ref_tokens)
    # the vision tower ran once per frame: FLOPs count 3 frames, no image
    text = model.config.text_config
    assert st.prefill_flops_full == flops.decoder_prefill_flops(text, ids.numel()) + flops.vision_flops(
        model.config, num_images=0, num_frames=3
    )


@pytest.mark.parametrize(
    "family,method", [(f, m) for f in FAMS for m in ("divprune", "fastv")] + [("llava_next_video", "visionzip")]
)
def test_video_batch_equals_rows_alone_and_cache_equals_no_cache(family, method, model_factory):
    model = model_factory(family)
    batch, singles, _ = _video_batch(model, [(2, 6), (7, 2)], frames=2)
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with vtprune.patched(model, method, **opts(method, ratio=0.5)), torch.no_grad():
        logits = model(**batch, position_ids=pos).logits[:, -1]
        tokens = _greedy(model, batch)
        assert torch.equal(tokens, _greedy(model, batch, use_cache=False))
        for i, one in enumerate(singles):
            torch.testing.assert_close(model(**one).logits[0, -1], logits[i], rtol=1e-4, atol=1e-4)
            assert torch.equal(_greedy(model, one)[0], tokens[i])


@pytest.mark.parametrize("family", FAMS)
def test_beam_search_equals_the_kept_token_prompt(family, model_factory):
    model = model_factory(family)
    inputs = make_inputs(model, family, [(5, 1, 4)])
    with vtprune.patched(model, "divprune", keep=6), torch.no_grad():
        model(**inputs)
        kept = vtprune.stats(model).kept_indices[0]
        beams = _greedy(model, inputs, num_beams=3)
    ids = inputs["input_ids"][0]
    visual = (ids == IMAGE_ID).nonzero().squeeze(1)
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    keep[visual] = False
    keep[visual[kept]] = True
    inner = model.model
    call = {k: inputs[k] for k in ("pixel_values", "image_sizes", "batch_num_images") if k in inputs}
    with torch.no_grad():
        embeds = inner.get_input_embeddings()(inputs["input_ids"])
        embeds[0, visual] = inner.get_image_features(**call).pooler_output[0]
        pos = torch.arange(ids.numel())[keep][None]
        ref = model.generate(
            inputs_embeds=embeds[:, keep],
            position_ids=pos,
            attention_mask=torch.ones_like(pos),
            max_new_tokens=4,
            num_beams=3,
            do_sample=False,
        )[:, -4:]
    assert torch.equal(beams, ref)


@pytest.mark.parametrize("method", ["random", "zoo"])
def test_onevision_downscaled_and_multi_image_prompts_equal_the_kept_token_prompt(method, model_factory):
    model = model_factory("llava_onevision")
    # rows: a 56x112 image (not downscaled); a 112x112 image, downscaled (anyres_max_2); two images of one prompt
    # (base crop + newline each)
    inner = model.model
    with _aspect(model, "anyres_max_2"), vtprune.patched(model, method, **opts(method, ratio=0.4)), torch.no_grad():
        batch = make_inputs(model, "llava_onevision", [(3, 1, 2), (4, 1, 1), (2, 2, 3)], seed=3)
        st_logits = model(**batch, position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
        st = vtprune.stats(model)
        call = {k: batch[k] for k in ("pixel_values", "image_sizes", "batch_num_images")}
        feats = torch.cat(list(inner.get_image_features(**call).pooler_output))
    assert st.visual_tokens_in == [16 + 4 * 9, 16 + 5 * 6, 2 * 17]
    embeds = inner.get_input_embeddings()(batch["input_ids"])
    visual_all = batch["input_ids"] == IMAGE_ID
    with torch.no_grad():
        embeds = embeds.masked_scatter(visual_all[..., None], feats)
        for row in range(3):
            real = batch["attention_mask"][row].bool()
            visual = (visual_all[row] & real)[real].nonzero().squeeze(1)
            keep = torch.ones(int(real.sum()), dtype=torch.bool)
            keep[visual] = False
            keep[visual[st.kept_indices[row]]] = True
            pos = torch.arange(keep.numel())[keep][None]
            ref = model(
                inputs_embeds=embeds[row, real][keep][None], position_ids=pos, attention_mask=torch.ones_like(pos)
            ).logits[0, -1]
            torch.testing.assert_close(st_logits[row], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "method,match",
    [
        ("pool", "blend several patches.*anyres_max downscale"),
        ("vispruner", "blend several patches"),
        ("visionzip", "bilinearly downscaled.*visionzip"),
    ],
)
def test_methods_that_need_one_patch_per_token_refuse_blended_tokens(method, match, model_factory):
    model = model_factory("llava_onevision")
    with _aspect(model, "anyres_max_2"), vtprune.patched(model, method, **opts(method, keep=4)), torch.no_grad():
        downscaled = make_inputs(model, "llava_onevision", [(3, 1, 2), (4, 1, 1)], seed=3)  # row 1: 112x112 -> 5x5
        with pytest.raises(ValueError, match=match):
            model(**downscaled)
    _, (video,), _ = _video_batch(model, [(2, 3)])
    match = "bilinearly.*visionzip" if method == "visionzip" else "blend several patches.*video pooling"
    with (
        vtprune.patched(model, method, **opts(method, keep=4)),
        torch.no_grad(),
        pytest.raises(ValueError, match=match),
    ):
        model(**video)


# -- FLOPs: SigLIP towers and video frames vs FlopCounterMode ----------------------------------------------------------
def _count(fn):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert not any("scaled_dot_product" in op for op in by_op), by_op  # eager: attention is bmm, counted everywhere
    return counter.get_total_flops()


def _eager(family, **config):
    import tiny

    model = tiny.build(family, attn="eager")
    for key, value in config.items():
        setattr(model.config, key, value)
    return model


@pytest.mark.parametrize("family", FAMS)
def test_towers_and_video_frames_match_flop_counter(family):
    model = _eager(family)
    pix = torch.randn(2, 5, 3, 56, 56)  # 2 images of 5 crops (base + 2x2)
    ref = _count(lambda: model.model.get_image_features(pix, image_sizes=torch.tensor([[112, 112]] * 2)))
    mine = flops.vision_flops(model.config, num_images=10)
    assert abs(mine - ref) / ref < 0.05, (mine, ref)
    video = torch.randn(2, 3, 3, 56, 56)  # 2 videos of 3 frames
    ref = _count(lambda: model.model.get_video_features(video))
    mine = flops.vision_flops(model.config, num_images=0, num_frames=6)
    assert abs(mine - ref) / ref < 0.05, (mine, ref)
    if family == "llava_next_video":  # the projector sees 4 pooled tokens of a frame, 16 patches of a crop
        dv, dt = 32, 64
        per = flops.vision_flops(model.config, num_images=1) - flops.vision_flops(
            model.config, num_frames=1, num_images=0
        )
        assert per == 2 * (16 - 4) * (dv * dt + dt * dt)


def test_siglip_head_and_errors():
    from transformers import SiglipVisionConfig

    model = _eager("llava_onevision")
    cfg = model.config
    # the attention-pooling head (vision_use_head) runs in the tower when set; LLaVA-OneVision's checkpoints unset it
    with_head = cfg.__class__.from_dict(cfg.to_dict())
    with_head.vision_config = SiglipVisionConfig(**{**cfg.vision_config.to_dict(), "vision_use_head": True})
    tower = type(model.model.vision_tower)._from_config(with_head.vision_config, attn_implementation="eager").eval()
    pix = torch.randn(2, 3, 56, 56)
    plain = type(model.model.vision_tower)._from_config(cfg.vision_config, attn_implementation="eager").eval()
    head = _count(lambda: tower(pix)) - _count(lambda: plain(pix))
    assert head == flops.vision_flops(with_head, num_images=2) - flops.vision_flops(cfg, num_images=2) > 0
    with pytest.raises(ValueError, match="num_frames is for video models"):
        flops.vision_flops(_eager("llava").config, num_frames=2)
    with pytest.raises(ValueError, match="num_frames is for llava_next_video"):
        flops.vision_flops(_eager("qwen2_vl").config, image_grid_thw=[(1, 4, 4)], num_frames=2)


# -- importance="received": SigLIP (OneVision's default) and CLIP video frames, against an eager copy ------------------
def _received_capture(model, inputs, feature_call, **options):
    """The capture's records of one feature call (``feature_call(inner)``) made on the patched model."""
    with vtprune.patched(model, "cls", keep=5, start_layer=1, **options), torch.no_grad():
        session = getattr(model, vtprune.api._ATTR)
        out = feature_call(model.model)
        feats = session.capture.split_features(out.pooler_output)
        infos = [session.capture.info(f) for f in feats]
        model(**inputs)
        kept = vtprune.stats(model).kept_indices
    return infos, kept


def _eager_received(model, pixels):
    """[crops, L, P]: attention weights of vision layers 1 and 2 of an eager copy, averaged over heads and over every
    query (CLIP's CLS query included), per patch key (CLIP: the CLS key column dropped)."""
    import copy

    ref = copy.deepcopy(model)
    ref.config.vision_config._attn_implementation = "eager"
    with torch.no_grad():
        attn = ref.model.vision_tower(pixels, output_attentions=True).attentions
    cls = 1 if model.config.model_type == "llava_next_video" else 0
    return torch.stack([attn[i].float().mean(dim=(1, 2))[:, cls:] for i in (1, 2)], dim=1)


def test_onevision_received_equals_eager_attention_packed_by_hand(model_factory):
    model = model_factory("llava_onevision")
    inputs = make_inputs(model, "llava_onevision", [(3, 1, 4)])  # one 56x112 image: base crop + 1x2 crops
    call = {k: inputs[k] for k in ("pixel_values", "image_sizes", "batch_num_images")}
    infos, kept = _received_capture(model, inputs, lambda inner: inner.get_image_features(**call))
    (info,) = infos
    assert info.crops == 3 and info.cls_attention is None  # SigLIP: importance defaults to "received"
    expected = _eager_received(model, inputs["pixel_values"][0, :3])
    torch.testing.assert_close(info.received, expected, rtol=1e-5, atol=1e-7)
    scores = expected.sum(1)  # [3, 16]
    # AnyRes by hand: the base crop's 16 patches, then the 4 x 8 grid of the two crops row by row, each row + newline
    rows = [torch.cat([scores[1 + col // 4, r * 4 + col % 4].view(1) for col in range(8)]) for r in range(4)]
    floor = scores.min()
    by_hand = torch.cat([scores[0]] + [torch.cat([row, floor.view(1)]) for row in rows])
    torch.testing.assert_close(info.pack(info.received.sum(1)), by_hand, rtol=1e-5, atol=1e-7)
    assert kept[0].tolist() == F.topk_indices(by_hand, 5).tolist()


@pytest.mark.parametrize("family", FAMS)
def test_video_received_equals_eager_attention_pooled_by_hand(family, model_factory):
    model = model_factory(family)
    _, (inputs,), _ = _video_batch(model, [(2, 3)], frames=3)
    pix = inputs["pixel_values_videos"]
    infos, kept = _received_capture(model, inputs, lambda inner: inner.get_video_features(pix), importance="received")
    (info,) = infos
    assert info.crops == 3 and info.cls_attention is None
    expected = _eager_received(model, pix[0])
    torch.testing.assert_close(info.received, expected, rtol=1e-5, atol=1e-7)
    # both families pool each frame's 4x4 grid to 2x2 (tiny: bilinear 4 -> 2 and AvgPool2d(2) are both the mean of
    # each 2x2 window); OneVision appends one newline token with the lowest score
    pooled = expected.sum(1).view(3, 2, 2, 2, 2).mean(dim=(2, 4)).reshape(-1)
    if family == "llava_onevision":
        pooled = torch.cat([pooled, pooled.min().view(1)])
    torch.testing.assert_close(info.pack(info.received.sum(1)), pooled, rtol=1e-5, atol=1e-7)
    assert kept[0].tolist() == F.topk_indices(pooled, 5).tolist()
    if family == "llava_next_video":  # the patches each pooled token carries: its 2x2 window
        assert info.token_patches(3, 16)[:2].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_onevision_received_needs_every_patch_as_a_token(model_factory):
    model = model_factory("llava_onevision")
    model.config.vision_feature_select_strategy = "default"  # drops SigLIP's first patch: scores would not map
    try:
        with pytest.raises(ValueError, match="vision_feature_select_strategy='full'.*drops the first patch"):
            vtprune.patch(model, "cls", keep=4)
        with pytest.raises(ValueError, match="importance='cls' needs the vision tower's CLS attention"):
            vtprune.patch(model, "todre", keep=4, importance="cls")
    finally:
        model.config.vision_feature_select_strategy = "full"
    assert not vtprune.is_patched(model)
