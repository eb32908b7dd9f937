"""Tiny random-weight Qwen2.5-VL and Qwen3-VL checkpoints saved offline (``save_pretrained``), with a word-level
tokenizer that
carries the Qwen special tokens and the Qwen image / video processor configs: what ``vllm serve`` and
``from_pretrained`` load, built at test time (nothing is downloaded).

Runs in both environments: vLLM's (its pinned transformers) and vtprune's (the Hugging Face reference path).
``python tests_vllm/checkpoint.py DIR [FAMILY]`` writes one (FAMILY: ``qwen2_5_vl``, the default, or ``qwen3_vl``).
"""

from __future__ import annotations

import json
import os
import sys

import torch

#: token ids (the language model's vocabulary has VOCAB entries)
VOCAB = 96
PAD, IM_START, IM_END = 0, 1, 2
WORDS = range(3, 80)  # "w3" ... "w79"
IMAGE_ID, VIDEO_ID, VSTART_ID, VEND_ID = 90, 91, 92, 93
SPECIAL = {
    PAD: "<|endoftext|>",
    IM_START: "<|im_start|>",
    IM_END: "<|im_end|>",
    IMAGE_ID: "<|image_pad|>",
    VIDEO_ID: "<|video_pad|>",
    VSTART_ID: "<|vision_start|>",
    VEND_ID: "<|vision_end|>",
}
#: Qwen2.5-VL: an image of 112 x 112 pixels is a 8 x 8 patch grid = 16 visual tokens after the 2 x 2 merge;
#: Qwen3-VL (16-pixel patches): 128 x 128 pixels = 16 visual tokens
PATCHES = {"qwen2_5_vl": 14, "qwen3_vl": 16}
PATCH, MERGE, TEMPORAL = PATCHES["qwen2_5_vl"], 2, 2
PIXELS = (56 * 56, 224 * 224)  # processor min / max pixels: sizes in between are kept (rounded to 2 patches)
FAMILIES = tuple(PATCHES)


def word(i: int) -> str:
    return SPECIAL.get(i, f"w{i}")


def _tokenizer(path: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word(i): i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL[PAD]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=SPECIAL[IM_END],
        pad_token=SPECIAL[PAD],
        additional_special_tokens=[SPECIAL[i] for i in (IM_START, IMAGE_ID, VIDEO_ID, VSTART_ID, VEND_ID)],
    )
    fast.save_pretrained(path)


def _model(path: str, seed: int, family: str) -> None:
    import transformers

    torch.manual_seed(seed)
    ids = dict(
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=VSTART_ID,
        vision_end_token_id=VEND_ID,
        tie_word_embeddings=False,
    )
    text = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=1024,
        pad_token_id=PAD,
        bos_token_id=IM_START,
        eos_token_id=IM_END,
    )
    if family == "qwen2_5_vl":
        vision = dict(
            depth=2,
            num_heads=2,
            hidden_size=64,
            intermediate_size=128,
            out_hidden_size=128,
            patch_size=PATCH,
            spatial_merge_size=MERGE,
            temporal_patch_size=TEMPORAL,
            in_channels=3,
            window_size=56,
            fullatt_block_indexes=[1],
        )
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
        cfg = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
        model = transformers.Qwen2_5_VLForConditionalGeneration(cfg)
    elif family == "qwen3_vl":
        # DeepStack taps vision layers 0 and 1: their merged features join after decoder layers 0 and 1
        vision = dict(
            depth=3,
            num_heads=2,
            hidden_size=64,
            intermediate_size=128,
            out_hidden_size=128,
            patch_size=PATCHES[family],
            spatial_merge_size=MERGE,
            temporal_patch_size=TEMPORAL,
            in_channels=3,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        )
        text.update(
            head_dim=32,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [4, 6, 6],
                "mrope_interleaved": True,
            },
        )
        cfg = transformers.Qwen3VLConfig(vision_config=vision, text_config=text, **ids)
        model = transformers.Qwen3VLForConditionalGeneration(cfg)
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    model.eval()
    with torch.no_grad():  # random init leaves some weights near zero; make every layer matter
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.08)
    model.generation_config.eos_token_id = None
    model.save_pretrained(path, safe_serialization=True)


def _processor(path: str, max_pixels: int, family: str) -> None:
    patch = PATCHES[family]
    common = dict(
        do_resize=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
        patch_size=patch,
        temporal_patch_size=TEMPORAL,
        merge_size=MERGE,
    )
    processor = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}[family]
    videos = {"qwen2_5_vl": "Qwen2VLVideoProcessor", "qwen3_vl": "Qwen3VLVideoProcessor"}[family]
    image = dict(
        common,
        image_processor_type="Qwen2VLImageProcessor",
        processor_class=processor,
        size={"shortest_edge": PIXELS[0], "longest_edge": max_pixels},
        min_pixels=PIXELS[0],
        max_pixels=max_pixels,
    )
    video = dict(
        common,
        video_processor_type=videos,
        processor_class=processor,
        size={"shortest_edge": PIXELS[0], "longest_edge": PIXELS[1]},
        min_pixels=PIXELS[0],
        max_pixels=PIXELS[1],
        do_sample_frames=False,
    )
    for name, data in (("preprocessor_config.json", image), ("video_preprocessor_config.json", video)):
        with open(os.path.join(path, name), "w") as f:
            json.dump(data, f, indent=1)


def build(path: str, seed: int = 0, max_pixels: int = PIXELS[1], family: str = "qwen2_5_vl") -> str:
    """Write the tiny checkpoint (weights, config, tokenizer, processor configs) of ``family`` (:data:`FAMILIES`) to
    ``path``; returns ``path``. ``max_pixels``: the image processor's cap (larger images are resized down to it)."""
    if family not in PATCHES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    os.makedirs(path, exist_ok=True)
    _model(path, seed, family)
    _tokenizer(path)
    _processor(path, max_pixels, family)
    return path


if __name__ == "__main__":
    print(build(sys.argv[1], family=sys.argv[2] if len(sys.argv) > 2 else "qwen2_5_vl"))
