"""Latency without downloads: a random-weight LLaVA-1.5-architecture model built from configs (no download), one
image and a short prompt, every registered method at a few budgets, with analytic FLOPs and measured prefill time.

* :func:`build_random_llava` — any size of random LLaVA-1.5 (CLIP tower + 2-layer MLP projector + Llama LM) and
  one prompt ``BOS, text, <image> x N, text``; also used by ``eval/bench/prefill.py``.
* :func:`build_small_llava` — a small one (224 px / patch 14: 256 visual tokens) for a quick table.
* :func:`run_latency` — the rows of the latency table (``vtprune bench`` prints them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import flops
from .api import list_methods, patch, patched, stats, unpatch
from .registry import get_method
from .timing import interleaved_median_ms

__all__ = ["build_random_llava", "build_small_llava", "prefill", "LatencyRow", "run_latency", "DEFAULT_BUDGETS"]

#: LLaVA-1.5's vocabulary (32000 Llama tokens + image token + padding to a multiple of 64) and image token id
VOCAB_SIZE = 32064
IMAGE_TOKEN_ID = 32000
DEFAULT_BUDGETS = (64, 16, 4)


def build_random_llava(
    *,
    image_size: int = 224,
    patch_size: int = 14,
    vision_hidden: int = 128,
    vision_intermediate: int | None = None,
    vision_layers: int = 4,
    vision_heads: int = 4,
    text_hidden: int = 256,
    text_intermediate: int | None = None,
    text_layers: int = 4,
    text_heads: int = 4,
    text_before: int = 5,
    text_after: int = 15,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn: str = "sdpa",
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A random-weight ``LlavaForConditionalGeneration`` (LLaVA-1.5 layout: CLIP layer -2, CLS dropped) in eval mode,
    and inputs for one prompt: ``BOS + text_before-1`` text tokens, ``(image_size // patch_size)**2`` image tokens,
    ``text_after`` text tokens, one ``image_size`` image. Deterministic in ``seed`` (per device). The weights are
    created on ``device`` in ``dtype`` directly (a 7B model in bf16 on a GPU needs no float32 copy on the host); the
    inputs are on ``device`` too. ``attn``: the attention implementation (``"sdpa"``, ``"flash_attention_2"``, ...)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    if image_size % patch_size:
        raise ValueError(f"image_size must be a multiple of patch_size, got {image_size} and {patch_size}")
    if text_before < 1 or text_after < 0:
        raise ValueError(f"need text_before >= 1 (BOS) and text_after >= 0, got {text_before}, {text_after}")
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate or 4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=text_hidden,
        intermediate_size=text_intermediate or (8 * text_hidden // 3 + 63) // 64 * 64,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_heads,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = attn
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(default)
    model = model.to(device=device, dtype=dtype).eval()  # a no-op unless some buffer was made elsewhere
    model.generation_config.pad_token_id = 0

    gen = torch.Generator().manual_seed(seed)
    n_image = (image_size // patch_size) ** 2
    before = [1] + torch.randint(3, 32000, (text_before - 1,), generator=gen).tolist()
    after = torch.randint(3, 32000, (text_after,), generator=gen).tolist()
    input_ids = torch.tensor([before + [IMAGE_TOKEN_ID] * n_image + after])
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(1, 3, image_size, image_size, generator=gen).to(dtype),
    }
    return model, {k: v.to(device) for k, v in inputs.items()}


def build_small_llava(seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The small model: CLIP tower 224 px / patch 14 (256 patches + CLS), 128 wide, 4 layers; Llama LM 256 wide,
    4 layers; one image and a 20-token text prompt (276 tokens). Builds in well under a second."""
    return build_random_llava(seed=seed)


def prefill(model: nn.Module, inputs: dict[str, torch.Tensor]):
    """One prefill forward as ``generate`` runs it: no grad, logits of the last position only."""
    with torch.no_grad():
        return model(**inputs, logits_to_keep=1)


@dataclass
class LatencyRow:
    """One row of the latency table. ``skipped`` holds the reason when the method cannot run on the model."""

    method: str
    budget: int | None
    visual_tokens_in: int = 0
    visual_tokens_kept: int = 0
    gflops: float = 0.0
    flops_ratio: float = 1.0
    prefill_ms: float = 0.0
    speedup: float = 1.0
    skipped: str | None = None


def run_latency(
    budgets=DEFAULT_BUDGETS,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    model: nn.Module | None = None,
    inputs: dict[str, torch.Tensor] | None = None,
) -> list[LatencyRow]:
    """Rows of the latency table: ``unpatched`` first, then every registered method x budget (``keep=budget``).

    Prefill time is the median of ``repeats`` interleaved rounds (every variant once per round), so the
    speed-ups compare numbers measured under the same conditions. A method whose ``patch`` raises ValueError on
    this model gives one row with ``skipped`` set."""
    if model is None or inputs is None:
        model, inputs = build_small_llava(seed)
    budgets = [int(b) for b in budgets]
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    seq = inputs["input_ids"].shape[1]

    rows = [LatencyRow("unpatched", None, n_visual, n_visual, flops.prefill_flops(model.config, seq) / 1e9)]
    options = {m: get_method(m).run_options for m in list_methods(host="vlm", modality="image")}  # an image prompt
    contexts = {}
    for method in options:
        try:
            patch(model, method, keep=budgets[0] if budgets else 1, **options[method])
        except ValueError as err:
            rows.append(LatencyRow(method, None, skipped=str(err)))
            continue
        unpatch(model)
        for budget in budgets:
            with patched(model, method, keep=budget, **options[method]):
                prefill(model, inputs)  # also the warm-up
                st = stats(model)
            rows.append(
                LatencyRow(
                    method,
                    budget,
                    st.visual_tokens_in[0],
                    st.visual_tokens_kept[0],
                    st.prefill_flops / 1e9,
                    st.flops_ratio,
                )
            )
            contexts[f"{method}@{budget}"] = lambda m=method, b=budget: patched(model, m, keep=b, **options[m])

    run = lambda: prefill(model, inputs)  # noqa: E731
    variants = {"unpatched": run, **{name: run for name in contexts}}
    ms = interleaved_median_ms(variants, repeats=repeats, warmup=warmup, contexts=contexts)
    base = ms["unpatched"]
    for row in rows:
        if row.skipped is None:
            row.prefill_ms = ms["unpatched" if row.budget is None else f"{row.method}@{row.budget}"]
            row.speedup = base / row.prefill_ms if row.prefill_ms else float("nan")
    return rows
