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
from collections.abc import Sequence

import torch

__all__ = [
    "decoder_layer_flops",
    "decoder_prefill_flops",
    "vision_flops",
    "prefill_flops",
    "kv_cache_bytes",
    "linear_state_bytes",
    "SUPPORTED_MODEL_TYPES",
]

#: top-level ``config.model_type`` values :func:`vision_flops` / :func:`prefill_flops` understand.
SUPPORTED_MODEL_TYPES = ("llava", "llava_next", "llava_next_video", "llava_onevision", "qwen2_vl", "qwen2_5_vl",
                         "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "internvl", "gemma3")
_QWEN3_TYPES = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
#: chunk length of transformers' chunked gated delta rule (``torch_chunk_gated_delta_rule``)
DELTA_RULE_CHUNK = 64
_CLIP_VISION_TYPES = ("clip_vision_model",)
_SIGLIP_VISION_TYPES = ("siglip_vision_model",)
_LLAVA_TYPES = ("llava", "llava_next", "llava_next_video", "llava_onevision")


# --------------------------------------------------------------------------- input checking
def _as_count(value, name: str) -> int:
    """A non-negative Python int from an int-like (int, numpy/torch integer scalar)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a non-negative int, got bool {value!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex():
            raise TypeError(f"{name} must be a non-negative int, got tensor of shape "
                            f"{tuple(value.shape)} and dtype {value.dtype}")
        value = value.item()
    try:
        out = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a non-negative int, got {type(value).__name__} {value!r}") from None
    if out < 0:
        raise ValueError(f"{name} must be a non-negative int, got {out}")
    return out


def _require(cfg, attr: str, what: str):
    value = getattr(cfg, attr, None)
    if value is None:
        raise ValueError(f"{what} ({type(cfg).__name__}) has no `{attr}`; cannot count its FLOPs")
    return value


def _text_config(config):
    """Accept a text config or a top-level VLM config (use its ``text_config``)."""
    sub = getattr(config, "text_config", None)
    return sub if sub is not None else config


def _attn_dims(text_config) -> tuple[int, int, int, int]:
    """(D, H, Hkv, Dh) of a decoder config."""
    what = "text config"
    d = _require(text_config, "hidden_size", what)
    h = _require(text_config, "num_attention_heads", what)
    hkv = getattr(text_config, "num_key_value_heads", None) or h
    dh = getattr(text_config, "head_dim", None) or d // h
    return int(d), int(h), int(hkv), int(dh)


def _num_layers(text_config) -> int:
    return int(_require(text_config, "num_hidden_layers", "text config"))


def _layer_lens(text_config, layer_seq_lens, name: str = "layer_seq_lens") -> list[int]:
    """One sequence length per decoder layer, from an int or a per-layer sequence."""
    num_layers = _num_layers(text_config)
    if isinstance(layer_seq_lens, torch.Tensor):
        if layer_seq_lens.dim() == 0:
            return [_as_count(layer_seq_lens, name)] * num_layers
        if layer_seq_lens.dim() != 1:
            raise ValueError(f"{name} must be an int or a 1-D sequence with one length per decoder layer, "
                             f"got a tensor of shape {tuple(layer_seq_lens.shape)}")
        layer_seq_lens = layer_seq_lens.tolist()
    if hasattr(layer_seq_lens, "ndim") and hasattr(layer_seq_lens, "tolist"):     # numpy array / scalar
        if layer_seq_lens.ndim == 0:
            return [_as_count(layer_seq_lens.item(), name)] * num_layers
        if layer_seq_lens.ndim != 1:
            raise ValueError(f"{name} must be an int or a 1-D sequence with one length per decoder layer, "
                             f"got an array of shape {tuple(layer_seq_lens.shape)}")
        layer_seq_lens = layer_seq_lens.tolist()
    if isinstance(layer_seq_lens, (str, bytes)) or not isinstance(layer_seq_lens, Sequence):
        if hasattr(layer_seq_lens, "__index__"):
            return [_as_count(layer_seq_lens, name)] * num_layers
        raise TypeError(f"{name} must be an int or a sequence of ints (one per decoder layer), "
                        f"got {type(layer_seq_lens).__name__} {layer_seq_lens!r}")
    lens = [_as_count(v, f"{name}[{i}]") for i, v in enumerate(layer_seq_lens)]
    if len(lens) != num_layers:
        raise ValueError(f"{name} has {len(lens)} entries but the model has num_hidden_layers={num_layers}; "
                         f"give one length per decoder layer, or a single int for all layers")
    return lens


# --------------------------------------------------------------------------- decoder
def decoder_layer_flops(text_config, seq_len: int, kv_len: int | None = None, layer: int = 0) -> int:
    """FLOPs of decoder layer ``layer`` for one sequence.

    ``seq_len`` queries attend to ``kv_len`` keys (default ``seq_len``: prefill; ``seq_len=1`` and
    ``kv_len=past+1`` is one decode step). Full-attention layers: q/k/v/o projections (GQA: k and v project to
    ``Hkv*Dh``; Qwen3.5's gated query doubles q_proj), ``Q K^T`` and ``A V`` as full ``seq_len x kv_len``
    products; sliding-window layers (Gemma 3's local layers) over ``min(kv_len, sliding_window)`` keys. Linear-attention layers (Qwen3.5 Gated DeltaNet, ``text_config.layer_types``): projections, the
    depthwise conv and the chunked delta rule (``kv_len`` is not used: the state has a fixed size). MLP: gated
    (3 matmuls of ``D x I``), or the routed experts of an MoE layer. See the module docstring for the formulas.
    """
    text_config = _text_config(text_config)
    s = _as_count(seq_len, "seq_len")
    k = s if kv_len is None else _as_count(kv_len, "kv_len")
    layer = _as_count(layer, "layer")
    if layer >= _num_layers(text_config):
        raise ValueError(f"layer {layer} out of range for a decoder of {_num_layers(text_config)} layers")
    if _layer_type(text_config, layer) == "linear_attention":
        mixer = _linear_attention_flops(text_config, s)
    else:
        d, h, hkv, dh = _attn_dims(text_config)
        q_out = h * dh * (2 if _gated_query(text_config) else 1)
        proj = 2 * s * d * q_out + 2 * s * (h * dh) * d + 2 * s * d * (hkv * dh) * 2   # q, o  +  k, v
        if _layer_type(text_config, layer) == "sliding_attention":                      # keys capped by the window
            k = min(k, int(_require(text_config, "sliding_window", "sliding-window text config")))
        mixer = proj + 2 * 2 * s * k * h * dh                                            # QK^T, AV
    return mixer + _mlp_flops(text_config, s, layer)


def _layer_type(text_config, layer: int) -> str:
    types = getattr(text_config, "layer_types", None)
    return types[layer] if types else "full_attention"


def _gated_query(text_config) -> bool:
    return getattr(text_config, "model_type", "") in ("qwen3_5_text", "qwen3_5_moe_text")


def _linear_attention_flops(text_config, s: int) -> int:
    what = "linear-attention text config"
    d = int(_require(text_config, "hidden_size", what))
    hk, hv = int(_require(text_config, "linear_num_key_heads", what)), int(_require(text_config, "linear_num_value_heads", what))
    dk, dv = int(_require(text_config, "linear_key_head_dim", what)), int(_require(text_config, "linear_value_head_dim", what))
    w = int(_require(text_config, "linear_conv_kernel_dim", what))
    kd, vd = hk * dk, hv * dv
    c = DELTA_RULE_CHUNK
    sp = -(-s // c) * c
    proj = 2 * s * d * (2 * kd + vd) + 2 * s * d * vd + 2 * 2 * s * d * hv + 2 * s * vd * d
    conv = 2 * (s + w - 1) * (2 * kd + vd) * w if s else 0
    rule = hv * sp * (4 * c * dk + 2 * c * dv + 6 * dk * dv)
    solves = hv * (sp // c) * c * (c - 1) * (dv + dk)
    return proj + conv + rule + solves


def _mlp_flops(text_config, s: int, layer: int) -> int:
    d = int(_require(text_config, "hidden_size", "text config"))
    experts = int(getattr(text_config, "num_experts", 0) or 0)
    sparse = experts > 0 and layer not in (getattr(text_config, "mlp_only_layers", None) or ()) and (
        (layer + 1) % int(getattr(text_config, "decoder_sparse_step", 1) or 1) == 0)
    if not sparse:
        inter = int(_require(text_config, "intermediate_size", "text config"))
        return 3 * 2 * s * d * inter                                     # gate, up, down
    top_k = int(_require(text_config, "num_experts_per_tok", "MoE text config"))
    ie = int(_require(text_config, "moe_intermediate_size", "MoE text config"))
    out = 2 * s * d * experts + top_k * 3 * 2 * s * d * ie               # router, routed experts
    shared = int(getattr(text_config, "shared_expert_intermediate_size", 0) or 0)
    if shared:
        out += 3 * 2 * s * d * shared + 2 * s * d                        # shared expert and its gate
    return out


def linear_state_bytes(text_config, batch: int = 1, dtype=torch.float16) -> int:
    """Bytes of the decoding state of the linear-attention layers (0 for a decoder without them): per layer and
    sequence ``Hv*dk*dv`` recurrent values (transformers keeps them in float32) + ``(2*Kd + Vd) * (w)`` conv values
    (in ``dtype``). Independent of the prompt length: pruning does not change it."""
    text_config = _text_config(text_config)
    b = _as_count(batch, "batch")
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
    d = int(_require(text_config, "hidden_size", "text config"))
    vocab = int(_require(text_config, "vocab_size", "text config"))
    return 2 * tokens * d * vocab


def decoder_prefill_flops(text_config, layer_seq_lens, batch: int = 1, lm_head_tokens: int = 1) -> int:
    """Prefill FLOPs of the decoder: every layer at its own length, plus lm_head.

    ``layer_seq_lens``: one int (all layers see the same length) or one length per decoder layer
    (``len == num_hidden_layers``).  ``lm_head_tokens``: positions whose logits are computed
    (``generate`` computes only the last one: default 1).  Everything is multiplied by ``batch``.
    A top-level VLM config is accepted too (its ``text_config`` is used).
    """
    text_config = _text_config(text_config)
    lens = _layer_lens(text_config, layer_seq_lens)
    b = _as_count(batch, "batch")
    t = _as_count(lm_head_tokens, "lm_head_tokens")
    per_seq = sum(decoder_layer_flops(text_config, s, layer=i) for i, s in enumerate(lens))
    per_seq += _lm_head_flops(text_config, t)
    return b * per_seq


def kv_cache_bytes(text_config, layer_seq_lens, batch: int = 1, dtype=torch.float16) -> int:
    """Bytes of the KV cache after prefill: ``2 * Hkv * Dh * bytes(dtype) * batch * sum_l S_l`` over the attention
    layers (linear-attention layers keep a fixed-size state instead: :func:`linear_state_bytes`).

    ``layer_seq_lens`` as in :func:`decoder_prefill_flops` (each layer caches its own length).
    ``dtype``: a ``torch.dtype`` or its name (``"bfloat16"``).
    """
    text_config = _text_config(text_config)
    lens = _layer_lens(text_config, layer_seq_lens)
    b = _as_count(batch, "batch")
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


# --------------------------------------------------------------------------- vision towers
def _vit_layer_flops(tokens: int, dim: int, inter: int, mlp_matmuls: int, attn_sq: int) -> int:
    """One ViT block: q,k,v,out (4 D x D), attention with ``attn_sq = sum of segment_len**2``,
    MLP of ``mlp_matmuls`` D x I matmuls."""
    return 4 * 2 * tokens * dim * dim + 2 * 2 * attn_sq * dim + mlp_matmuls * 2 * tokens * dim * inter


def _llava_vision_flops(config, num_images: int, num_frames: int = 0) -> int:
    vcfg = _require(config, "vision_config", f"{config.model_type} config")
    vtype = getattr(vcfg, "model_type", None)
    if vtype not in _CLIP_VISION_TYPES + _SIGLIP_VISION_TYPES:
        raise ValueError(f"vision tower of model_type {vtype!r} in a {config.model_type!r} config is not supported; "
                         f"supported: {list(_CLIP_VISION_TYPES + _SIGLIP_VISION_TYPES)}")
    siglip = vtype in _SIGLIP_VISION_TYPES
    what = f"{'SigLIP' if siglip else 'CLIP'} vision config"
    dv = int(_require(vcfg, "hidden_size", what))
    iv = int(_require(vcfg, "intermediate_size", what))
    lv = int(_require(vcfg, "num_hidden_layers", what))
    p = int(_require(vcfg, "patch_size", what))
    c = int(getattr(vcfg, "num_channels", 3) or 3)
    n = (int(_require(vcfg, "image_size", what)) // p) ** 2
    s = n if siglip else n + 1                                        # + CLS (CLIP)
    dt = int(_require(_text_config(config), "hidden_size", "text config"))

    feature_layer = getattr(config, "vision_feature_layer", -2)
    n_feat = 1 if isinstance(feature_layer, int) else len(feature_layer)
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy {strategy!r} is not supported; supported: 'default', 'full'")
    n_proj = n if strategy == "default" or siglip else s

    def projector(tokens: int) -> int:                                # linear_1, linear_2
        return 2 * tokens * (n_feat * dv) * dt + 2 * tokens * dt * dt

    tower = 2 * n * c * p * p * dv + lv * _vit_layer_flops(s, dv, iv, 2, s * s)  # patch conv + all encoder layers
    if siglip and getattr(vcfg, "vision_use_head", False):           # attention-pooling head, one probe query
        tower += 2 * dv * dv + 2 * 2 * n * dv * dv + 2 * 2 * n * dv + 2 * dv * dv + 2 * 2 * dv * iv
    total = num_images * (tower + projector(n_proj))
    if num_frames:
        if config.model_type not in ("llava_next_video", "llava_onevision"):
            raise ValueError(f"num_frames is for video models (llava_next_video, llava_onevision), got it for "
                             f"model_type {config.model_type!r}")
        frame = tower + projector(n_proj)
        if config.model_type == "llava_next_video":                   # pooled before the projector
            stride = int(getattr(config, "spatial_pool_stride", 2))
            side = int(round(n_proj**0.5)) // stride
            frame = tower + projector(side * side)
            if getattr(config, "spatial_pool_mode", "average") == "conv":
                out = int(getattr(config, "spatial_pool_out_channels", None) or dv)
                if out != n_feat * dv:
                    raise ValueError(f"spatial_pool_out_channels={out} differs from the projector's input width "
                                     f"{n_feat * dv}: such a model cannot run")
                frame += 2 * side * side * stride * stride * dv * out
        total += num_frames * frame
    return total


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or an (h, w) pair, got {value!r}")
        return _as_count(value[0], name), _as_count(value[1], name)
    v = _as_count(value, name)
    return v, v


def _internvl_vision_flops(config, num_tiles: int) -> int:
    vcfg = _require(config, "vision_config", "internvl config")
    vtype = getattr(vcfg, "model_type", None)
    if vtype != "internvl_vision":
        raise ValueError(f"vision tower of model_type {vtype!r} in an 'internvl' config is not supported; supported: "
                         "['internvl_vision']")
    what = "InternViT vision config"
    dv = int(_require(vcfg, "hidden_size", what))
    iv = int(_require(vcfg, "intermediate_size", what))
    lv = int(_require(vcfg, "num_hidden_layers", what))
    (h, w), (ph, pw) = _pair(_require(vcfg, "image_size", what), "image_size"), _pair(_require(vcfg, "patch_size", what),
                                                                                       "patch_size")
    c = int(getattr(vcfg, "num_channels", 3) or 3)
    n = (h // ph) * (w // pw)
    s = n + 1                                                         # + CLS
    ratio = float(_require(config, "downsample_ratio", "internvl config"))
    f = round(1 / ratio) ** 2                                         # patches per LLM token
    if n % f:
        raise ValueError(f"a tile of {n} patches cannot be pixel-shuffled by downsample_ratio={ratio}")
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ValueError(f"vision_feature_select_strategy {strategy!r} is not supported for InternVL (its pixel "
                         "shuffle needs the square patch grid without CLS); supported: 'default'")
    dt = int(_require(_text_config(config), "hidden_size", "text config"))
    tokens = n // f
    per_tile = (
        2 * n * c * ph * pw * dv                                      # patch embedding conv
        + lv * _vit_layer_flops(s, dv, iv, 2, s * s)                  # all encoder layers
        + 2 * tokens * (f * dv) * dt + 2 * tokens * dt * dt           # projector linear_1, linear_2
    )
    return num_tiles * per_tile


def _gemma3_vision_flops(config, num_images: int) -> int:
    vcfg = _require(config, "vision_config", "gemma3 config")
    what = "gemma3 SigLIP vision config"
    if getattr(vcfg, "vision_use_head", False):
        raise ValueError("gemma3 vision config has vision_use_head=True (an attention-pooling head Gemma 3 does not "
                         "use and its checkpoints do not have); vtprune.flops counts towers without it")
    dv, iv = int(_require(vcfg, "hidden_size", what)), int(_require(vcfg, "intermediate_size", what))
    lv, p = int(_require(vcfg, "num_hidden_layers", what)), int(_require(vcfg, "patch_size", what))
    c = int(getattr(vcfg, "num_channels", 3) or 3)
    n = (int(_require(vcfg, "image_size", what)) // p) ** 2
    t = int(_require(config, "mm_tokens_per_image", "gemma3 config"))
    dt = int(_require(_text_config(config), "hidden_size", "text config"))
    per_image = 2 * n * c * p * p * dv + lv * _vit_layer_flops(n, dv, iv, 2, n * n) + 2 * t * dv * dt
    return num_images * per_image


def _grid_rows(image_grid_thw) -> list[tuple[int, int, int]]:
    if image_grid_thw is None:
        raise ValueError("image_grid_thw is required for Qwen2-VL / Qwen2.5-VL configs: an [n, 3] tensor or a "
                         "list of (t, h, w) patch grids, one per image or video")
    if isinstance(image_grid_thw, torch.Tensor) or hasattr(image_grid_thw, "tolist"):
        rows = image_grid_thw.tolist()
    else:
        rows = list(image_grid_thw)
    if rows and not isinstance(rows[0], (list, tuple)) and len(rows) == 3:
        rows = [rows]                                                  # a single (t, h, w)
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) != 3:
            raise ValueError(f"image_grid_thw[{i}] must be (t, h, w), got {row!r}")
        out.append(tuple(_as_count(v, f"image_grid_thw[{i}][{j}]") for j, v in enumerate(row)))
    return out


def _check_merge(grid, m: int, i: int) -> None:
    t, h, w = grid
    if h % m or w % m:
        raise ValueError(f"image_grid_thw[{i}] = {grid}: h and w must be multiples of spatial_merge_size={m}")


def _window_sizes(length: int, ws: int) -> list[int]:
    """Window extents along one axis: ws, ..., ws, remainder (HF pads to a multiple of ws)."""
    full, rem = divmod(length, ws)
    return [ws] * full + ([rem] if rem else [])


def _qwen3_vision_flops(config, image_grid_thw) -> int:
    vcfg = _require(config, "vision_config", f"{config.model_type} config")
    what = f"{config.model_type} vision config"
    p, tp = int(_require(vcfg, "patch_size", what)), int(_require(vcfg, "temporal_patch_size", what))
    c = int(getattr(vcfg, "in_channels", 3) or 3)
    m, depth = int(_require(vcfg, "spatial_merge_size", what)), int(_require(vcfg, "depth", what))
    de, iv = int(_require(vcfg, "hidden_size", what)), int(_require(vcfg, "intermediate_size", what))
    dout = int(_require(vcfg, "out_hidden_size", what))
    mergers = 1 + len(getattr(vcfg, "deepstack_visual_indexes", None) or ())
    dm = de * m * m
    total = 0
    for i, grid in enumerate(_grid_rows(image_grid_thw)):
        _check_merge(grid, m, i)
        t, h, w = grid
        n = t * h * w
        total += 2 * n * c * tp * p * p * de                           # patch embedding conv3d
        total += depth * _vit_layer_flops(n, de, iv, 2, t * (h * w) ** 2)
        nm = n // (m * m)
        total += mergers * (2 * nm * dm * dm + 2 * nm * dm * dout)     # main + DeepStack mergers
    return total


def _qwen_vision_flops(config, image_grid_thw, qwen25: bool) -> int:
    vcfg = _require(config, "vision_config", f"{config.model_type} config")
    what = f"{config.model_type} vision config"
    p = int(_require(vcfg, "patch_size", what))
    tp = int(_require(vcfg, "temporal_patch_size", what))
    c = int(getattr(vcfg, "in_channels", 3) or 3)
    m = int(_require(vcfg, "spatial_merge_size", what))
    depth = int(_require(vcfg, "depth", what))
    if qwen25:
        de = int(_require(vcfg, "hidden_size", what))
        iv = int(_require(vcfg, "intermediate_size", what))
        dout = int(_require(vcfg, "out_hidden_size", what))
        mlp_matmuls = 3                                                # gated MLP
        # HF tests `layer_num in fullatt_block_indexes`: plain membership, no negative indexing
        full_blocks = {int(i) for i in (getattr(vcfg, "fullatt_block_indexes", None) or ())}
        ws = int(_require(vcfg, "window_size", what)) // m // p
        if ws <= 0:
            raise ValueError(f"window_size={vcfg.window_size} is smaller than spatial_merge_size*patch_size="
                             f"{m * p}: no window can be formed")
    else:
        de = int(_require(vcfg, "embed_dim", what))
        iv = int(de * _require(vcfg, "mlp_ratio", what))
        dout = int(_require(vcfg, "hidden_size", what))
        mlp_matmuls = 2
        full_blocks = set(range(depth))
        ws = 0

    dm = de * m * m                                                    # merger hidden size
    total = 0
    for i, grid in enumerate(_grid_rows(image_grid_thw)):
        _check_merge(grid, m, i)
        t, h, w = grid
        n = t * h * w
        full_sq = t * (h * w) ** 2                                     # attention within each frame
        if ws:
            rows = _window_sizes(h // m, ws)
            cols = _window_sizes(w // m, ws)
            win_sq = t * m ** 4 * sum(r * r for r in rows) * sum(cc * cc for cc in cols)
        else:
            win_sq = full_sq
        total += 2 * n * c * tp * p * p * de                           # patch embedding conv3d
        for blk in range(depth):
            total += _vit_layer_flops(n, de, iv, mlp_matmuls, full_sq if blk in full_blocks else win_sq)
        nm = n // (m * m)
        total += 2 * nm * dm * dm + 2 * nm * dm * dout                 # patch merger MLP
    return total


def vision_flops(config, num_images: int = 1, image_grid_thw=None, num_frames: int = 0) -> int:
    """FLOPs of the vision tower + projector of a top-level VLM config.

    ``config.model_type`` in :data:`SUPPORTED_MODEL_TYPES`:

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
    model_type = getattr(config, "model_type", None)
    if model_type in _LLAVA_TYPES:
        if image_grid_thw is not None:
            raise ValueError(f"image_grid_thw is only used for qwen2_vl / qwen2_5_vl configs, got it for "
                             f"model_type {model_type!r}; pass num_images instead")
        return _llava_vision_flops(config, _as_count(num_images, "num_images"), _as_count(num_frames, "num_frames"))
    if num_frames:
        raise ValueError(f"num_frames is for llava_next_video / llava_onevision configs, got it for model_type "
                         f"{model_type!r}; Qwen-VL videos are rows of image_grid_thw")
    if model_type == "internvl":
        if image_grid_thw is not None:
            raise ValueError("image_grid_thw is only used for Qwen-VL configs, got it for model_type 'internvl'; pass "
                             "num_images (the number of tiles) instead")
        return _internvl_vision_flops(config, _as_count(num_images, "num_images"))
    if model_type == "gemma3":
        if image_grid_thw is not None:
            raise ValueError("image_grid_thw is only used for Qwen-VL configs, got it for model_type 'gemma3'; pass "
                             "num_images instead")
        return _gemma3_vision_flops(config, _as_count(num_images, "num_images"))
    if model_type == "qwen2_vl":
        return _qwen_vision_flops(config, image_grid_thw, qwen25=False)
    if model_type == "qwen2_5_vl":
        return _qwen_vision_flops(config, image_grid_thw, qwen25=True)
    if model_type in _QWEN3_TYPES:
        return _qwen3_vision_flops(config, image_grid_thw)
    raise ValueError(f"model_type {model_type!r} ({type(config).__name__}) is not supported by vtprune.flops; "
                     f"supported: {list(SUPPORTED_MODEL_TYPES)} (pass the top-level VLM config)")


def prefill_flops(config, layer_seq_lens, batch: int = 1, num_images: int = 1, image_grid_thw=None,
                  lm_head_tokens: int = 1, num_frames: int = 0) -> int:
    """Vision tower + projector (:func:`vision_flops`) plus decoder prefill
    (:func:`decoder_prefill_flops` on ``config.text_config``) of a top-level VLM config.

    ``num_images`` / ``num_frames`` / ``image_grid_thw`` describe all images and videos of the batch; ``batch`` multiplies only
    the decoder part.
    """
    vis = vision_flops(config, num_images=num_images, image_grid_thw=image_grid_thw, num_frames=num_frames)
    text_config = _require(config, "text_config", f"{getattr(config, 'model_type', None)!r} config")
    return vis + decoder_prefill_flops(text_config, layer_seq_lens, batch=batch, lm_head_tokens=lm_head_tokens)


# --------------------------------------------------------------------------- token reduction inside a ViT
def vit_block_flops(dim: int, inter: int, tokens_in: int, tokens_out: int | None = None) -> int:
    """One pre-norm ViT block whose token count drops from ``tokens_in`` to ``tokens_out`` between attention and MLP
    (where ToMe / PiToMe / Zero-TPrune act; ``None``: no drop): q, k, v, out projections and the two attention products
    on ``tokens_in`` tokens, the two MLP matmuls (``D x I``, ``I x D``) on ``tokens_out``. The method's own work (the
    similarity / attention-row products of its plan) is not counted."""
    t_in = _as_count(tokens_in, "tokens_in")
    t_out = t_in if tokens_out is None else _as_count(tokens_out, "tokens_out")
    return 4 * 2 * t_in * dim * dim + 2 * 2 * t_in * t_in * dim + 2 * 2 * t_out * dim * inter


def vit_flops(model, block_tokens=None, batch: int = 1) -> int:
    """Analytic FLOPs of a ViT host's patch embedding and transformer blocks (heads and pooling not counted), for
    ``batch`` images (default one image; a patched ViT's ``stats.flops`` counts its whole batch, i.e.
    ``vit_flops(model, stats.block_flops_tokens, batch=stats.batch)``). ``block_tokens``: per block, the ``(tokens_in, tokens_out)`` pair (or a plain int for a block
    that keeps its tokens), e.g. from ``vtprune.stats(model).block_flops_tokens`` of a patched ViT; None = the
    unreduced model. Hosts: timm ``VisionTransformer``, transformers ``CLIPVisionModel`` / ``SiglipVisionModel``,
    open_clip ``CLIP`` / ``VisionTransformer``. Raises ``ValueError`` for other models or a list of the wrong
    length."""
    from .adapters.vit import find_vit_host, vit_host_names

    host = find_vit_host(model)
    if host is None:
        raise ValueError(f"{type(model).__name__} is not a vision transformer vtprune.flops knows; supported: "
                         f"{'; '.join(vit_host_names())}")
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
    return _as_count(batch, "batch") * flops
