"""Calibration of attention debiasing: fit a model's positional attention trend (``vtprune calibrate``).

:func:`calibrate` runs the model with an :class:`AttentionRecorder` patched in (FastV's signal, every token kept) and
fits the trend of the last prompt token's attention over image positions (:func:`vtprune.functional.fit_trend`);
the resulting :class:`vtprune.debias.DebiasProfile` is what ``fastv``'s ``debias_weights=PATH`` loads.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from . import functional as F
from .adapters import get_adapter, supported_model_types
from .debias import DebiasProfile
from .engine import Session
from .methods.base import ImageInputs
from .methods.fastv import FastV, FastVConfig

__all__ = ["calibrate", "calibrate_files", "AttentionRecorder"]


class AttentionRecorder(FastV):
    """Not registered: keeps every token and records each image's attention row (:func:`calibrate`)."""

    kept_count = "own"  # every token

    def __init__(self, config: FastVConfig):
        super().__init__(config)
        self.rows: list[torch.Tensor] = []

    def select(self, image: ImageInputs) -> torch.Tensor:
        self.rows.append(self.scores(image).float().cpu())
        return torch.arange(image.n, device=image.text_attention.device)


def calibrate(model, batches: Iterable[dict], layer: int = 2, kind: str = "cubic") -> DebiasProfile:
    """Fit the recency trend of ``model`` at decoder layer ``layer`` (the attention of each prompt's last token at
    layer ``layer - 1`` over its image tokens, averaged over heads and images) on calibration ``batches`` (model
    input dicts with images, e.g. from the processor). Every image must have the same number of visual tokens.
    Returns the fitted :class:`DebiasProfile`; ``profile.save(path)`` for ``debias_weights=path``."""
    recorder = AttentionRecorder(FastVConfig(keep=1, layer=layer))
    session = Session(model, get_adapter(model), recorder)
    session.install()
    try:
        with torch.no_grad():
            for batch in batches:
                if not isinstance(batch, dict):
                    raise TypeError(f"calibration batches must be dicts of model inputs, got {type(batch).__name__}")
                model(**batch)
    finally:
        session.remove()
    rows = recorder.rows
    if not rows:
        raise ValueError("no image was seen: calibration batches need images (pixel_values) and their placeholders")
    lengths = {r.numel() for r in rows}
    if len(lengths) != 1:
        raise ValueError(
            f"calibration images have different numbers of visual tokens {sorted(lengths)}; "
            "use images of one size (one trend per token layout)"
        )
    mean = torch.stack(rows).mean(0)
    mean = mean / mean.sum()
    return DebiasProfile(
        kind,
        F.fit_trend(mean, kind),
        source="calibrated",
        model_type=model.config.model_type,
        layer=layer,
        images=len(rows),
    )


def calibrate_files(
    model_path: str, images: list[str], layer: int = 2, kind: str = "cubic", prompt: str = "Describe the image."
) -> DebiasProfile:
    """:func:`calibrate` a model saved at ``model_path`` (a local folder or hub id loadable by
    ``AutoModelForImageTextToText`` / ``AutoProcessor``) on image files, one image per prompt: the processor's
    chat template with the image and ``prompt``."""
    from PIL import Image
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    if not images:
        raise ValueError("calibration needs at least one image file")
    missing = [p for p in images if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"calibration image(s) not found: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    for path in images:  # before the model loads
        try:
            with Image.open(path) as im:
                im.verify()
        except (OSError, SyntaxError) as err:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"calibration image {path!r} is not an image PIL can read ({err})") from None
    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot read a transformers model config from {model_path!r} ({str(err).splitlines()[0]}); "
            f"calibration needs a VLM of a supported type: {', '.join(supported_model_types())}"
        ) from None
    if config.model_type not in supported_model_types():
        raise ValueError(
            f"{model_path!r} is a {config.model_type!r} model; calibration needs a VLM of a supported "
            f"type: {', '.join(supported_model_types())}"
        )
    processor = AutoProcessor.from_pretrained(model_path)
    model = AutoModelForImageTextToText.from_pretrained(model_path).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)

    def batches():
        for path in images:
            with Image.open(path) as im:
                yield dict(processor(images=im.convert("RGB"), text=text, return_tensors="pt"))

    return calibrate(model, batches(), layer=layer, kind=kind)
