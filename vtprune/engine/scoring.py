"""A decoder point's signals in prefill: from what the hooks on layer K-1 captured (:class:`~.forward.LayerCapture`:
its ``q_proj`` / ``k_proj`` outputs and rotary tables), or recomputed on layer K's own input (``layer_attention``),
as a :class:`~.forward.PointSignals` on the current sequence."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..signals import query_attention, rope_keys, rope_ones, rope_queries, rope_query
from .capture import outside_checkpoint
from .forward import Forward, LayerCapture, PointSignals, Queries
from .plan import PrunePoint


def install_capture(installed, attn, point: PrunePoint, current: Callable[[], Forward | None]) -> None:
    """Hooks on layer K-1's attention ``attn`` that fill the prefill's ``fwd.capture`` (``current()``: the forward
    in progress) with its rotary tables and k_proj / q_proj outputs, as ``point`` needs them."""

    def capture(name: str):
        def hook(module, args, out_or_kwargs, output=None):
            fwd = current()
            if fwd is None or not fwd.prefill or fwd.cols is None:  # prefill, units found: points run in layer order
                return None
            if name == "rope":
                fwd.capture.rope = out_or_kwargs["position_embeddings"]
            elif name == "last_query":  # inside layer K-1, which activation checkpointing may recompute in backward
                with outside_checkpoint():
                    fwd.capture.last_query = out_or_kwargs[torch.arange(out_or_kwargs.shape[0]), fwd.last]
            else:
                setattr(fwd.capture, name, out_or_kwargs)
            return None

        return hook

    installed.hook(attn.register_forward_pre_hook(capture("rope"), with_kwargs=True))
    installed.hook(attn.k_proj.register_forward_hook(capture("keys")))
    if point.needs_text_attention:
        installed.hook(attn.q_proj.register_forward_hook(capture("last_query")))
    if "queries" in point.method.signals:
        installed.hook(attn.q_proj.register_forward_hook(capture("queries")))


def positions_1d(fwd: Forward, compact: bool) -> torch.Tensor:
    """1-D positions of the current sequence's slots: numbered from the attention mask (whatever the caller passed,
    so position-dependent signals do not depend on left padding), or, ``positions="compact"``, each row's present
    tokens counted 0, 1, ... (what every compaction renumbers them to)."""
    if compact:
        return (fwd.real.long().cumsum(1) - 1).clamp(min=0)
    numbered = (fwd.mask2d.long().cumsum(1) - 1).clamp(min=0)
    return numbered.gather(1, fwd.cols)


def point_signals(
    point: PrunePoint, fwd: Forward, adapter, rope_fn, hidden=None, layer_rope=None, compact: bool = False
) -> PointSignals:
    """The point's signals on the current sequence: from layer K-1's captured q_proj / k_proj outputs
    (``text_attention``, ``keys``, ``queries``, ``rope_gravity``), or recomputed on layer K's input ``hidden`` with
    layer K's input norm, q/k projections and rotary tables ``layer_rope`` (``layer_attention``). Takes (and clears)
    ``fwd.capture``."""
    wanted = point.method.signals
    captured, fwd.capture = fwd.capture, LayerCapture()
    out = PointSignals()
    last = fwd.last
    cols = torch.arange(fwd.real.shape[1], device=fwd.real.device)
    causal = fwd.real & (cols[None, :] <= last[:, None])

    def visible(layer):  # what the last token sees at ``layer``: causal, and a sliding layer's window
        window = adapter.sliding_window(layer)
        return causal if window is None else causal & (cols[None, :] > last[:, None] - window)

    if point.reads_previous_layer:
        signal_layer = point.layer - 1
        attn = adapter.decoder_layers[signal_layer].self_attn
        rope = captured.rope
        if not adapter.mrope:
            rope = adapter.rotary(captured.keys, positions_1d(fwd, compact), signal_layer)
        k = rope_keys(attn, captured.keys, rope, rope_fn)
        if point.needs_text_attention:
            q = rope_query(attn, captured.last_query, rope, last, rope_fn, gated=adapter.gated_query)
            out.text_attention = query_attention(q, k, attn.scaling, visible(signal_layer))
        if "keys" in wanted:
            out.keys = k.transpose(1, 2).reshape(k.shape[0], k.shape[2], -1)
        if "queries" in wanted:
            queries = rope_queries(attn, captured.queries, rope, rope_fn, gated=adapter.gated_query)
            out.queries = Queries(queries, k, attn.scaling, adapter.sliding_window(signal_layer))
        if "rope_gravity" in wanted:
            out.rope_gravity = rope_ones(k, rope, rope_fn)
    if "layer_attention" in wanted:
        attn = adapter.decoder_layers[point.layer].self_attn
        # differentiable like the captured signals (the compression-aware attack reaches pdrop through it); under
        # inference (no_grad / inference_mode) it builds no graph
        x = adapter.input_norm(point.layer)(hidden)
        rope = layer_rope if adapter.mrope else adapter.rotary(hidden, positions_1d(fwd, compact), point.layer)
        k = rope_keys(attn, attn.k_proj(x), rope, rope_fn)
        q_rows = attn.q_proj(x[torch.arange(x.shape[0], device=x.device), last])
        q = rope_query(attn, q_rows, rope, last, rope_fn, gated=adapter.gated_query)
        out.text_attention = query_attention(q, k, attn.scaling, visible(point.layer))
    return out
