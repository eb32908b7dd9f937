"""A tiny random-weight LLaVA for offline sweeps (``random: llava`` in a sweep config), with the shapes
benchmark's processor (``vtprune.shapes.build_processor``: word-level tokenizer, 224 px CLIP image processor,
chat template), so it runs the ``vtprune_shapes`` task without any download; ``random: qwen2_vl_video``: a
Qwen2-VL with the video benchmark's processor (``vtprune.video_shapes``), for ``vtprune_video_shapes``.

Its weights are random, so its answers are noise; generation is restricted to the benchmark's answer words
(``suppress_tokens``), so its scores sit near chance level instead of at zero. It exists to exercise the
pipeline (lmms-eval, pruning, accounting, tables), not to measure accuracy.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["RANDOM_PRESETS", "random_model_config", "save_random_model"]

#: ``random:`` values a sweep config accepts
RANDOM_PRESETS = ("llava", "qwen2_vl_video")


def _check(preset: str) -> None:
    if preset not in RANDOM_PRESETS:
        raise ValueError(f"unknown random model preset {preset!r}; available: {list(RANDOM_PRESETS)}")


def random_model_config(preset: str = "llava"):
    """The ``LlavaConfig`` of the random model: CLIP 224/14 (256 visual tokens), 64 wide, 2 layers; Llama LM
    128 wide, 4 layers, the shapes vocabulary. ``qwen2_vl_video``: the ``Qwen2VLConfig`` of the video benchmark's
    model (``vtprune.video_shapes.model_config``: 16 tokens per 64x64 frame)."""
    _check(preset)
    if preset == "qwen2_vl_video":
        from .. import video_shapes

        return video_shapes.model_config()
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from .. import shapes

    tok = shapes.build_tokenizer()
    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=shapes.IMAGE_SIZE,
            patch_size=shapes.PATCH,
        ),
        text_config=LlamaConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tok),
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def save_random_model(path: str | Path, preset: str = "llava", seed: int = 0) -> Path:
    """Build the random model (deterministic in ``seed``) and save it with its processor to ``path``."""
    import torch
    from transformers import LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration

    from .. import shapes, video_shapes

    config = random_model_config(preset)
    bench = video_shapes if preset == "qwen2_vl_video" else shapes
    processor = bench.build_processor()
    tok = processor.tokenizer
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        cls = Qwen2VLForConditionalGeneration if preset == "qwen2_vl_video" else LlavaForConditionalGeneration
        model = cls(config).eval()
    answers = set(tok.convert_tokens_to_ids(list(bench.ANSWER_WORDS)))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.suppress_tokens = [i for i in range(len(tok)) if i not in answers]
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
