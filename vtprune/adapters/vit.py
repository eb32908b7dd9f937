"""Vision-transformer hosts: what vtprune needs to know to reduce tokens between the blocks of a plain ViT.

A host names the blocks, the number of prefix tokens (CLS / distillation / register tokens, never reduced), where
each block's queries and keys can be read without changing its attention kernel (a forward hook on a module whose
output is the per-head q or k), and how to run one block in two halves — attention (with an additive key bias,
ToMe's proportional attention) and MLP — so that a method can act between them, where ToMe, PiToMe and Zero-TPrune
act in their official codes.

Hosts: timm ``VisionTransformer`` (and models built on it with pre-norm ``Block`` blocks), transformers
``CLIPVisionModel`` / ``SiglipVisionModel`` (and their ``*VisionTransformer`` cores), open_clip ``CLIP`` /
``VisionTransformer`` (batch-first or not).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ViTHost", "find_vit_host", "vit_host_names"]


class ViTHost:
    """Base: ``blocks`` (list of modules), ``num_prefix`` tokens, ``num_heads``, ``scale`` (attention logit scale)."""

    name = "vit"
    batch_first = True

    def __init__(self, model: nn.Module):
        self.model = model

    # -- facts -------------------------------------------------------------------------------------------------
    blocks: list
    num_prefix: int
    num_heads: int

    def num_patches(self) -> int | None:
        """Patch tokens per image at the configured input size (None when only known at forward time)."""
        return None

    def scale(self, block) -> float:
        raise NotImplementedError

    def dims(self) -> tuple[int, int, int]:
        """``(hidden size D, MLP hidden size I, patch-embedding weight elements D*C*P*P)`` for ``vtprune.flops``."""
        raise NotImplementedError

    def qk_modules(self, block) -> tuple[nn.Module, nn.Module] | None:
        """Modules whose forward outputs are this block's queries and keys (see :meth:`to_heads`), or None when
        they must be recomputed from the block's normalised input (:meth:`recompute_qk`)."""
        raise NotImplementedError

    def to_heads(self, block, t: torch.Tensor) -> torch.Tensor:
        """A captured q / k module output as ``[B, H, T, Dh]``."""
        raise NotImplementedError

    def recompute_qk(self, block, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # -- running one block in two halves -------------------------------------------------------------------------
    def attention_half(self, block, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``(x + attention(norm(x)), norm(x))`` with an additive attention bias ``[B, 1, 1, T]`` (None: none)."""
        raise NotImplementedError

    def mlp_half(self, block, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check_call(self, args, kwargs) -> None:
        """Refuse block calls whose extra arguments (an attention mask) a reduced token set cannot honour."""


# ------------------------------------------------------------------------------------------------ timm
class TimmHost(ViTHost):
    name = "timm"

    def __init__(self, model):
        super().__init__(model)
        from timm.layers import Attention
        from timm.models.vision_transformer import Block

        self.blocks = list(model.blocks)
        if not self.blocks:
            raise ValueError(f"{type(model).__name__} has no transformer blocks")
        for i, blk in enumerate(self.blocks):
            if type(blk).forward is not Block.forward or not isinstance(getattr(blk, "attn", None), Attention):
                raise ValueError(
                    f"{type(model).__name__}.blocks[{i}] is a {type(blk).__name__} with attention "
                    f"{type(getattr(blk, 'attn', None)).__name__}; token reduction supports timm's pre-norm Block with "
                    "timm.layers.Attention (ViT / DeiT / CLIP-style timm models), not parallel, post-norm or "
                    "rotary-attention blocks"
                )
        self.num_prefix = int(model.num_prefix_tokens)
        self.num_heads = self.blocks[0].attn.num_heads

    def num_patches(self):
        grid = getattr(self.model.patch_embed, "num_patches", None)
        return int(grid) if grid else None

    def scale(self, block):
        return block.attn.scale

    def dims(self):
        blk = self.blocks[0]
        return blk.norm1.normalized_shape[0], blk.mlp.fc1.out_features, self.model.patch_embed.proj.weight.numel()

    def qk_modules(self, block):
        return block.attn.q_norm, block.attn.k_norm  # outputs [B, H, T, Dh]

    def to_heads(self, block, t):
        return t

    def attention_half(self, block, x, bias):
        h = block.norm1(x)
        return x + block.drop_path1(block.ls1(block.attn(h, attn_mask=bias))), h

    def mlp_half(self, block, x):
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    def check_call(self, args, kwargs):
        mask = args[0] if args else kwargs.get("attn_mask")
        if mask is not None or kwargs.get("is_causal") or (len(args) > 1 and args[1]):
            raise ValueError(
                "token reduction cannot honour an attention mask / causal attention passed to the "
                "blocks (timm NaFlex masks): call the patched model without attn_mask"
            )


# ------------------------------------------------------------------------------------------------ transformers
_HF_TYPES = {"clip_vision_model": 1, "siglip_vision_model": 0}


class HFHost(ViTHost):
    name = "transformers"

    def __init__(self, model, core):
        super().__init__(model)
        self.core = core  # the *VisionTransformer with .embeddings / .encoder
        self.blocks = list(core.encoder.layers)
        self.num_prefix = _HF_TYPES[model.config.model_type]
        attn = self.blocks[0].self_attn
        self.num_heads = attn.num_heads

    def num_patches(self):
        return int(self.core.embeddings.num_patches)

    def scale(self, block):
        return block.self_attn.scale

    def dims(self):
        blk = self.blocks[0]
        return (blk.self_attn.embed_dim, blk.mlp.fc1.out_features, self.core.embeddings.patch_embedding.weight.numel())

    def qk_modules(self, block):
        return block.self_attn.q_proj, block.self_attn.k_proj  # outputs [B, T, H * Dh]

    def to_heads(self, block, t):
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, -1).transpose(1, 2)

    def attention_half(self, block, x, bias):
        h = block.layer_norm1(x)
        out, _ = block.self_attn(hidden_states=h, attention_mask=bias)
        return x + out, h

    def mlp_half(self, block, x):
        return x + block.mlp(block.layer_norm2(x))

    def check_call(self, args, kwargs):
        mask = args[0] if args else kwargs.get("attention_mask")
        if mask is not None:
            raise ValueError("token reduction cannot honour an attention mask passed to the vision encoder layers")


# ------------------------------------------------------------------------------------------------ open_clip
class OpenCLIPHost(ViTHost):
    name = "open_clip"

    def __init__(self, model, visual):
        super().__init__(model)
        from open_clip.transformer import ResidualAttentionBlock

        self.visual = visual
        transformer = visual.transformer
        self.blocks = list(transformer.resblocks)
        for i, blk in enumerate(self.blocks):
            if type(blk).forward is not ResidualAttentionBlock.forward or not isinstance(
                blk.attn, nn.MultiheadAttention
            ):
                raise ValueError(
                    f"open_clip resblocks[{i}] is a {type(blk).__name__}; token reduction supports "
                    "ResidualAttentionBlock with nn.MultiheadAttention"
                )
        self.batch_first = bool(getattr(transformer, "batch_first", True))
        self.num_prefix = 0 if getattr(visual, "class_embedding", None) is None else 1
        self.num_heads = self.blocks[0].attn.num_heads

    def num_patches(self):
        gh, gw = self.visual.grid_size
        return int(gh * gw)

    def scale(self, block):
        return (block.attn.embed_dim // block.attn.num_heads) ** -0.5

    def dims(self):
        blk = self.blocks[0]
        return blk.attn.embed_dim, blk.mlp.c_fc.out_features, self.visual.conv1.weight.numel()

    def qk_modules(self, block):
        return None

    def recompute_qk(self, block, h):
        attn = block.attn
        d = attn.embed_dim
        w, bias = attn.in_proj_weight, attn.in_proj_bias
        q = F.linear(h, w[:d], None if bias is None else bias[:d])
        k = F.linear(h, w[d : 2 * d], None if bias is None else bias[d : 2 * d])
        b, n, _ = h.shape
        return (q.view(b, n, self.num_heads, -1).transpose(1, 2), k.view(b, n, self.num_heads, -1).transpose(1, 2))

    def attention_half(self, block, x, bias):
        h = block.ln_1(x)
        mask = None
        if bias is not None:
            b, t = x.shape[0], x.shape[1]
            mask = bias.expand(b, self.num_heads, t, t).reshape(b * self.num_heads, t, t).to(h.dtype)
        hh = h if block.attn.batch_first else h.transpose(0, 1)
        out = block.attn(hh, hh, hh, need_weights=False, attn_mask=mask)[0]
        out = out if block.attn.batch_first else out.transpose(0, 1)
        return x + block.ls_1(out), h

    def mlp_half(self, block, x):
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def check_call(self, args, kwargs):
        names = ("k_x", "v_x", "attn_mask")
        given = {**dict(zip(names, args)), **{n: kwargs.get(n) for n in names if n in kwargs}}
        if any(v is not None for v in given.values()):
            raise ValueError(
                "token reduction supports plain self-attention open_clip blocks (no k_x / v_x / "
                f"attn_mask), got {sorted(n for n, v in given.items() if v is not None)}"
            )


def _is_instance(model, module_name: str, class_name: str) -> bool:
    import sys

    mod = sys.modules.get(module_name)
    cls = getattr(mod, class_name, None) if mod is not None else None
    return cls is not None and isinstance(model, cls)


def find_vit_host(model) -> ViTHost | None:
    """The host for ``model`` if it is a ViT vtprune can reduce tokens in, else None (no import of libraries the
    model cannot come from)."""
    if _is_instance(model, "timm.models.vision_transformer", "VisionTransformer"):
        return TimmHost(model)
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) in _HF_TYPES:
        core = getattr(model, "vision_model", model)
        if hasattr(core, "encoder") and hasattr(core, "embeddings"):
            return HFHost(model, core)
    if _is_instance(model, "open_clip.model", "CLIP") and _is_instance(
        getattr(model, "visual", None), "open_clip.transformer", "VisionTransformer"
    ):
        return OpenCLIPHost(model, model.visual)
    if _is_instance(model, "open_clip.transformer", "VisionTransformer"):
        return OpenCLIPHost(model, model)
    return None


def vit_host_names() -> list[str]:
    return [
        "timm VisionTransformer",
        "transformers CLIPVisionModel / SiglipVisionModel",
        "open_clip CLIP / VisionTransformer",
    ]
