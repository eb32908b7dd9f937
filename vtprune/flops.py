r"""Analytic prefill FLOPs and KV-cache bytes of the VLMs vtprune patches.

Everything here is a pure function of ``transformers`` config objects (only attributes are read;
no weights, no forward pass), so it is cheap enough to call after every pruned forward
(``vtprune.stats(model).prefill_flops``) and in sweeps over budgets.

Counting convention
-------------------
* 1 multiply-add = 2 FLOPs.  Every matrix product is counted: every linear layer (including the
  MLP gate, q/k/v/o projections, lm_head, projector, patch merger), the convolutional patch
  embedding (as the matmul it is), and the two attention products ``Q K^T`` and ``A V``.
  This is what :class:`torch.utils.flop_counter.FlopCounterMode` counts; the tests check it on models run with
  eager attention (explicit matmuls, counted by every torch version: some do not count CPU SDPA calls).
* Causal attention is counted as the full ``S x S`` rectangle, as the eager path and the dense kernels
  compute it (up to tiling).
* Not counted: element-wise work (RMSNorm/LayerNorm, activations, the gate product, softmax, the
  attention scale, residual adds, bias adds, the RoPE tables and their application) and embedding
  look-ups.  (transformers 5.x builds the RoPE tables element-wise, so ``FlopCounterMode`` does not
  see them either; older versions used an ``inv_freq @ positions`` matmul of ~``S * Dh`` FLOPs per
  forward, negligible.)
* Dense compute only: padding in a batch is counted (every row is ``S`` long). MoE layers count the experts each
  token is routed to (top-k). Sliding-window layers (``layer_types`` entry ``"sliding_attention"``, window ``W =
  text_config.sliding_window``: Gemma 3's local layers) count ``Q K^T`` and ``A V`` over ``min(K, W)`` keys per
  query, what a windowed kernel computes; transformers' eager and SDPA paths compute the full ``S x K`` rectangle
  and mask it (the same count while ``K <= W``).

Symbols
-------
``S``  tokens a decoder layer processes (queries); ``K`` keys it attends to (``K = S`` in prefill);
``D``  hidden size; ``H`` attention heads; ``Hkv`` key/value heads (GQA); ``Dh`` head dim
(``config.head_dim`` or ``D // H``); ``I`` MLP intermediate size; ``V`` vocabulary size;
``L`` number of decoder layers; ``T`` tokens that go through lm_head; ``B`` batch size.

Decoder (LLaMA / Qwen2 style: GQA attention + gated SiLU MLP), one layer, one sequence::

    q_proj      2 * S * D * H*Dh
    k_proj      2 * S * D * Hkv*Dh
    v_proj      2 * S * D * Hkv*Dh
    o_proj      2 * S * H*Dh * D
    Q K^T       2 * S * K * H*Dh
    A V         2 * S * K * H*Dh
    MLP         3 * 2 * S * D * I          (gate_proj, up_proj, down_proj)

    prefill  = B * ( sum_{l<L} layer(S_l, K=S_l) + 2 * T * D * V )        (lm_head on T tokens)
    kv_bytes = 2 * Hkv * Dh * bytes(dtype) * B * sum_{l<L} S_l               (k and v)

``S_l`` may differ per layer (visual tokens pruned before layer K: ``S_l = S`` for ``l < K`` and the
pruned length after).  ``T`` defaults to 1: ``generate`` computes prefill logits for the last
position only.

CLIP ViT + LLaVA projector (LLaVA-1.5, LLaVA-NeXT), per image (per crop for LLaVA-NeXT AnyRes),
with ``P`` patch size, ``C`` channels, ``N = (image_size // P)**2`` patches, ``Sv = N + 1`` tokens
(CLS), ``Dv``, ``Iv``, ``Lv`` the vision hidden / intermediate size / layers, ``Dt`` the LLM hidden
size, ``F`` the number of feature layers concatenated (1 unless ``vision_feature_layer`` is a list)::

    patch conv  2 * N * C*P*P * Dv
    per layer   4 * 2 * Sv * Dv * Dv        (q, k, v, out_proj)
              + 2 * 2 * Sv * Sv * Dv        (Q K^T, A V; bidirectional)
              + 2 * 2 * Sv * Dv * Iv        (fc1, fc2)
    projector   2 * Np * F*Dv * Dt + 2 * Np * Dt * Dt
                (Np = N with vision_feature_select_strategy "default" (CLS dropped), N + 1 with "full")

HF runs *all* ``Lv`` encoder layers even though LLaVA reads layer -2 (``CLIPEncoder`` loops over
every layer and the wanted hidden state is picked afterwards), so all ``Lv`` layers are counted.

SigLIP ViT (LLaVA-OneVision): as CLIP with no CLS token (``Sv = N``, the projector sees ``Np = N`` tokens with
either strategy); the position embedding is a look-up. When ``vision_use_head`` is set (LLaVA-OneVision's
checkpoints unset it) the attention-pooling head runs too, with one probe query::

    head        2 * Dv*Dv + 2 * 2 * N * Dv*Dv + 2 * 2 * N * Dv + 2 * Dv*Dv + 2 * 2 * Dv * Iv
                (probe q, k and v of the patches, the probe's attention row and its values, out_proj, MLP)

Video frames (``num_frames``): each frame runs through the tower like one crop. LLaVA-OneVision projects every
patch, then pools (bilinear, not counted): a frame costs what a crop costs. LLaVA-NeXT-Video pools each frame's
grid before the projector (``vision_resampler``: average / max pooling, not counted; a ``conv`` resampler counts
``2 * N' * s*s*Dv * Dv'``), so its projector sees ``N' = (sqrt(N) // s)**2`` tokens per frame (``s`` the pool
stride).

Qwen2-VL ViT, per entry ``(t, h, w)`` of ``image_grid_thw``: ``n = t*h*w`` patches, ``Tp`` temporal
patch size, ``De = embed_dim``, ``Iv = int(De * mlp_ratio)``, ``Lv = depth``, ``m`` spatial merge size,
``Dout`` the merger output size (``vision_config.hidden_size``)::

    patch conv  2 * n * C*Tp*P*P * De
    per block   4 * 2 * n * De * De         (qkv (3 matmuls' worth) + proj)
              + 2 * 2 * t * (h*w)**2 * De   (full attention within each frame of each image)
              + 2 * 2 * n * De * Iv         (fc1, fc2)
    merger      2 * (n/m**2) * (m*m*De)**2 + 2 * (n/m**2) * (m*m*De) * Dout

Qwen2.5-VL ViT: as Qwen2-VL with ``De = hidden_size``, a gated MLP (``3 * 2 * n * De * Iv`` with
``Iv = intermediate_size``) and ``Dout = out_hidden_size``.  Blocks listed in
``fullatt_block_indexes`` attend within each frame (``4 * t * (h*w)**2 * De``); all other blocks
use window attention.  HF partitions each frame's ``(h/m) x (w/m)`` grid of merged tokens into
windows of ``ws x ws`` merged tokens, ``ws = window_size // m // P``, the last row/column of windows
being smaller; a window of ``r x c`` merged tokens holds ``m*m*r*c`` patches.  With ``r_i`` the
window row heights (``ws, ..., ws, (h/m) % ws``) and ``c_j`` the column widths::

    windowed attention  2 * 2 * De * t * m**4 * (sum_i r_i**2) * (sum_j c_j**2)

Qwen3-VL / Qwen3.5 ViT (``qwen3_vl``, ``qwen3_vl_moe``, ``qwen3_5``, ``qwen3_5_moe``): as Qwen2-VL with
``De = hidden_size``, a plain 2-matmul MLP (``Iv = intermediate_size``), full attention within each frame in every
block (the learned position embedding is interpolated with look-ups and element-wise weights: not counted), and
``1 + len(deepstack_visual_indexes)`` patch mergers of the same shape (the main one and one per DeepStack tap;
Qwen3.5 has none)::

    mergers     (1 + taps) * (2 * (n/m**2) * (m*m*De)**2 + 2 * (n/m**2) * (m*m*De) * Dout)

InternViT + pixel shuffle + InternVL projector (``internvl``), per tile (InternVL cuts an image into tiles of
``image_size`` plus a thumbnail; every tile runs through the tower on its own), with ``N = (H/P_h) * (W/P_w)``
patches of a tile (``image_size`` / ``patch_size``, pairs), ``Sv = N + 1`` tokens (CLS), ``Dv``, ``Iv``, ``Lv`` as
for CLIP, ``r`` = ``downsample_ratio`` (0.5) and ``f = 1 / r**2`` patches per LLM token::

    patch conv  2 * N * C*P_h*P_w * Dv
    per layer   4 * 2 * Sv * Dv * Dv        (q, k, v, projection_layer)
              + 2 * 2 * Sv * Sv * Dv        (Q K^T, A V; bidirectional)
              + 2 * 2 * Sv * Dv * Iv        (fc1, fc2)
    projector   2 * (N/f) * (f*Dv) * Dt + 2 * (N/f) * Dt * Dt      (linear_1, linear_2 on the shuffled tokens)

The pixel shuffle is a reshape (no FLOPs); q/k norms (InternViT-6B), the layer scales and the projector's LayerNorm
are element-wise. All ``Lv`` layers run whatever ``vision_feature_layer`` is read.

SigLIP + Gemma 3 projector (``gemma3``), per image (a pan-and-scan crop is an image), with ``N = (image_size //
P)**2`` patches (no CLS), ``T = mm_tokens_per_image`` (the projector average-pools the patch grid to ``T`` tokens:
element-wise, not counted; then its soft-embedding RMSNorm and one ``Dv x Dt`` matmul)::

    patch conv  2 * N * C*P*P * Dv
    per layer   4 * 2 * N * Dv * Dv + 2 * 2 * N * N * Dv + 2 * 2 * N * Dv * Iv
    projector   2 * T * Dv * Dt

Decoder layer kinds beyond LLaMA / Qwen2 (``text_config.layer_types``, one sequence of ``S`` tokens):

* Gemma 3: LLaMA-style layers (q/k norms and the gated GELU MLP have the same matmuls); sliding layers as above.

* Qwen3.5 full attention is gated: ``q_proj`` maps to ``2*H*Dh`` (query and output gate), ``+ 2 * S * D * H*Dh``.
* Qwen3.5 Gated DeltaNet (``linear_attention``), with ``Hk``/``Hv`` key/value heads of ``dk``/``dv`` dims,
  ``Kd = Hk*dk``, ``Vd = Hv*dv``, conv kernel ``w``, chunk ``C = 64`` and ``Sp = ceil(S / C) * C``::

      projections  2 * S * D * (2*Kd + Vd)  +  2 * S * D * Vd  +  2 * 2 * S * D * Hv  +  2 * S * Vd * D
      conv1d       2 * (S + w - 1) * (2*Kd + Vd) * w          (depthwise, padded output, as computed)
      chunked rule Hv * Sp * (4*C*dk + 2*C*dv + 6*dk*dv)       (intra-chunk products and the scan)
      UT solves    Hv * (Sp / C) * C*(C-1) * (dv + dk)         (two unit-triangular solves per chunk)

  The state a linear layer keeps for decoding does not grow with ``S``: ``Hv*dk*dv`` recurrent + ``(2*Kd+Vd)*w``
  conv values per sequence (:func:`linear_state_bytes`); :func:`kv_cache_bytes` counts attention layers only.
* MoE MLP (``num_experts``, top-``k`` routing, ``moe_intermediate_size`` ``Ie``; Qwen3-VL-MoE: every
  ``decoder_sparse_step``-th layer not in ``mlp_only_layers``; Qwen3.5-MoE: every layer), active compute::

      router 2 * S * D * E  +  experts k * 3 * 2 * S * D * Ie  (+ shared expert 3 * 2 * S * D * Is + gate 2 * S * D)

  FlopCounterMode sees the experts only when they run eagerly (``grouped_mm`` is not counted); the tests count
  them that way.

Vision FLOPs are for all the images given (``num_images`` / all rows of ``image_grid_thw``); they
are not multiplied by the batch size.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "decoder_layer_flops",
    "decoder_prefill_flops",
    "vision_flops",
    "prefill_flops",
    "kv_cache_bytes",
    "linear_state_bytes",
    "supported_model_types",
    "register_vision_flops",
    "register_gated_query",
]

#: per top-level ``config.model_type``, its vision tower + projector counter (registered by ``vtprune.adapters``)
_VISION: dict[str, Callable] = {}
#: text ``model_type`` values whose full-attention ``q_proj`` also projects an output gate (registered by adapters)
_GATED_QUERY: set[str] = set()
#: chunk length of transformers' chunked gated delta rule (``torch_chunk_gated_delta_rule``)
DELTA_RULE_CHUNK = 64


# --------------------------------------------------------------------------- input checking
def as_count(value, name: str) -> int:
    """A non-negative Python int from an int-like (int, numpy/torch integer scalar)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a non-negative int, got bool {value!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex():
            raise TypeError(
                f"{name} must be a non-negative int, got tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
            )
        value = value.item()
    try:
        out = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a non-negative int, got {type(value).__name__} {value!r}") from None
    if out < 0:
        raise ValueError(f"{name} must be a non-negative int, got {out}")
    return out


def require(cfg, attr: str, what: str):
    value = getattr(cfg, attr, None)
    if value is None:
        raise ValueError(f"{what} ({type(cfg).__name__}) has no `{attr}`; cannot count its FLOPs")
    return value


def text_config_of(config):
    """Accept a text config or a top-level VLM config (use its ``text_config``)."""
    sub = getattr(config, "text_config", None)
    return sub if sub is not None else config


def _attn_dims(text_config) -> tuple[int, int, int, int]:
    """(D, H, Hkv, Dh) of a decoder config."""
    what = "text config"
    d = require(text_config, "hidden_size", what)
    h = require(text_config, "num_attention_heads", what)
    hkv = getattr(text_config, "num_key_value_heads", None) or h
    dh = getattr(text_config, "head_dim", None) or d // h
    return int(d), int(h), int(hkv), int(dh)


def _num_layers(text_config) -> int:
    return int(require(text_config, "num_hidden_layers", "text config"))


def _layer_lens(text_config, layer_seq_lens, name: str = "layer_seq_lens") -> list[int]:
    """One sequence length per decoder layer, from an int or a per-layer sequence."""
    num_layers = _num_layers(text_config)
    if isinstance(layer_seq_lens, torch.Tensor):
        if layer_seq_lens.dim() == 0:
            return [as_count(layer_seq_lens, name)] * num_layers
        if layer_seq_lens.dim() != 1:
            raise ValueError(
                f"{name} must be an int or a 1-D sequence with one length per decoder layer, "
                f"got a tensor of shape {tuple(layer_seq_lens.shape)}"
            )
        layer_seq_lens = layer_seq_lens.tolist()
    if hasattr(layer_seq_lens, "ndim") and hasattr(layer_seq_lens, "tolist"):  # numpy array / scalar
        if layer_seq_lens.ndim == 0:
            return [as_count(layer_seq_lens.item(), name)] * num_layers
        if layer_seq_lens.ndim != 1:
            raise ValueError(
                f"{name} must be an int or a 1-D sequence with one length per decoder layer, "
                f"got an array of shape {tuple(layer_seq_lens.shape)}"
            )
        layer_seq_lens = layer_seq_lens.tolist()
    if isinstance(layer_seq_lens, (str, bytes)) or not isinstance(layer_seq_lens, Sequence):
        if hasattr(layer_seq_lens, "__index__"):
            return [as_count(layer_seq_lens, name)] * num_layers
        raise TypeError(
            f"{name} must be an int or a sequence of ints (one per decoder layer), "
            f"got {type(layer_seq_lens).__name__} {layer_seq_lens!r}"
        )
    lens = [as_count(v, f"{name}[{i}]") for i, v in enumerate(layer_seq_lens)]
    if len(lens) != num_layers:
        raise ValueError(
            f"{name} has {len(lens)} entries but the model has num_hidden_layers={num_layers}; "
            f"give one length per decoder layer, or a single int for all layers"
        )
    return lens


# --------------------------------------------------------------------------- decoder
def decoder_layer_flops(text_config, seq_len: int, kv_len: int | None = None, layer: int = 0) -> int:
    """FLOPs of decoder layer ``layer`` for one sequence.

    ``seq_len`` queries attend to ``kv_len`` keys (default ``seq_len``: prefill; ``seq_len=1`` and
    ``kv_len=past+1`` is one decode step). Full-attention layers: q/k/v/o projections (GQA: k and v project to
    ``Hkv*Dh``; Qwen3.5's gated query doubles q_proj), ``Q K^T`` and ``A V`` as full ``seq_len x kv_len``
    products; sliding-window layers (Gemma 3's local layers) over ``min(kv_len, sliding_window)`` keys.
    Linear-attention layers (Qwen3.5 Gated DeltaNet, ``text_config.layer_types``): projections, the
    depthwise conv and the chunked delta rule (``kv_len`` is not used: the state has a fixed size). MLP: gated
    (3 matmuls of ``D x I``), or the routed experts of an MoE layer. See the module docstring for the formulas.
    """
    text_config = text_config_of(text_config)
    s = as_count(seq_len, "seq_len")
    k = s if kv_len is None else as_count(kv_len, "kv_len")
    layer = as_count(layer, "layer")
    if layer >= _num_layers(text_config):
        raise ValueError(f"layer {layer} out of range for a decoder of {_num_layers(text_config)} layers")
    if _layer_type(text_config, layer) == "linear_attention":
        mixer = _linear_attention_flops(text_config, s)
    else:
        d, h, hkv, dh = _attn_dims(text_config)
        q_out = h * dh * (2 if _gated_query(text_config) else 1)
        proj = 2 * s * d * q_out + 2 * s * (h * dh) * d + 2 * s * d * (hkv * dh) * 2  # q, o  +  k, v
        if _layer_type(text_config, layer) == "sliding_attention":  # keys capped by the window
            k = min(k, int(require(text_config, "sliding_window", "sliding-window text config")))
        mixer = proj + 2 * 2 * s * k * h * dh  # QK^T, AV
    return mixer + _mlp_flops(text_config, s, layer)


def _layer_type(text_config, layer: int) -> str:
    types = getattr(text_config, "layer_types", None)
    return types[layer] if types else "full_attention"


def _gated_query(text_config) -> bool:
    return getattr(text_config, "model_type", "") in _GATED_QUERY


def _linear_attention_flops(text_config, s: int) -> int:
    what = "linear-attention text config"
    d = int(require(text_config, "hidden_size", what))
    hk, hv = (
        int(require(text_config, "linear_num_key_heads", what)),
        int(require(text_config, "linear_num_value_heads", what)),
    )
    dk, dv = (
        int(require(text_config, "linear_key_head_dim", what)),
        int(require(text_config, "linear_value_head_dim", what)),
    )
    w = int(require(text_config, "linear_conv_kernel_dim", what))
    kd, vd = hk * dk, hv * dv
    c = DELTA_RULE_CHUNK
    sp = -(-s // c) * c
    proj = 2 * s * d * (2 * kd + vd) + 2 * s * d * vd + 2 * 2 * s * d * hv + 2 * s * vd * d
    conv = 2 * (s + w - 1) * (2 * kd + vd) * w if s else 0
    rule = hv * sp * (4 * c * dk + 2 * c * dv + 6 * dk * dv)
    solves = hv * (sp // c) * c * (c - 1) * (dv + dk)
    return proj + conv + rule + solves


def _mlp_flops(text_config, s: int, layer: int) -> int:
    d = int(require(text_config, "hidden_size", "text config"))
    experts = int(getattr(text_config, "num_experts", 0) or 0)
    sparse = (
        experts > 0
        and layer not in (getattr(text_config, "mlp_only_layers", None) or ())
        and ((layer + 1) % int(getattr(text_config, "decoder_sparse_step", 1) or 1) == 0)
    )
    if not sparse:
        inter = int(require(text_config, "intermediate_size", "text config"))
        return 3 * 2 * s * d * inter  # gate, up, down
    top_k = int(require(text_config, "num_experts_per_tok", "MoE text config"))
    ie = int(require(text_config, "moe_intermediate_size", "MoE text config"))
    out = 2 * s * d * experts + top_k * 3 * 2 * s * d * ie  # router, routed experts
    shared = int(getattr(text_config, "shared_expert_intermediate_size", 0) or 0)
    if shared:
        out += 3 * 2 * s * d * shared + 2 * s * d  # shared expert and its gate
    return out


def linear_state_bytes(text_config, batch: int = 1, dtype=torch.float16) -> int:
    """Bytes of the decoding state of the linear-attention layers (0 for a decoder without them): per layer and
    sequence ``Hv*dk*dv`` recurrent values (transformers keeps them in float32) + ``(2*Kd + Vd) * (w)`` conv values
    (in ``dtype``). Independent of the prompt length: pruning does not change it."""
    text_config = text_config_of(text_config)
    b = as_count(batch, "batch")
    dtype = _dtype(dtype)
    layers = [i for i in range(_num_layers(text_config)) if _layer_type(text_config, i) == "linear_attention"]
    if not layers:
        return 0
    hk, hv = int(text_config.linear_num_key_heads), int(text_config.linear_num_value_heads)
    dk, dv = int(text_config.linear_key_head_dim), int(text_config.linear_value_head_dim)
    w = int(text_config.linear_conv_kernel_dim)
    per_layer = hv * dk * dv * torch.float32.itemsize + (2 * hk * dk + hv * dv) * w * dtype.itemsize
    return b * len(layers) * per_layer


def _lm_head_flops(text_config, tokens: int) -> int:
    d = int(require(text_config, "hidden_size", "text config"))
    vocab = int(require(text_config, "vocab_size", "text config"))
    return 2 * tokens * d * vocab


def decoder_prefill_flops(text_config, layer_seq_lens, batch: int = 1, lm_head_tokens: int = 1) -> int:
    """Prefill FLOPs of the decoder: every layer at its own length, plus lm_head.

    ``layer_seq_lens``: one int (all layers see the same length) or one length per decoder layer
    (``len == num_hidden_layers``).  ``lm_head_tokens``: positions whose logits are computed
    (``generate`` computes only the last one: default 1).  Everything is multiplied by ``batch``.
    A top-level VLM config is accepted too (its ``text_config`` is used).
    """
    text_config = text_config_of(text_config)
    lens = _layer_lens(text_config, layer_seq_lens)
    b = as_count(batch, "batch")
    t = as_count(lm_head_tokens, "lm_head_tokens")
    per_seq = sum(decoder_layer_flops(text_config, s, layer=i) for i, s in enumerate(lens))
    per_seq += _lm_head_flops(text_config, t)
    return b * per_seq


def kv_cache_bytes(text_config, layer_seq_lens, batch: int = 1, dtype=torch.float16) -> int:
    """Bytes of the KV cache after prefill: ``2 * Hkv * Dh * bytes(dtype) * batch * sum_l S_l`` over the attention
    layers (linear-attention layers keep a fixed-size state instead: :func:`linear_state_bytes`).

    ``layer_seq_lens`` as in :func:`decoder_prefill_flops` (each layer caches its own length).
    ``dtype``: a ``torch.dtype`` or its name (``"bfloat16"``).
    """
    text_config = text_config_of(text_config)
    lens = _layer_lens(text_config, layer_seq_lens)
    b = as_count(batch, "batch")
    dtype = _dtype(dtype)
    _, _, hkv, dh = _attn_dims(text_config)
    cached = sum(n for i, n in enumerate(lens) if _layer_type(text_config, i) != "linear_attention")
    return 2 * hkv * dh * dtype.itemsize * b * cached


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise TypeError(f"dtype {dtype!r} is not a torch dtype name (e.g. 'float16', 'bfloat16', 'float32')")
        dtype = resolved
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or its name, got {type(dtype).__name__} {dtype!r}")
    return dtype


# --------------------------------------------------------------------------- vision towers: shared pieces
def vit_layer_flops(tokens: int, dim: int, inter: int, mlp_matmuls: int, attn_sq: int) -> int:
    """One ViT block: q,k,v,out (4 D x D), attention with ``attn_sq = sum of segment_len**2``,
    MLP of ``mlp_matmuls`` D x I matmuls."""
    return 4 * 2 * tokens * dim * dim + 2 * 2 * attn_sq * dim + mlp_matmuls * 2 * tokens * dim * inter


def pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or an (h, w) pair, got {value!r}")
        return as_count(value[0], name), as_count(value[1], name)
    v = as_count(value, name)
    return v, v


def grid_rows(image_grid_thw) -> list[tuple[int, int, int]]:
    if image_grid_thw is None:
        raise ValueError(
            "image_grid_thw is required for Qwen-VL configs: an [n, 3] tensor or a "
            "list of (t, h, w) patch grids, one per image or video"
        )
    if isinstance(image_grid_thw, torch.Tensor) or hasattr(image_grid_thw, "tolist"):
        rows = image_grid_thw.tolist()
    else:
        rows = list(image_grid_thw)
    if rows and not isinstance(rows[0], (list, tuple)) and len(rows) == 3:
        rows = [rows]  # a single (t, h, w)
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) != 3:
            raise ValueError(f"image_grid_thw[{i}] must be (t, h, w), got {row!r}")
        out.append(tuple(as_count(v, f"image_grid_thw[{i}][{j}]") for j, v in enumerate(row)))
    return out


def check_merge(grid, m: int, i: int) -> None:
    t, h, w = grid
    if h % m or w % m:
        raise ValueError(f"image_grid_thw[{i}] = {grid}: h and w must be multiples of spatial_merge_size={m}")


def window_sizes(length: int, ws: int) -> list[int]:
    """Window extents along one axis: ws, ..., ws, remainder (HF pads to a multiple of ws)."""
    full, rem = divmod(length, ws)
    return [ws] * full + ([rem] if rem else [])


def register_vision_flops(model_types, counter: Callable) -> None:
    """Register ``counter(config, num_images, image_grid_thw, num_frames) -> int``, the FLOPs of the vision tower and
    projector of a top-level config of one of ``model_types`` (each family's adapter module does, with its own
    formulas; see the module docstring)."""
    for model_type in model_types:
        _VISION[model_type] = counter


def register_gated_query(text_model_types) -> None:
    """Text ``model_type`` values whose full-attention ``q_proj`` maps to ``2*H*Dh`` (query and output gate)."""
    _GATED_QUERY.update(text_model_types)


def supported_model_types() -> list[str]:
    """Top-level ``config.model_type`` values :func:`vision_flops` / :func:`prefill_flops` count (registered by
    ``vtprune.adapters``, which ``import vtprune`` loads), in registration order."""
    return list(_VISION)


def no_grid(config, image_grid_thw, hint: str = "pass num_images instead") -> None:
    """Refuse ``image_grid_thw`` for a family whose towers count images / crops / tiles."""
    if image_grid_thw is not None:
        raise ValueError(
            f"image_grid_thw is only used for Qwen-VL configs, got it for model_type {config.model_type!r}; {hint}"
        )


def no_frames(config, num_frames) -> None:
    """Refuse ``num_frames`` for a family without a frame-count video path."""
    if num_frames:
        raise ValueError(
            f"num_frames is for llava_next_video / llava_onevision configs, got it for model_type "
            f"{config.model_type!r}; Qwen-VL videos are rows of image_grid_thw"
        )


def vision_flops(config, num_images: int = 1, image_grid_thw=None, num_frames: int = 0) -> int:
    """FLOPs of the vision tower + projector of a top-level VLM config (``config.model_type`` in
    :func:`supported_model_types`; each family's formulas live with its adapter and in the module docstring).

    * ``llava`` / ``llava_next`` / ``llava_next_video`` (CLIP ViT), ``llava_onevision`` (SigLIP ViT): ``num_images``
      images of ``image_size`` (for the AnyRes families, crops: base image + AnyRes patches, all of them in the
      batch) and ``num_frames`` video frames (``llava_next_video``, ``llava_onevision``; all videos of the batch).
      ``image_grid_thw`` must be None.
    * ``internvl``: ``num_images`` tiles (every tile of every image, thumbnails included: ``pixel_values.shape[0]``).
    * ``gemma3`` (SigLIP, pooling projector): ``num_images`` images (pan-and-scan crops count as images).
    * ``qwen2_vl`` / ``qwen2_5_vl`` / ``qwen3_vl`` / ``qwen3_vl_moe`` / ``qwen3_5`` / ``qwen3_5_moe``: token counts
      from ``image_grid_thw`` (an ``[n, 3]`` tensor or a list of ``(t, h, w)`` patch grids, one per image/video in
      the batch); ``num_images`` is not used.

    The count covers all images given; it is not multiplied by any batch size.
    """
    counter = _VISION.get(getattr(config, "model_type", None))
    if counter is None:
        raise ValueError(
            f"model_type {getattr(config, 'model_type', None)!r} ({type(config).__name__}) is not "
            f"supported by vtprune.flops; supported: {supported_model_types()} (pass the top-level "
            "VLM config)"
        )
    return counter(config, num_images, image_grid_thw, num_frames)


def prefill_flops(
    config,
    layer_seq_lens,
    batch: int = 1,
    num_images: int = 1,
    image_grid_thw=None,
    lm_head_tokens: int = 1,
    num_frames: int = 0,
) -> int:
    """Vision tower + projector (:func:`vision_flops`) plus decoder prefill
    (:func:`decoder_prefill_flops` on ``config.text_config``) of a top-level VLM config.

    ``num_images`` / ``num_frames`` / ``image_grid_thw`` describe all images and videos of the batch; ``batch``
    multiplies only
    the decoder part.
    """
    vis = vision_flops(config, num_images=num_images, image_grid_thw=image_grid_thw, num_frames=num_frames)
    text_config = require(config, "text_config", f"{getattr(config, 'model_type', None)!r} config")
    return vis + decoder_prefill_flops(text_config, layer_seq_lens, batch=batch, lm_head_tokens=lm_head_tokens)


# --------------------------------------------------------------------------- token reduction inside a ViT
def vit_block_flops(dim: int, inter: int, tokens_in: int, tokens_out: int | None = None) -> int:
    """One pre-norm ViT block whose token count drops from ``tokens_in`` to ``tokens_out`` between attention and MLP
    (where ToMe / PiToMe / Zero-TPrune act; ``None``: no drop): q, k, v, out projections and the two attention products
    on ``tokens_in`` tokens, the two MLP matmuls (``D x I``, ``I x D``) on ``tokens_out``. The method's own work (the
    similarity / attention-row products of its plan) is not counted."""
    t_in = as_count(tokens_in, "tokens_in")
    t_out = t_in if tokens_out is None else as_count(tokens_out, "tokens_out")
    return 4 * 2 * t_in * dim * dim + 2 * 2 * t_in * t_in * dim + 2 * 2 * t_out * dim * inter


def vit_flops(model, block_tokens=None, batch: int = 1) -> int:
    """Analytic FLOPs of a ViT host's patch embedding and transformer blocks (heads and pooling not counted), for
    ``batch`` images (default one image; a patched ViT's ``stats.flops`` counts its whole batch, i.e.
    ``vit_flops(model, stats.block_flops_tokens, batch=stats.batch)``). ``block_tokens``: per block, the ``(tokens_in,
    tokens_out)`` pair (or a plain int for a block
    that keeps its tokens), e.g. from ``vtprune.stats(model).block_flops_tokens`` of a patched ViT; None = the
    unreduced model. Hosts: timm ``VisionTransformer``, transformers ``CLIPVisionModel`` / ``SiglipVisionModel``,
    open_clip ``CLIP`` / ``VisionTransformer``. Raises ``ValueError`` for other models or a list of the wrong
    length."""
    from .adapters.vit import find_vit_host, vit_host_names

    host = find_vit_host(model)
    if host is None:
        raise ValueError(
            f"{type(model).__name__} is not a vision transformer vtprune.flops knows; supported: "
            f"{'; '.join(vit_host_names())}"
        )
    dim, inter, patch_weight = host.dims()
    n = host.num_patches()
    total = host.num_prefix + n
    if block_tokens is None:
        block_tokens = [total] * len(host.blocks)
    block_tokens = list(block_tokens)
    if len(block_tokens) != len(host.blocks):
        raise ValueError(f"block_tokens has {len(block_tokens)} entries for a {len(host.blocks)}-block model")
    flops = 2 * n * patch_weight
    for entry in block_tokens:
        t_in, t_out = entry if isinstance(entry, (tuple, list)) else (entry, entry)
        flops += vit_block_flops(dim, inter, t_in, t_out)
    return as_count(batch, "batch") * flops
