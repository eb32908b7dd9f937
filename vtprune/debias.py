"""Attention debiasing (intcomp/attention-bias) for attention-scored pruners: recency profiles and calibration.

A *profile* is the positional trend of the attention that the last prompt token pays to image token ``i``; the
pruner multiplies its scores by ``w_i = trend(0) / trend(i)`` (``vtprune.functional.trend_weights``). Built-in
profiles are the official ones: ``"cubic"`` (the FastV vector) and ``"exp"`` (``exp(-beta i)``, the form shipped
for the other pruners). :func:`calibrate` fits a profile for a given model and layer on calibration images, and
:meth:`DebiasProfile.save` writes it to a JSON file that ``debias_weights=PATH`` loads.

The padding half of debiasing (zero score and no budget for patches that are padding of a padded-to-square image)
needs each image's original size: :func:`vtprune.set_image_sizes` passes them for the next prompt.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Iterable

import torch

from . import functional as F

__all__ = ["DebiasProfile", "builtin_profile", "load_profile", "calibrate"]


@dataclass(frozen=True)
class DebiasProfile:
    """A positional attention trend: ``kind`` ``"cubic"`` (4 coefficients, ``c0 = 1``) or ``"exp"`` (``(beta,)``),
    with where it came from (``source``: ``"official"`` or what it was fitted on)."""

    kind: str
    coefficients: tuple[float, ...]
    source: str = "official"
    model_type: str | None = None
    layer: int | None = None
    images: int | None = None

    def __post_init__(self):
        F.trend_weights(1, self.kind, self.coefficients)  # validates kind and coefficient count

    def weights(self, n: int) -> torch.Tensor:
        return F.trend_weights(n, self.kind, self.coefficients)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump({"vtprune_debias_profile": 1, **self.to_dict()}, f, indent=2)
            f.write("\n")


def builtin_profile(kind: str, beta: float = 0.003) -> DebiasProfile:
    """The official trends: ``"cubic"`` (FastV) or ``"exp"`` with ``beta``."""
    if kind == "cubic":
        return DebiasProfile("cubic", F.debias.FASTV_CUBIC)
    if kind == "exp":
        return DebiasProfile("exp", (float(beta),))
    raise ValueError(f"built-in debias profiles are 'cubic' and 'exp', got {kind!r}")


def load_profile(path: str | os.PathLike) -> DebiasProfile:
    """A profile written by :meth:`DebiasProfile.save` (``vtprune calibrate``)."""
    if not os.path.isfile(path):
        raise ValueError(f"debias profile file {str(path)!r} does not exist: debias_weights takes 'cubic', 'exp', "
                         "'none' or the path of a profile written by `vtprune calibrate`")
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.pop("vtprune_debias_profile", None) != 1:
        raise ValueError(f"{str(path)!r} is not a vtprune debias profile (written by `vtprune calibrate`)")
    data["coefficients"] = tuple(data["coefficients"])
    return DebiasProfile(**data)


def calibrate(model, batches: Iterable[dict], layer: int = 2, kind: str = "cubic") -> DebiasProfile:
    """Fit the recency trend of ``model`` at decoder layer ``layer`` (the attention of each prompt's last token at
    layer ``layer - 1`` over its image tokens, averaged over heads and images) on calibration ``batches`` (model
    input dicts with images, e.g. from the processor). Every image must have the same number of visual tokens.
    Returns the fitted :class:`DebiasProfile`; ``profile.save(path)`` for ``debias_weights=path``."""
    from .adapters import get_adapter
    from .engine import Session
    from .methods.fastv import AttentionRecorder, FastVConfig

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
        raise ValueError(f"calibration images have different numbers of visual tokens {sorted(lengths)}; "
                         "use images of one size (one trend per token layout)")
    mean = torch.stack(rows).mean(0)
    mean = mean / mean.sum()
    return DebiasProfile(kind, F.fit_trend(mean, kind), source="calibrated",
                         model_type=model.config.model_type, layer=layer, images=len(rows))


def calibrate_files(model_path: str, images: list[str], layer: int = 2, kind: str = "cubic",
                    prompt: str = "Describe the image.") -> DebiasProfile:
    """:func:`calibrate` a model saved at ``model_path`` (a local folder or hub id loadable by
    ``AutoModelForImageTextToText`` / ``AutoProcessor``) on image files, one image per prompt: the processor's
    chat template with the image and ``prompt``."""
    from PIL import Image
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from .adapters import supported_model_types

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
        raise ValueError(f"cannot read a transformers model config from {model_path!r} ({str(err).splitlines()[0]}); "
                         f"calibration needs a VLM of a supported type: {', '.join(supported_model_types())}") from None
    if config.model_type not in supported_model_types():
        raise ValueError(f"{model_path!r} is a {config.model_type!r} model; calibration needs a VLM of a supported "
                         f"type: {', '.join(supported_model_types())}")
    processor = AutoProcessor.from_pretrained(model_path)
    model = AutoModelForImageTextToText.from_pretrained(model_path).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)

    def batches():
        for path in images:
            with Image.open(path) as im:
                yield dict(processor(images=im.convert("RGB"), text=text, return_tensors="pt"))

    return calibrate(model, batches(), layer=layer, kind=kind)
