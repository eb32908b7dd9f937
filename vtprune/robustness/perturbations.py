"""Benign perturbations of the stability study, and 8-bit quantization."""

from __future__ import annotations

import io

import numpy as np
import torch

#: benign perturbations of the stability study (name -> description)
PERTURBATIONS = {
    "gauss2": "Gaussian noise, sigma 2/255",
    "gauss4": "Gaussian noise, sigma 4/255",
    "jpeg75": "JPEG, quality 75",
    "shift1": "1-pixel shift right and down (edge replicated)",
    "bright+5": "brightness +5%",
    "bright-5": "brightness -5%",
}


def to_pil(x: torch.Tensor):
    from PIL import Image

    return Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def from_pil(im) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float() / 255


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to 8-bit levels (an image that can be saved as a PNG)."""
    return (x.clamp(0, 1) * 255).round() / 255


def perturb(x: torch.Tensor, name: str, generator: torch.Generator) -> torch.Tensor:
    """The benign perturbation ``name`` (:data:`PERTURBATIONS`) of an image ``[3, H, W]`` in [0, 1]; the result is
    8-bit quantized. ``generator`` seeds the noise."""
    from PIL import ImageEnhance

    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; allowed: {list(PERTURBATIONS)}")
    if name.startswith("gauss"):
        sigma = int(name[5:]) / 255
        return quantize(x + sigma * torch.randn(x.shape, generator=generator))
    if name == "jpeg75":
        buf = io.BytesIO()
        to_pil(x).save(buf, format="JPEG", quality=75)
        buf.seek(0)
        from PIL import Image

        with Image.open(buf) as im:
            return from_pil(im)
    if name == "shift1":
        return quantize(shift_image(x, 1, 1))
    factor = 1.05 if name == "bright+5" else 0.95
    return from_pil(ImageEnhance.Brightness(to_pil(x)).enhance(factor))


def shift_image(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Shift content right by ``dx`` and down by ``dy`` pixels (negative: left / up), replicating the edge."""
    h, w = x.shape[-2:]
    rows = (torch.arange(h) - dy).clamp(0, h - 1)
    cols = (torch.arange(w) - dx).clamp(0, w - 1)
    return x[..., rows, :][..., cols]
