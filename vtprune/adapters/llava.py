"""LLaVA-1.5 (``llava``), LLaVA-NeXT (``llava_next``) and LLaVA-NeXT-Video (``llava_next_video``): CLIP tower with CLS
token, Llama-style LM; LLaVA-OneVision (``llava_onevision``): SigLIP tower without CLS token, Qwen2 LM."""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from .. import flops
from .base import ModelAdapter, encoder_attention_modules, qk_from_projections


class LlavaAdapter(ModelAdapter):
    model_types = ("llava",)
    tower_merging = True
    has_cls_token = True

    def vision_attention_modules(self):
        return encoder_attention_modules(
            self.inner.vision_tower, "has no CLIP-style encoder.layers; the CLS signal needs a CLIP vision tower"
        )

    def vision_qk(self, module, args, kwargs):
        return qk_from_projections(module, args, kwargs)  # CLIP: q_proj / k_proj on [crops, 1 + P, D]

    def projector_module(self):
        return self.inner.multi_modal_projector

    def projector(self):
        proj = self.inner.multi_modal_projector
        if all(hasattr(proj, n) for n in ("linear_1", "act", "linear_2")):  # Linear -> act -> Linear
            return nn.Sequential(proj.linear_1, proj.act, proj.linear_2)
        return proj

    def image_tokens(self):
        """The tower's patch grid (plus CLS with ``vision_feature_select_strategy='full'``); None for a tower vtprune
        does not know the grid of."""
        vcfg = self.config.vision_config
        if getattr(vcfg, "model_type", None) not in ("clip_vision_model", "clip", "siglip_vision_model"):
            return None
        grid = vcfg.image_size // vcfg.patch_size
        return grid * grid + int(self.cls_is_visual_token)

    @property
    def cls_is_visual_token(self) -> bool:
        return getattr(self.config, "vision_feature_select_strategy", "default") == "full" and self.clip_vision_tower

    def split_projector_inputs(self, captured, call, counts):
        if call.get("image_sizes") is not None and self.config.model_type == "llava":
            raise ValueError("projector inputs of LLaVA models called with image_sizes (Pixtral-style) are not mapped")
        return list(torch.split(captured, counts))

    def real_patch_mask(self, image_size, n, threshold):
        from .. import functional as F

        vcfg = self.config.vision_config
        grid = vcfg.image_size // vcfg.patch_size
        if self.config.model_type != "llava" or n != grid * grid:
            return super().real_patch_mask(image_size, n, threshold)
        return F.pad_mask(image_size, grid=grid, resolution=vcfg.image_size, threshold=threshold)

    def check_cls_strategy(self, importance: str = "cls") -> None:
        strategy = getattr(self.config, "vision_feature_select_strategy", "default")
        if self.has_cls_token and strategy != "default":  # CLS would be a visual token: scores cannot map
            raise ValueError(
                f"importance={importance!r} scoring needs vision_feature_select_strategy='default' (CLS dropped "
                f"from the visual tokens), got {strategy!r}"
            )
        if importance != "cls":
            return
        if not self.clip_vision_tower:
            raise ValueError(
                f"the 'cls' signal needs a CLIP vision tower with a CLS token; this model's vision tower is "
                f"{self.config.vision_config.model_type!r}"
            )

    def pack_crop_index(self, call, index: int, crops: int, tokens: int) -> torch.Tensor:
        """``[n]`` int64: for each of image ``index``'s ``n`` visual tokens (of a ``get_image_features`` call, bound
        arguments ``call``), the flat index ``c * tokens + t`` of the projector output row it comes from (crop
        ``c``, row ``t`` of ``tokens``), or -1 for a token of no row (LLaVA-NeXT's newline). LLaVA-1.5: the rows."""
        return torch.arange(crops * tokens)

    def pack_crop_weights(self, call, index: int, crops: int, tokens: int):
        """``(src [n, K] int64, weight [n, K] float64, pos [n, 2] float64)``: for each of image ``index``'s ``n`` visual
        tokens, the projector output rows it blends (flat ``c * tokens + t`` as :meth:`pack_crop_index`; -1 for an
        unused tap and for a newline token) with their weights, and the token's position (row, column, in patches)
        on the patch grid it was sampled from (here: its crop's grid; the CLS row of a ``'full'`` selection sits at
        row -1). LLaVA-1.5 / LLaVA-NeXT: every token is one row (``K = 1``, weight 1)."""
        src = self.pack_crop_index(call, index, crops, tokens)
        vcfg = self.config.vision_config
        side = vcfg.image_size // vcfg.patch_size
        patch = src.clamp(min=0) % tokens - (tokens - side * side)  # the CLS row of a 'full' selection: -1
        pos = torch.stack([torch.div(patch, side, rounding_mode="floor"), patch % side], -1).to(torch.float64)
        return src[:, None], (src >= 0).to(torch.float64)[:, None], pos


class LlavaNextAdapter(LlavaAdapter):
    model_types = ("llava_next",)
    multi_crop = True

    def image_tokens(self):
        return None  # AnyRes: the crop count depends on the image size

    def check_downsample(self, budget, processor=None):
        vcfg = self.config.vision_config
        base = (vcfg.image_size // vcfg.patch_size) ** 2
        raise ValueError(
            f"downsample: not available for {self.config.model_type!r} (AnyRes) yet: every image is its base crop "
            f"({base} visual tokens) plus a grid of crops chosen from image_grid_pinpoints, so no input gives fewer "
            f"than about {2 * base} tokens (budget {budget}), and shrinking the grid above that is not implemented; "
            "served by qwen2_vl, qwen2_5_vl, qwen3_vl(_moe), qwen3_5(_moe) and internvl"
        )

    def crop_counts(self, call: dict[str, Any], num_images: int) -> list[int]:
        module = sys.modules[type(self.inner).__module__]
        vcfg = self.config.vision_config
        return [
            module.image_size_to_num_patches(
                image_size=size, grid_pinpoints=self.config.image_grid_pinpoints, patch_size=vcfg.image_size
            )
            for size in call["image_sizes"]
        ]

    def pack_crop_scores(self, scores, call, index):
        # Reuse the model's own packing (AnyRes reshape + unpad + newline column) on a 1-channel "feature";
        # newline tokens carry no patch of their own: they get the image's lowest score.
        strategy = call.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy
        size = torch.as_tensor(call["image_sizes"])[index : index + 1]
        newline = torch.full((1,), float("-inf"), dtype=scores.dtype, device=scores.device)
        packed, _ = self.inner.pack_image_features([scores.unsqueeze(-1)], size, strategy, newline)
        return _floor_newlines((packed[0] if isinstance(packed, (list, tuple)) else packed).reshape(-1))

    def pack_crop_index(self, call, index, crops, tokens):
        # the model's own packing (AnyRes reshape + unpad + newline column) of each row's flat index
        strategy = call.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy
        size = torch.as_tensor(call["image_sizes"])[index : index + 1]
        ids = torch.arange(crops * tokens, dtype=torch.float64).view(crops, tokens, 1)
        newline = torch.full((1,), -1.0, dtype=torch.float64)
        packed, _ = self.inner.pack_image_features([ids], size, strategy, newline)
        packed = (packed[0] if isinstance(packed, (list, tuple)) else packed).reshape(-1)
        return packed.round().long()


def _floor_newlines(packed: torch.Tensor) -> torch.Tensor:
    """Row-separator (newline) tokens were packed as ``-inf``: they carry no patch and get the image's lowest score."""
    finite = torch.isfinite(packed)
    floor = packed[finite].min() if bool(finite.any()) else packed.new_zeros(())
    return torch.where(finite, packed, floor)


def _video_frames(call: dict[str, Any], num_videos: int) -> list[int]:
    """Frames per video of a ``get_video_features(pixel_values_videos [B, F, C, H, W])`` call."""
    pix = call["pixel_values_videos"]
    if pix.dim() != 5:
        raise ValueError(f"pixel_values_videos of shape {tuple(pix.shape)}; expected [videos, frames, C, H, W]")
    return [int(pix.shape[1])] * num_videos


class LlavaNextVideoAdapter(LlavaNextAdapter):
    """LLaVA-NeXT-Video (``llava_next_video``): LLaVA-NeXT's CLIP tower and AnyRes images, plus videos. A video's
    frames each run through the tower as one crop; the model's ``vision_resampler`` pools each frame's patch grid
    (average / max pooling, stride ``spatial_pool_stride``) *before* the projector, and the frames' pooled tokens
    follow each other with no newline token. Crops of a video = its frames; its projector inputs ``[F, P', D]`` are
    the pooled features; per-patch scores ``[F, P]`` (CLS rows) are pooled by the model's own resampler."""

    model_types = ("llava_next_video",)
    feature_methods = ("get_image_features", "get_video_features")
    tower_merging = False  # its videos pool each frame before the projector (vision_resampler)
    #: each frame is one tower crop: its last layer's attention stays within the frame, and pack_crop_scores pools
    #: a frame's patch scores to its tokens with the model's own resampler (average / max pooling)
    frame_attention = True

    def check_frame_attention(self):
        mode = getattr(self.config, "spatial_pool_mode", "average")
        if mode not in ("average", "max"):
            raise ValueError(
                f"llava_next_video pools video frames with spatial_pool_mode={mode!r} (a learned convolution), so a "
                "frame's patch attention has no pooled counterpart per token; per-frame attention needs "
                "spatial_pool_mode 'average' or 'max'"
            )

    def crop_counts(self, call, num_images):
        if "pixel_values_videos" in call:
            return _video_frames(call, num_images)
        return super().crop_counts(call, num_images)

    def pack_crop_scores(self, scores, call, index):
        if "pixel_values_videos" not in call:
            return super().pack_crop_scores(scores, call, index)
        vcfg = self.config.vision_config
        patches = (vcfg.image_size // vcfg.patch_size) ** 2
        if scores.shape[-1] != patches:  # already one score per pooled token (the projector's input)
            return scores.reshape(-1)
        mode = getattr(self.config, "spatial_pool_mode", "average")
        if mode not in ("average", "max"):
            raise ValueError(
                f"llava_next_video pools video frames with spatial_pool_mode={mode!r} (a learned convolution): a "
                "per-patch score has no pooled counterpart; patch scores need spatial_pool_mode 'average' or 'max'"
            )
        pooled = self.inner.vision_resampler(scores.unsqueeze(-1))  # [F, P', 1]: the model's own pooling
        return pooled.reshape(-1)

    def token_patches(self, call, index, crops, patches):
        if "pixel_values_videos" not in call:
            return super().token_patches(call, index, crops, patches)
        # a video token is the pool of one stride x stride window of its frame's patch grid (row-major windows)
        side, stride = round(patches**0.5), int(getattr(self.config, "spatial_pool_stride", 2))
        if side * side != patches:
            raise ValueError(f"llava_next_video: a frame of {patches} patches is not a square grid")
        pooled = side // stride
        rows = torch.arange(pooled).repeat_interleave(pooled) * stride  # window's top row, per pooled token
        cols = torch.arange(pooled).repeat(pooled) * stride
        offsets = torch.tensor([a * side + b for a in range(stride) for b in range(stride)])
        frame = (rows * side + cols)[:, None] + offsets  # [P', stride**2]
        return (torch.arange(crops)[:, None, None] * patches + frame).reshape(-1, stride * stride)


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision (``llava_onevision``): SigLIP tower (no CLS token, ``vision_feature_select_strategy='full'``),
    Qwen2 LM. Images: AnyRes-max packing (base crop, then the crop grid unpadded to the image's aspect ratio, bilinearly
    downscaled when it exceeds ``anyres_max_N`` crops' worth of patches, one newline token per row); an image of a
    multi-image prompt (``batch_num_images > 1``) is its base crop only, plus one newline. Videos: every frame is a
    crop; the projector runs per patch, then each frame's grid is bilinearly pooled to ``ceil(h/2) x ceil(w/2)``
    (``apply_pooling``) and one newline token ends the video. Per-patch scores ``[crops, P]`` go through the model's own
    packing / pooling (bilinear blends of scores where the model blends features); newline tokens get the image's
    lowest score."""

    model_types = ("llava_onevision",)
    has_cls_token = False
    #: a video's pooled frames are followed by one newline token (``image_newline``, same placeholder id): a structure
    #: token the engine leaves out of the video unit and always keeps, so a video method sees ``T`` frames of equal
    #: size and a budget counts only frame tokens (``visual_tokens_in`` of a video is ``T * tokens per frame``)
    video_structure_tokens = 1
    feature_methods = ("get_image_features", "get_video_features")

    def vision_attention_modules(self):
        return encoder_attention_modules(self.inner.vision_tower, "has no SigLIP-style encoder.layers")

    def check_cls_strategy(self, importance: str = "received") -> None:
        # received attention is read per patch; every patch must be a visual token (SigLIP: strategy "full")
        strategy = getattr(self.config, "vision_feature_select_strategy", "full")
        if strategy != "full":
            raise ValueError(
                f"importance={importance!r} on llava_onevision needs vision_feature_select_strategy='full' (SigLIP has "
                f"no CLS token: every patch is a visual token), got {strategy!r}, which drops the first patch"
            )

    def token_patches(self, call, index, crops, patches):
        if "pixel_values_videos" in call:
            raise ValueError(
                "llava_onevision pools each video frame bilinearly (apply_pooling), so a video token blends patches "
                "with unequal weights and carries no set of patches of its own: methods that read per-token vision "
                "keys (visionzip) cannot run on its videos; use 'cls', 'divprune' or 'zoo' there"
            )
        try:
            return super().token_patches(call, index, crops, patches)
        except ValueError:
            raise ValueError(
                "this llava_onevision image's AnyRes grid is bilinearly downscaled (anyres_max: more patches than "
                "the limit), so its tokens blend patches and carry no set of patches of their own: methods that "
                "read per-token vision keys (visionzip) cannot run on it; use 'cls', 'divprune' or 'zoo'"
            ) from None

    def crop_counts(self, call, num_images):
        if "pixel_values_videos" in call:
            return _video_frames(call, num_images)
        module = sys.modules[type(self.inner).__module__]
        vcfg = self.config.vision_config
        per_row = call.get("batch_num_images")  # as the model reads it: an image of a multi-image row is one crop
        patching = [True] * num_images if per_row is None else [int(n) == 1 for n in per_row for _ in range(int(n))]
        return [
            module.image_size_to_num_patches(
                image_size=size, grid_pinpoints=self.config.image_grid_pinpoints, patch_size=vcfg.image_size
            )
            if anyres
            else 1
            for size, anyres in zip(call["image_sizes"], patching)
        ]

    def pack_crop_index(self, call, index, crops, tokens):
        src, weight, _ = self.pack_crop_weights(call, index, crops, tokens)
        if bool((weight[:, 1:] > 0).any()):
            raise ValueError(
                "this llava_onevision image's AnyRes grid is bilinearly downscaled (anyres_max): its "
                "tokens blend several patches; use pack_crop_weights"
            )
        return src[:, 0]

    def pack_crop_weights(self, call, index, crops, tokens):
        """Images (see :meth:`LlavaAdapter.pack_crop_weights`): the base crop's tokens are its patches (``tokens``
        must be the ``P`` patches: strategy ``'full'``); an AnyRes grid token blends up to ``K = 4`` patches, the taps
        of the model's bilinear downscale (one patch, weight 1, when it does not downscale). They are read off the
        model's own ``pack_image_features`` run on each patch's (row, column) on the whole (padded) crop grid: a
        2-tap bilinear downscale blends adjacent rows / columns, so a token's packed row ``i + a`` (``0 <= a < 1``)
        says rows ``i`` and ``i + 1`` with weights ``1 - a`` and ``a`` (likewise columns; weight = row weight x column
        weight), and the packed coordinates are the token's position. The map is checked against the model's packing
        of random features (``RuntimeError`` if it differs). Videos: ``ValueError``."""
        if "pixel_values_videos" in call:
            raise ValueError("llava_onevision videos (apply_pooling) have no patch-to-token map here; images only")
        vcfg = self.config.vision_config
        side = vcfg.image_size // vcfg.patch_size
        patches = side * side
        if tokens != patches:
            raise ValueError(
                f"llava_onevision crops of {tokens} feature rows; the packing map needs the {patches} "
                "patches of vision_feature_select_strategy='full' (SigLIP has no CLS token)"
            )
        t = torch.arange(patches)
        base_pos = torch.stack([t // side, t % side], -1).to(torch.float64)
        if crops == 1:  # the base crop (an image of a multi-image prompt), one newline
            src = torch.cat([t, t.new_full((1,), -1)])[:, None]
            pos = torch.cat([base_pos, base_pos.new_zeros(1, 2)])
            return src, (src >= 0).to(torch.float64), pos
        module = sys.modules[type(self.inner).__module__]
        size = torch.as_tensor(call["image_sizes"])[index].cpu()
        nph, npw = module.get_anyres_image_grid_shape(size, self.config.image_grid_pinpoints, vcfg.image_size)
        if crops != 1 + nph * npw:
            raise RuntimeError(f"image {index}: {crops} crops for a {nph} x {npw} AnyRes grid plus the base crop")
        rows, cols = nph * side, npw * side
        q = torch.arange(crops - 1)[:, None]
        grid_y = torch.div(q, npw, rounding_mode="floor") * side + t // side  # [crops - 1, P] on the whole grid
        grid_x = (q % npw) * side + t % side
        probe = torch.zeros(crops, patches, 3, dtype=torch.float64)
        probe[1:, :, 0], probe[1:, :, 1] = grid_y, grid_x
        probe[..., 2] = torch.randn(crops, patches, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        packed = self._pack(probe, call, size, 3)
        grid = packed[patches:]  # the AnyRes grid's tokens (the base crop's come first)
        newline = grid[:, 0].isnan()
        coord = grid[:, :2].nan_to_num(0.0)  # [m, 2]: each token's (row, column), a blend of its taps'
        low = coord.floor().clamp(min=0)
        frac = (coord - low).clamp(0.0, 1.0)
        high = torch.minimum(low + 1, torch.tensor([rows - 1, cols - 1], dtype=torch.float64))
        taps_y = torch.stack([low[:, 0], high[:, 0]], 1).long()
        taps_x = torch.stack([low[:, 1], high[:, 1]], 1).long()
        w_y = torch.stack([1 - frac[:, 0], frac[:, 0]], 1)
        w_x = torch.stack([1 - frac[:, 1], frac[:, 1]], 1)
        m = grid.shape[0]
        yy, xx = taps_y[:, :, None].expand(m, 2, 2).reshape(m, 4), taps_x[:, None, :].expand(m, 2, 2).reshape(m, 4)
        weight = (w_y[:, :, None] * w_x[:, None, :]).reshape(m, 4)
        crop = 1 + torch.div(yy, side, rounding_mode="floor") * npw + torch.div(xx, side, rounding_mode="floor")
        src = crop * tokens + (yy % side) * side + xx % side
        used = (weight > 1e-12) & ~newline[:, None]
        src, weight = torch.where(used, src, -1), torch.where(used, weight, 0.0)
        base = torch.cat([t[:, None], t.new_full((patches, 3), -1)], 1)
        src = torch.cat([base, src])
        weight = torch.cat([(base >= 0).to(torch.float64), weight])
        pos = torch.cat([base_pos, coord])
        # the map must reproduce the model's own packing of arbitrary features
        want = packed[:, 2]
        got = (probe[..., 2].reshape(-1)[src.clamp(min=0)] * weight).sum(1)
        real = ~want.isnan()
        if got.shape != want.shape or not torch.allclose(got[real], want[real], rtol=1e-9, atol=1e-9):
            raise RuntimeError(
                "llava_onevision's AnyRes packing is not the unpad + 2-tap bilinear downscale vtprune "
                "reads (transformers changed?)"
            )
        return src, weight, pos

    def _pack(self, feats, call, size, channels):
        """The model's ``pack_image_features`` of one image's ``[crops, P, channels]`` float64 features; newline
        tokens come out as NaN rows."""
        aspect = call.get("vision_aspect_ratio") or self.config.vision_aspect_ratio
        newline = torch.full((channels,), float("nan"), dtype=torch.float64)
        packed, _ = self.inner.pack_image_features(
            [feats], size[None], image_newline=newline, vision_aspect_ratio=aspect
        )
        return packed[0]

    def pack_crop_scores(self, scores, call, index):
        newline = torch.full((1,), float("-inf"), dtype=scores.dtype, device=scores.device)
        if "pixel_values_videos" in call:  # the model's own 2x2 bilinear pooling per frame, one newline at the end
            pooled = self.inner.apply_pooling(scores.unsqueeze(-1)).reshape(-1)
            return _floor_newlines(torch.cat([pooled, newline]))
        aspect = call.get("vision_aspect_ratio") or self.config.vision_aspect_ratio
        size = torch.as_tensor(call["image_sizes"])[index : index + 1]
        packed, _ = self.inner.pack_image_features(
            [scores.unsqueeze(-1)], size, image_newline=newline, vision_aspect_ratio=aspect
        )
        return _floor_newlines(packed[0].reshape(-1))


# -- analytic FLOPs of the vision tower and projector (vtprune.flops) ----------------------------------------
_CLIP_VISION_TYPES = ("clip_vision_model",)
_SIGLIP_VISION_TYPES = ("siglip_vision_model",)


def llava_vision_flops(config, num_images, image_grid_thw, num_frames) -> int:
    """Vision FLOPs of the LLaVA families (CLIP or SigLIP tower, LLaVA projector; videos: ``num_frames``), see
    :mod:`vtprune.flops`."""
    flops.no_grid(config, image_grid_thw)
    num_images, num_frames = flops.as_count(num_images, "num_images"), flops.as_count(num_frames, "num_frames")
    vcfg = flops.require(config, "vision_config", f"{config.model_type} config")
    vtype = getattr(vcfg, "model_type", None)
    if vtype not in _CLIP_VISION_TYPES + _SIGLIP_VISION_TYPES:
        raise ValueError(
            f"vision tower of model_type {vtype!r} in a {config.model_type!r} config is not supported; "
            f"supported: {list(_CLIP_VISION_TYPES + _SIGLIP_VISION_TYPES)}"
        )
    siglip = vtype in _SIGLIP_VISION_TYPES
    what = f"{'SigLIP' if siglip else 'CLIP'} vision config"
    dv = int(flops.require(vcfg, "hidden_size", what))
    iv = int(flops.require(vcfg, "intermediate_size", what))
    lv = int(flops.require(vcfg, "num_hidden_layers", what))
    p = int(flops.require(vcfg, "patch_size", what))
    c = int(getattr(vcfg, "num_channels", 3) or 3)
    n = (int(flops.require(vcfg, "image_size", what)) // p) ** 2
    s = n if siglip else n + 1  # + CLS (CLIP)
    dt = int(flops.require(flops.text_config_of(config), "hidden_size", "text config"))

    feature_layer = getattr(config, "vision_feature_layer", -2)
    n_feat = 1 if isinstance(feature_layer, int) else len(feature_layer)
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy {strategy!r} is not supported; supported: 'default', 'full'")
    n_proj = n if strategy == "default" or siglip else s

    def projector(tokens: int) -> int:  # linear_1, linear_2
        return 2 * tokens * (n_feat * dv) * dt + 2 * tokens * dt * dt

    tower = 2 * n * c * p * p * dv + lv * flops.vit_layer_flops(s, dv, iv, 2, s * s)  # patch conv + all encoder layers
    if siglip and getattr(vcfg, "vision_use_head", False):  # attention-pooling head, one probe query
        tower += 2 * dv * dv + 2 * 2 * n * dv * dv + 2 * 2 * n * dv + 2 * dv * dv + 2 * 2 * dv * iv
    total = num_images * (tower + projector(n_proj))
    if num_frames:
        if config.model_type not in ("llava_next_video", "llava_onevision"):
            raise ValueError(
                f"num_frames is for video models (llava_next_video, llava_onevision), got it for "
                f"model_type {config.model_type!r}"
            )
        frame = tower + projector(n_proj)
        if config.model_type == "llava_next_video":  # pooled before the projector
            stride = int(getattr(config, "spatial_pool_stride", 2))
            side = int(round(n_proj**0.5)) // stride
            frame = tower + projector(side * side)
            if getattr(config, "spatial_pool_mode", "average") == "conv":
                out = int(getattr(config, "spatial_pool_out_channels", None) or dv)
                if out != n_feat * dv:
                    raise ValueError(
                        f"spatial_pool_out_channels={out} differs from the projector's input width "
                        f"{n_feat * dv}: such a model cannot run"
                    )
                frame += 2 * side * side * stride * stride * dv * out
        total += num_frames * frame
    return total


flops.register_vision_flops(("llava", "llava_next", "llava_next_video", "llava_onevision"), llava_vision_flops)
