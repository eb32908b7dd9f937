"""Install / remove token reduction inside a vision transformer (one patched ViT instance).

Each block's ``forward`` is replaced *on the instance* (an instance attribute shadowing the class method; ``unpatch``
deletes it), and forward hooks on the modules that output q and k keep a reference to the block's queries and keys
(the attention kernel — SDPA — is untouched; attention rows a method needs are recomputed from q / k). A block with
nothing to do (no reduction, no token sizes yet) runs its own forward unchanged, so keep-all is the stock model.

A reducing block runs in two halves, as the official codes do: ``x + attn(norm(x))`` (with ``log(size)`` added to
the attention logits when the method uses proportional attention), then the method's plan on the block's head-mean
keys merges or drops tokens (size-weighted means, sizes tracked), then ``x + mlp(norm(x))``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..functional import vit as FV
from ..timing import clock, elapsed_ms


@dataclass
class ViTStats:
    """What the last forward pass of a patched ViT did. ``block_tokens[l]``: tokens (prefix included) entering
    block ``l``; ``patch_tokens_in`` the image's patch tokens, ``patch_tokens_last`` those entering the last block;
    ``select_ms`` wall time of the plans. ``flops`` / ``flops_full``: analytic FLOPs of the whole batch of
    ``batch`` images, reduced / unreduced (``vtprune.flops.vit_flops(model, stats.block_flops_tokens,
    batch=stats.batch)``; ``vit_flops`` without ``batch=`` counts one image); ``flops_ratio`` their ratio."""

    method: str
    batch: int
    num_prefix: int
    patch_tokens_in: int
    patch_tokens_last: int
    block_tokens: list[int] = field(default_factory=list)
    block_tokens_out: list[int] = field(default_factory=list)
    select_ms: float = 0.0
    flops: int = 0
    flops_full: int = 0
    stage: str = "vit"

    @property
    def block_flops_tokens(self) -> list[tuple[int, int]]:
        """Per block ``(tokens entering, tokens after the block's reduction)`` (what ``vtprune.flops.vit_flops``
        takes)."""
        return list(zip(self.block_tokens, self.block_tokens_out))

    @property
    def flops_ratio(self) -> float:
        """``flops / flops_full`` (as ``PruneStats.flops_ratio``)."""
        return self.flops / self.flops_full if self.flops_full else 1.0

    @property
    def visual_tokens_in(self) -> list[int]:
        return [self.patch_tokens_in] * self.batch

    @property
    def visual_tokens_kept(self) -> list[int]:
        return [self.patch_tokens_last] * self.batch


class _State:
    def __init__(self):
        self.reset()

    def reset(self):
        self.size = None  # [B, T, 1] token sizes once something merged
        self.schedule = None
        self.q = self.k = None
        self.tokens = []
        self.tokens_out = []
        self.select_s = 0.0
        self.batch = 0
        self.patches_in = 0
        self.group = None  # [B, P] (track_groups): slot each original patch's content sits in, -1 = dropped


class ViTSession:
    """The blocks of one ViT host, patched to run ``method``. ``track_groups``: follow every original patch to the
    token its content ends up in (``state.group`` ``[B, P]``: the slot, prefix tokens counted, or -1 for a dropped
    patch), for a host that maps the reduced tokens back to patch positions (a VLM's vision tower)."""

    def __init__(self, model, host, method, track_groups: bool = False):
        self.model = model
        self.host = host
        self.method = method
        self.methods = [method]
        self.track_groups = track_groups
        self.state = _State()
        self.stats: ViTStats | None = None
        self._handles = []
        self._wrapped = []

    # -------------------------------------------------------------------------------------------------- install
    def install(self):
        host = self.host
        for i, block in enumerate(host.blocks):
            if "forward" in vars(block):
                self.remove()
                raise ValueError(
                    f"block {i} ({type(block).__name__}) already has an instance-level forward (another "
                    "patch, e.g. the official ToMe/PiToMe apply_patch?); vtprune will not stack on it"
                )
            mods = host.qk_modules(block)
            if mods is not None:
                self._handles.append(mods[0].register_forward_hook(self._capture("q")))
                self._handles.append(mods[1].register_forward_hook(self._capture("k")))
            block.forward = self._make_forward(i, block)
            self._wrapped.append(block)

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for block in self._wrapped:
            vars(block).pop("forward", None)
        self._wrapped.clear()
        self.state.reset()

    def _capture(self, which):
        def hook(module, args, out):
            setattr(self.state, which, out)

        return hook

    # -------------------------------------------------------------------------------------------------- forward
    def _make_forward(self, index, block):
        host, method, state = self.host, self.method, self.state
        original = type(block).forward.__get__(block)
        num_blocks = len(host.blocks)
        protected = host.num_prefix

        def forward(*args, **kwargs):
            if args:
                x, rest = args[0], args[1:]
            else:
                name = next((n for n in ("x", "hidden_states", "q_x") if n in kwargs), None)
                if name is None:
                    raise TypeError(
                        f"{type(block).__name__} called without its input tokens (got keywords {sorted(kwargs)})"
                    )
                x, rest = kwargs.pop(name), ()
            seq_first = not host.batch_first
            if index == 0:
                state.reset()
                tokens = x.shape[0 if seq_first else 1]
                patches = tokens - protected
                state.schedule = method.schedule(patches, num_blocks)
                state.batch = x.shape[1 if seq_first else 0]
                state.patches_in = patches
                if self.track_groups:
                    state.group = (torch.arange(patches, device=x.device) + protected).expand(state.batch, -1)
            r = state.schedule[index] if state.schedule is not None else 0
            state.tokens.append(x.shape[0 if seq_first else 1])
            if r == 0 and state.size is None:
                out = original(x, *rest, **kwargs)
                self._finish(index, out, seq_first)
                return out
            host.check_call(rest, kwargs)
            h = x.transpose(0, 1) if seq_first else x
            size = state.size
            bias = None
            if size is not None and method.prop_attn:
                bias = size.log()[:, None, None, :, 0].to(h.dtype)
            state.q = state.k = None
            h, normed = host.attention_half(block, h, bias)
            if r > 0:
                t0 = clock()
                q, k = state.q, state.k
                if q is None:
                    q, k = host.recompute_qk(block, normed)
                else:
                    q, k = host.to_heads(block, q), host.to_heads(block, k)
                metric = k.mean(1)
                attn = None
                if method.needs_attention:
                    logits = (q.float() @ k.float().transpose(-1, -2)) * host.scale(block)
                    if bias is not None:
                        logits = logits + bias.float()
                    attn = logits.softmax(dim=-1)
                dest, t_out = method.plan(index, num_blocks, r, metric, attn, protected)
                h, state.size = FV.merge_tokens(h, dest, t_out, size)
                if state.group is not None:
                    moved = dest.gather(1, state.group.clamp(min=0))
                    state.group = torch.where(state.group >= 0, moved, state.group)
                state.select_s += elapsed_ms(t0) / 1e3
            h = host.mlp_half(block, h)
            out = h.transpose(0, 1) if seq_first else h
            self._finish(index, out, seq_first)
            return out

        return forward

    def _finish(self, index, out, seq_first):
        from ..flops import vit_flops

        state = self.state
        state.tokens_out.append(out.shape[0 if seq_first else 1])
        if index != len(self.host.blocks) - 1:
            return
        stats = ViTStats(
            method=self.method.name,
            batch=state.batch,
            num_prefix=self.host.num_prefix,
            patch_tokens_in=state.patches_in,
            patch_tokens_last=state.tokens[-1] - self.host.num_prefix,
            block_tokens=list(state.tokens),
            block_tokens_out=list(state.tokens_out),
            select_ms=state.select_s * 1e3,
        )
        if state.patches_in == self.host.num_patches():
            stats.flops = vit_flops(self.model, stats.block_flops_tokens, batch=state.batch)
            stats.flops_full = vit_flops(self.model, batch=state.batch)
        self.stats = stats
