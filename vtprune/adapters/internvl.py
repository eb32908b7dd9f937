"""InternVL (``internvl``: transformers' ``InternVLForConditionalGeneration``, e.g. InternVL3 / InternVL3.5 ``-HF``
checkpoints): InternViT tower with a CLS token, dynamic tiles, pixel shuffle, MLP projector, Qwen2/Qwen3 LM.

How the model turns an image into LLM tokens (``InternVLModel.get_image_features``):

* the processor cuts an image into up to ``max_patches`` tiles of ``image_size`` (448) pixels plus, when there is
  more than one, a thumbnail of the whole image (the last tile); ``pixel_values`` is ``[tiles, 3, 448, 448]`` with
  the tiles of every image of the batch concatenated. The prompt holds, per image, ``<img>`` then
  ``image_seq_length`` (256) ``<IMG_CONTEXT>`` tokens per tile then ``</img>``: one contiguous placeholder run per
  image (a video is one ``<img>...</img>`` run per frame, with text between frames: to vtprune each frame is an
  image of one tile);
* each tile runs through InternViT on its own (CLS + 32 x 32 patches); ``vision_feature_select_strategy="default"``
  drops the CLS token from the features;
* pixel shuffle (``downsample_ratio=0.5``): the 32 x 32 patch grid becomes 16 x 16 tokens, token ``(i, j)`` the
  channel-concatenation of patches ``(2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)`` (the model's own
  ``pixel_shuffle``; :meth:`InternVLAdapter.token_patch_ids` applies it to patch ids);
* the projector (LayerNorm -> Linear -> GELU -> Linear) maps each shuffled token ``[4 * D_vit]`` to the LM width:
  it is a per-token map, and its input is captured as ``projector_inputs`` (one row per LLM token).

``get_image_features`` returns ``pooler_output`` as one stacked tensor ``[tiles, 256, D]`` (not a list of images):
each tile is a feature tensor of its own, and the engine joins the consecutive tiles of one placeholder run into one
image (``tiled``), so a budget covers the whole image (all its tiles and the thumbnail).

Patch signals (CLS rows, the attention each patch receives) are per raw patch; the LLM sees pixel-shuffled tokens.
Every per-patch score is mapped to tokens through the same pixel shuffle the model applies (a token's score is the
sum over its 2 x 2 patches: the attention mass the token's patches receive), never patch by patch.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from .. import flops
from .base import ModelAdapter, qk_from_projections


class InternVLAdapter(ModelAdapter):
    model_types = ("internvl",)
    has_cls_token = True
    multi_crop = True
    #: ``pooler_output`` holds one feature tensor per tile; an image is the contiguous placeholder run of its tiles
    tiled = True
    #: the model has no video input: its processor writes a video as one ``<img>...</img>`` image run per frame
    #: between ``FrameN:`` text, and nothing in the model's inputs says which image runs are one video's frames
    #: (grouping them would guess from the text). So frames stay images of one tile each
    no_video_units = (
        "internvl has no video input: its processor writes each video frame as an image (one <img> run per "
        "frame), so vtprune sees images, not a video of frames"
    )

    # -- modules ---------------------------------------------------------------------------------
    def _vision_layers(self) -> nn.ModuleList:
        encoder = getattr(self.inner.vision_tower, "encoder", None)
        if encoder is None or not hasattr(encoder, "layer"):
            raise ValueError(
                f"vision tower {type(self.inner.vision_tower).__name__} has no InternViT-style encoder.layer; the "
                "CLS signal needs InternVL's own vision tower (InternVLVisionModel)"
            )
        return encoder.layer

    def vision_attention_modules(self):
        return [layer.attention for layer in self._vision_layers()]

    def vision_qk_modules(self, attn: nn.Module) -> tuple[nn.Module, nn.Module]:
        """InternViT normalises q and k after the projections (``use_qk_norm``: RMSNorm over all heads, InternViT-6B;
        ``nn.Identity`` otherwise): the outputs of ``q_norm`` / ``k_norm`` are what its attention uses."""
        return attn.q_norm, attn.k_norm

    def visual_token_ids(self) -> tuple[int, ...]:
        return (int(self.config.image_token_id),)  # videos use the image token too (one <img> run per frame)

    def check_cls_strategy(self, importance: str = "cls") -> None:
        strategy = getattr(self.config, "vision_feature_select_strategy", "default")
        if strategy != "default":
            raise ValueError(
                f"importance={importance!r} scoring needs vision_feature_select_strategy='default' (CLS dropped before "
                f"the pixel shuffle), got {strategy!r}"
            )
        vtype = getattr(self.config.vision_config, "model_type", None)
        if vtype != "internvl_vision":
            raise ValueError(
                f"importance={importance!r} on an InternVL model needs its InternViT tower (model_type "
                f"'internvl_vision'); this model's vision tower is {vtype!r}"
            )

    # -- the pixel shuffle, on patch ids -----------------------------------------------------------
    def _ratio(self) -> float:
        ratio = float(self.config.downsample_ratio)
        side = round(1 / ratio)
        if not math.isclose(side * ratio, 1.0):
            raise ValueError(
                f"InternVL downsample_ratio={ratio} is not 1 / an integer; vtprune maps patches to tokens "
                "for integer pixel-shuffle factors only"
            )
        return ratio

    def token_patch_ids(self, patches: int, device=None) -> torch.Tensor:
        """``[patches * r**2, 1 / r**2]`` int64: for each LLM token of one tile of ``patches`` raw patches (CLS
        excluded), the patch indices (row-major in the tile's patch grid) the model's ``pixel_shuffle`` concatenates
        into it, in concatenation order (``r = downsample_ratio``). Computed by running the model's own
        ``pixel_shuffle`` on a grid of patch ids."""
        side = math.isqrt(patches)
        if side * side != patches:
            raise ValueError(f"an InternVL tile of {patches} patches is not a square grid")
        ratio = self._ratio()
        ids = torch.arange(patches, dtype=torch.float64, device=device).view(1, side, side, 1)
        shuffled = self.inner.pixel_shuffle(ids, scale_factor=ratio)  # [1, side * r, side * r, 1 / r**2]
        return shuffled.reshape(-1, shuffled.shape[-1]).round().long()

    def tile_patches(self) -> int:
        """Raw patches of one tile (CLS excluded): ``(image_size / patch_size)**2`` of the vision config."""
        vcfg = self.config.vision_config
        size, patch = vcfg.image_size, vcfg.patch_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        patch = tuple(patch) if isinstance(patch, (list, tuple)) else (patch, patch)
        return (size[0] // patch[0]) * (size[1] // patch[1])

    # -- tiles -------------------------------------------------------------------------------------
    def crop_counts(self, call: dict[str, Any], num_images: int) -> list[int]:
        return [1] * num_images  # one feature tensor per tile; the engine joins an image's tiles (``tiled``)

    def pack_crop_scores(self, scores: torch.Tensor, call: dict[str, Any], index: int) -> torch.Tensor:
        """Scores of one tile's crops ``[C, P]`` -> its LLM tokens ``[C * T]``, in prompt order. ``P`` raw patches
        (CLS dropped, e.g. 1024 = 32 x 32): each token gets the sum of its 2 x 2 patches' scores, taken through the
        model's pixel shuffle (:meth:`token_patch_ids`). ``P = T`` (e.g. 256: scores of the projector's input rows,
        already one per token): unchanged. Any other ``P`` raises ``ValueError``."""
        if scores.ndim != 2:
            raise ValueError(f"expected per-crop scores [crops, patches], got shape {tuple(scores.shape)}")
        p, raw = scores.shape[1], self.tile_patches()
        tokens = raw // round(1 / self._ratio()) ** 2
        if p == raw:
            ids = self.token_patch_ids(p, scores.device)  # [T, 4]
            return scores[:, ids].sum(-1).reshape(-1)
        if p == tokens:
            return scores.reshape(-1)
        raise ValueError(
            f"InternVL tile scores over {p} entries are neither per raw patch ({raw} per tile) nor per "
            f"LLM token ({tokens} per tile)"
        )

    def token_patches(self, call: dict[str, Any], index: int, crops: int, patches: int) -> torch.Tensor:
        """``[crops * T, 4]``: the flat ids ``c * P + p`` of the patches each LLM token of the tile's crops carries,
        in the order the pixel shuffle concatenates them (:meth:`token_patch_ids`)."""
        ids = self.token_patch_ids(patches)
        return torch.cat([ids + c * patches for c in range(crops)])

    # -- attention each patch receives (importance="received") -------------------------------------
    def vision_qk(self, module, args, kwargs):
        """InternViT attention: ``q_proj`` / ``k_proj`` on ``[tiles, 1 + P, D]`` then the whole-width ``q_norm`` /
        ``k_norm`` (RMSNorm on InternViT-6B, identity elsewhere), no rotary embedding; each tile attends within itself
        (CLS included). Split per tile by the default :meth:`split_vision_tokens` (CLS dropped)."""
        return qk_from_projections(module, args, kwargs)

    # -- projector ---------------------------------------------------------------------------------
    def projector_module(self):
        return self.inner.multi_modal_projector

    def projector(self):
        return self.inner.multi_modal_projector  # LayerNorm + Linear + GELU + Linear: already per token

    def split_projector_inputs(self, captured, call, counts):
        """The projector ran once on ``[tiles, T, 4 * D_vit]`` (pixel-shuffled tokens, one row per LLM token)."""
        if captured.ndim != 3 or captured.shape[0] != sum(counts):
            raise RuntimeError(
                f"InternVL projector input of shape {tuple(captured.shape)} does not hold one row "
                f"block per tile for {sum(counts)} tiles"
            )
        return list(torch.split(captured, counts))

    # -- the downsampling baseline: fewer tiles ----------------------------------------------------------------
    def tile_tokens(self) -> int:
        """LLM tokens of one tile: its raw patches pixel-shuffled by ``downsample_ratio`` (256 for 448 px / 14)."""
        return round(self.tile_patches() * self._ratio() ** 2)

    def check_downsample(self, budget: int, processor: Any = None) -> None:
        per_tile = self.tile_tokens()
        if budget < per_tile:
            raise ValueError(
                f"downsample: budget {budget} is below one InternVL tile ({per_tile} visual tokens): the smallest "
                "input InternVL takes is the whole image resized to one tile; give a budget >= "
                f"{per_tile} (one tile), {3 * per_tile} (two tiles + thumbnail), ..."
            )
        seq = getattr(processor, "image_seq_length", per_tile) if processor is not None else per_tile
        if seq != per_tile:
            raise ValueError(
                f"downsample: the processor puts {seq} image tokens per tile, the model config {per_tile}; "
                "they must agree"
            )

    def downsample_inputs(self, processor: Any, images: list, budget: int) -> tuple[list, Any]:
        """Fewer tiles: a copy of ``processor`` whose image processor tiles each image into at most ``m`` tiles, the
        most whose tokens fit ``budget`` (``T`` per tile: one tile alone is ``T`` tokens, ``n >= 2`` tiles come with
        the thumbnail, ``(n + 1) T``), i.e. ``max_patches = 1`` below ``3 T`` and ``budget // T - 1`` above. The
        processor still picks the tile grid closest to each image's aspect ratio among those of at most ``m``
        tiles (``get_optimal_tiled_canvas``), so an image may use fewer tokens than the budget (as the unreduced
        model may use fewer than ``max_patches``): the row reports what ran. Images are not resized (every tile is
        resized to the tile size anyway). When the processor already tiles into no more than ``m``, it is returned
        as it is."""
        self.check_downsample(budget, processor)
        per_tile = self.tile_tokens()
        tiles = max(1, budget // per_tile - 1) if budget >= 3 * per_tile else 1
        ip = processor.image_processor
        if int(ip.max_patches) <= tiles:
            return images, processor
        out = copy.copy(processor)
        out.image_processor = copy.copy(ip)
        out.image_processor.max_patches = tiles
        out.image_processor.min_patches = min(int(ip.min_patches), tiles)
        return images, out


# -- analytic FLOPs of the vision tower and projector (vtprune.flops) ----------------------------------------
def internvl_vision_flops(config, num_images, image_grid_thw, num_frames) -> int:
    """Vision FLOPs of InternVL (InternViT, pixel shuffle, projector) for ``num_images`` tiles, see
    :mod:`vtprune.flops`."""
    flops.no_grid(config, image_grid_thw, "pass num_images (the number of tiles) instead")
    flops.no_frames(config, num_frames)
    num_tiles = flops.as_count(num_images, "num_images")
    vcfg = flops.require(config, "vision_config", "internvl config")
    vtype = getattr(vcfg, "model_type", None)
    if vtype != "internvl_vision":
        raise ValueError(
            f"vision tower of model_type {vtype!r} in an 'internvl' config is not supported; supported: "
            "['internvl_vision']"
        )
    what = "InternViT vision config"
    dv = int(flops.require(vcfg, "hidden_size", what))
    iv = int(flops.require(vcfg, "intermediate_size", what))
    lv = int(flops.require(vcfg, "num_hidden_layers", what))
    (h, w), (ph, pw) = (
        flops.pair(flops.require(vcfg, "image_size", what), "image_size"),
        flops.pair(flops.require(vcfg, "patch_size", what), "patch_size"),
    )
    c = int(getattr(vcfg, "num_channels", 3) or 3)
    n = (h // ph) * (w // pw)
    s = n + 1  # + CLS
    ratio = float(flops.require(config, "downsample_ratio", "internvl config"))
    f = round(1 / ratio) ** 2  # patches per LLM token
    if n % f:
        raise ValueError(f"a tile of {n} patches cannot be pixel-shuffled by downsample_ratio={ratio}")
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ValueError(
            f"vision_feature_select_strategy {strategy!r} is not supported for InternVL (its pixel "
            "shuffle needs the square patch grid without CLS); supported: 'default'"
        )
    dt = int(flops.require(flops.text_config_of(config), "hidden_size", "text config"))
    tokens = n // f
    per_tile = (
        2 * n * c * ph * pw * dv  # patch embedding conv
        + lv * flops.vit_layer_flops(s, dv, iv, 2, s * s)  # all encoder layers
        + 2 * tokens * (f * dv) * dt
        + 2 * tokens * dt * dt  # projector linear_1, linear_2
    )
    return num_tiles * per_tile


flops.register_vision_flops(("internvl",), internvl_vision_flops)
