"""Gemma 3 (``gemma3``): SigLIP tower without CLS token, a projector that average-pools each image's patch grid to a
fixed number of tokens (``mm_tokens_per_image``), image tokens wrapped in boi / eoi, and a decoder of sliding-window
(local) and global layers with their own rotary bases.

Image tokens attend to each other bidirectionally: the host marks them with ``token_type_ids`` (1: image) and turns
each contiguous run of them into one block of its masks (``get_block_sequence_ids_for_mask``). The engine compacts the
types with the sequence and rebuilds the blocks, so after pruning each block covers exactly an image's kept tokens.
Pan-and-scan crops are extra images (each with its own boi / eoi run): each is pruned as an image of its own.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .. import flops
from .base import ModelAdapter, encoder_attention_modules, qk_from_projections


class _PooledProjector(nn.Module):
    """Gemma 3's projector as a per-token map: ``[N, k*k * D_vit]`` (the ``k x k`` patches one token averages,
    concatenated in :meth:`Gemma3Adapter.split_projector_inputs`'s order) -> ``[N, D_lm]``: their mean, the soft
    embedding norm, the input projection (the model's own weights)."""

    def __init__(self, projector: nn.Module, vit_dim: int):
        super().__init__()
        self.projector, self.vit_dim = projector, vit_dim

    def forward(self, x):
        pooled = x.reshape(x.shape[0], -1, self.vit_dim).mean(1)
        normed = self.projector.mm_soft_emb_norm(pooled)
        return torch.matmul(normed, self.projector.mm_input_projection_weight).type_as(x)


class Gemma3Adapter(ModelAdapter):
    model_types = ("gemma3",)
    has_cls_token = False
    token_types_key = "token_type_ids"
    rotary_per_layer_type = True

    # -- vision tower and projector -------------------------------------------------------------------------
    def vision_attention_modules(self):
        return encoder_attention_modules(self.inner.vision_tower, "has no SigLIP-style encoder.layers")

    def vision_qk(self, module, args, kwargs):
        return qk_from_projections(module, args, kwargs)  # SigLIP: q_proj / k_proj on [images, P, D], no CLS

    def token_patches(self, call, index, crops, patches):
        """``[T, k*k]``: each visual token's ``k x k`` window of the crop's patch grid (row-major inside the window, as
        :meth:`split_projector_inputs` concatenates them)."""
        side, k = self.pool_geometry()
        if crops != 1 or patches != side * side:
            raise ValueError(f"gemma3 images are one crop of {side * side} patches; got {crops} crop(s) of {patches}")
        grid = torch.arange(patches).view(side // k, k, side // k, k).permute(0, 2, 1, 3)
        return grid.reshape((side // k) ** 2, k * k)

    def image_tokens(self):
        return int(self.config.mm_tokens_per_image)

    def vit_dim(self) -> int:
        return int(self.config.vision_config.hidden_size)

    def pool_geometry(self) -> tuple[int, int]:
        """``(patches_per_side, kernel)``: the tower's patch grid side and the projector's pooling window side."""
        proj = self.inner.multi_modal_projector
        return int(proj.patches_per_image), int(proj.kernel_size)

    def projector_module(self):
        return self.inner.multi_modal_projector

    def projector(self):
        return _PooledProjector(self.inner.multi_modal_projector, self.vit_dim())

    def split_projector_inputs(self, captured, call, counts):
        # captured: [images, P, D] tower outputs (P = side * side patches, row-major) -> per image [1, T, k*k*D], one
        # row per visual token: the k x k window its average pools, row-major inside the window
        side, k = self.pool_geometry()
        b, _, d = captured.shape
        grid = captured.reshape(b, side // k, k, side // k, k, d).permute(0, 1, 3, 2, 4, 5)
        tokens = grid.reshape(b, (side // k) ** 2, k * k * d)
        return list(tokens.unsqueeze(1).unbind(0))  # one crop per image (pan-and-scan crops are images)

    def pack_crop_scores(self, scores, call, index):
        """``[1, P]`` per-patch scores (``P`` = the tower's patches) -> ``[T]`` per visual token, averaged over each
        token's window by the projector's own ``avg_pool`` (as the model pools features); ``[1, T]`` scores that are
        already per visual token (rows of ``projector_inputs``: zoo, pool) are returned as they are."""
        side, k = self.pool_geometry()
        tokens = (side // k) ** 2
        if scores.ndim != 2 or scores.shape[0] != 1 or scores.shape[1] not in (side * side, tokens):
            raise ValueError(
                f"gemma3 scores per image must be [1, {side * side}] (patches) or [1, {tokens}] (visual "
                f"tokens); got {tuple(scores.shape)}"
            )
        if scores.shape[1] == tokens:
            return scores.reshape(-1)
        pool = self.inner.multi_modal_projector.avg_pool
        return pool(scores.reshape(1, 1, side, side)).reshape(-1)

    # -- decoder -------------------------------------------------------------------------------------------
    def block_ids(self, token_types: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` block ids of the host's bidirectional image blocks (each contiguous run of image tokens one id,
        -1 elsewhere) from ``token_types`` ``[B, L]``, by the host's own rule."""
        module = sys.modules[type(self.inner).__module__]
        return module.get_block_sequence_ids_for_mask(token_types, device=token_types.device)

    def rotary(self, hidden, position_ids, index: int):
        return self.language_model.rotary_emb(hidden, position_ids, self.layer_type(index))


# -- analytic FLOPs of the vision tower and projector (vtprune.flops) ----------------------------------------
def gemma3_vision_flops(config, num_images, image_grid_thw, num_frames) -> int:
    """Vision FLOPs of Gemma 3 (SigLIP, pooling projector), see :mod:`vtprune.flops`."""
    flops.no_grid(config, image_grid_thw)
    flops.no_frames(config, num_frames)
    num_images = flops.as_count(num_images, "num_images")
    vcfg = flops.require(config, "vision_config", "gemma3 config")
    what = "gemma3 SigLIP vision config"
    if getattr(vcfg, "vision_use_head", False):
        raise ValueError(
            "gemma3 vision config has vision_use_head=True (an attention-pooling head Gemma 3 does not "
            "use and its checkpoints do not have); vtprune.flops counts towers without it"
        )
    dv, iv = int(flops.require(vcfg, "hidden_size", what)), int(flops.require(vcfg, "intermediate_size", what))
    lv, p = int(flops.require(vcfg, "num_hidden_layers", what)), int(flops.require(vcfg, "patch_size", what))
    c = int(getattr(vcfg, "num_channels", 3) or 3)
    n = (int(flops.require(vcfg, "image_size", what)) // p) ** 2
    t = int(flops.require(config, "mm_tokens_per_image", "gemma3 config"))
    dt = int(flops.require(flops.text_config_of(config), "hidden_size", "text config"))
    per_image = 2 * n * c * p * p * dv + lv * flops.vit_layer_flops(n, dv, iv, 2, n * n) + 2 * t * dv * dt
    return num_images * per_image


flops.register_vision_flops(("gemma3",), gemma3_vision_flops)
