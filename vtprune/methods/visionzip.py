"""``visionzip`` (dvlab-research/VisionZip): dominant tokens by CLS attention plus contextual tokens merged by key
similarity; exactly ``keep`` tokens reach the LLM.

Vision stage, on the vision layer the projector reads (``L-2`` for LLaVA's feature layer -2, the official
``attentions[-2]`` / ``hidden_states[-2]`` / ``layers[-2]`` keys): ``keep - contextual`` dominant patches with the
highest CLS attention (summed over heads), then the remaining patches are merged onto ``contextual`` evenly spaced
targets by cosine similarity of that layer's head-mean keys; each target becomes itself plus the mean of the
patches merged into it, in the vision tower's space, and is then projected (``vtprune.functional.visionzip_select``).
Default ``contextual``: ``round(keep * 10 / 64)`` — the official 54 + 10 for 64, 108 + 20 for 128, 162 + 30 for 192.

Where this differs from the official code (documented deviations):

* the official LLaVA code feeds the CLS token as one of the dominant tokens (``dominant`` counts it); HF LLaVA
  drops CLS from the visual tokens, so here every dominant slot is a patch;
* the official code concatenates [dominant, contextual] and numbers them consecutively; here every kept token keeps
  its original position id (a contextual token sits at its target's position), like every vtprune method.

AnyRes (LLaVA-NeXT): per crop, as the official LLaVA-NeXT code does: the image's budget split evenly over its crops,
each crop's own selection over its tokens (an explicit ``contextual`` is per crop); row separators are kept only
when the budget exceeds the patches (the official code keeps none: its ``image_newline_expanded`` is never used).
``importance`` (docs/methods.md): ``"cls"`` (default where the tower has a CLS token) or ``"received"`` (the attention
each patch receives; default elsewhere). On Qwen the tokens are merge units: a token's score is its unit's mean, its
key the unit's 4 head-mean (post-RoPE) keys concatenated, and a contextual token the merger applied to merged
concatenated patch states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import functional as F
from ..config import PruneConfig, check_int_option
from ..registry import register_method
from ..signals import check_importance
from . import surrogates as S
from ._packing import packed_patches
from .base import ImageInputs, Method, Selection, crop_importance, vision_layer


@dataclass
class VisionZipConfig(PruneConfig):
    """VisionZip options. ``contextual``: merged tokens per image (None: ``round(k * 10 / 64)`` of the image's
    budget ``k``; AnyRes: per crop); ``layer``: the vision layer read (None: ``L - 2``); ``importance``: ``"cls"``,
    ``"received"`` or None (``"cls"`` where the tower has a CLS token, else ``"received"``).

    Raises ``ValueError`` if an option is neither None nor an int >= 0, or if ``keep`` is given and an explicit
    ``contextual >= keep`` would leave no dominant token. With ``ratio=`` the budget is only known per image, so
    that check happens in :meth:`split`, at forward time.
    """

    contextual: int | None = None
    layer: int | None = None
    importance: str | None = None

    def __post_init__(self):
        super().__post_init__()
        check_importance(self.importance)
        check_int_option("contextual", self.contextual, 0, optional=True)
        check_int_option("layer", self.layer, 0, optional=True)
        if self.keep is not None and self.contextual is not None and self.contextual >= self.keep:
            raise ValueError(
                f"visionzip: contextual={self.contextual} leaves no dominant token in keep={self.keep} "
                f"(keep = dominant + contextual); allowed: 0 <= contextual < keep, or contextual=None "
                f"(round(keep * 10 / 64) = {round(self.keep * 10 / 64)})"
            )

    def split(self, k: int, n: int | None = None) -> tuple[int, int]:
        """``(dominant, contextual)`` for a budget of ``k`` tokens (of an image's ``n`` visual tokens, if given,
        for the error message). Raises ``ValueError`` if an explicit ``contextual`` leaves no dominant token in
        ``k > 1`` (with ``keep=N``: an image with fewer than ``keep`` tokens; with ``ratio=r``: a small image or
        ratio); a budget of 1 token is one dominant token."""
        contextual = round(k * 10 / 64) if self.contextual is None else self.contextual
        if contextual >= k > 1:
            budget = f"keep={self.keep}" if self.keep is not None else f"ratio={self.ratio}"
            of = f" of {n} visual tokens" if n is not None else ""
            raise ValueError(
                f"visionzip: contextual={contextual} leaves no dominant token in a budget of {k} tokens "
                f"({budget}{of}); allowed: contextual < the per-image budget. Lower contextual, raise the budget, "
                "or use contextual=None (round(budget * 10 / 64))"
            )
        contextual = min(contextual, k - 1)
        return k - contextual, contextual


def even_shares(k: int, sizes: list[int]) -> list[int]:
    """``k`` split as evenly as possible over parts of ``sizes`` tokens (VisionZip keeps the same count in every
    crop), each share capped by its part's size (the excess goes to the other parts, earlier parts first)."""
    shares = [0] * len(sizes)
    left = min(k, sum(sizes))
    while left > 0:
        open_parts = [i for i in range(len(sizes)) if shares[i] < sizes[i]]
        each, extra = divmod(left, len(open_parts))
        for rank, i in enumerate(open_parts):
            add = min(sizes[i] - shares[i], each + (1 if rank < extra else 0))
            shares[i] += add
            left -= add
    return shares


@register_method("visionzip", VisionZipConfig)
class VisionZip(Method):
    stage = "vision"
    signals = frozenset({"features", "cls_attention", "vision_keys", "projector_inputs"})
    merges = True
    surrogate = S.Surrogate(
        "cls-attention",
        "the score of its dominant tokens (CLS attention of its layer); the "
        "contextual merge of the rest is not attacked",
        S.cls_scores,
    )

    def vision_layers(self, num_layers: int) -> list[int]:
        return [vision_layer("visionzip", self.config.layer, num_layers)]

    def select(self, image: ImageInputs) -> Selection:
        crop_scores = crop_importance(image)  # [C, P]
        c, p = crop_scores.shape
        keys = image.vision_keys[:, 0] if image.received is not None else image.vision_keys[:, 0, 1:]  # [C, P, Dh]
        scores = image.pack_crop_scores(crop_scores)  # [n], per visual token
        patches = image.token_patches(c, p).to(scores.device)  # [n, m]: the crop patches each token carries
        token_keys = keys.reshape(c * p, -1)[patches.clamp(min=0)].flatten(1)  # [n, m * Dh] (a unit's, concatenated)
        rows, _, _ = packed_patches(image)  # [n]: each token's projector row (-1: none)
        projector_in = image.projector_inputs.reshape(-1, image.projector_inputs.shape[-1])
        carrier = patches[:, 0] >= 0
        crop_of = torch.where(carrier, patches[:, 0] // p, -1)
        parts = [(crop_of == i).nonzero().squeeze(1) for i in range(c)]
        parts = [t for t in parts if t.numel()]
        k = min(image.k, int(carrier.sum()))
        kept, mix = [], []  # mix: each kept token's merge weights over the image's n tokens
        for tokens, share in zip(parts, even_shares(k, [t.numel() for t in parts])):
            if share == 0:
                continue
            dominant, contextual = self.config.split(share, tokens.numel())
            local, merge = F.visionzip_select(scores[tokens], token_keys[tokens], dominant, contextual)
            kept.append(tokens[local])
            mix.append(torch.zeros(local.numel(), image.n, device=merge.device).index_copy_(1, tokens, merge))
        if image.k > k:  # budget beyond the patches: add row separators as they are
            extra = (~carrier).nonzero().squeeze(1)[: image.k - k]
            kept.append(extra)
            mix.append(torch.nn.functional.one_hot(extra, image.n).float())
        kept, mix = torch.cat(kept), torch.cat(mix)
        order = torch.argsort(kept)
        kept, mix = kept[order], mix[order]
        merged = image.features[kept].clone()
        context = (mix != 0).sum(dim=1) > 1  # targets that absorbed other tokens
        if bool(context.any()):
            present = rows >= 0
            hidden = mix[context][:, present] @ projector_in[rows[present]].float()
            with torch.no_grad():
                merged[context] = image.projector(hidden).to(merged.dtype)
        return Selection(kept, merged, weights=mix)
