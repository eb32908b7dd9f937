"""What a pruning method is: a config, the signals it needs, the stage it acts at, and ``select``.

A method never asks which model it is in: the engine hands it an :class:`ImageInputs` per image (or video)
whose signals were gathered by the adapter-driven hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

from .. import functional as F
from ..config import PruneConfig

#: signal names a method may ask for
#: the vision-entry signals the vision tower and projector produce (a method reading any needs ``pixel_values``)
TOWER_SIGNALS = frozenset({"features", "cls_attention", "vision_keys", "vision_qk", "projector_inputs"})
VISION_SIGNALS = TOWER_SIGNALS | {"prompt_embeds", "instruction"}
LLM_SIGNALS = frozenset(
    {"text_attention", "keys", "hidden", "layer_attention", "queries", "prompt_embeds", "rope_gravity"}
)
#: the fields (and ``extra`` keys) of :class:`ImageInputs` that signals fill -> the signals that fill each
SIGNAL_FIELDS = {
    "features": {"features"},
    "cls_attention": {"cls_attention"},
    "received": {"cls_attention"},
    "vision_keys": {"vision_keys"},
    "vision_qk": {"vision_qk"},
    "projector_inputs": {"projector_inputs"},
    "projector": {"projector_inputs"},
    "hidden": {"hidden"},
    "keys": {"keys"},
    "text_attention": {"text_attention", "layer_attention"},
    "attention_rows": {"queries"},
    "rope_gravity": {"rope_gravity"},
    "prompt_embeds": {"prompt_embeds"},
    "image_columns": {"prompt_embeds"},
    "text_columns": {"prompt_embeds"},
    "instruction": {"instruction"},
}
#: what ``Method.kept_count`` may be
KEPT_COUNTS = ("budget", "at_most", "own")


class UndeclaredSignal:
    """What a method finds in an :class:`ImageInputs` field (or ``extra`` key) of a signal it did not declare:
    reading it raises, naming the signal and the method's ``signals``."""

    def __init__(self, field: str, method: str, declared: frozenset, extra: bool = False):
        self.field, self.method, self.declared = field, method, declared
        self.where = f"extra[{field!r}]" if extra else field

    def error(self) -> RuntimeError:
        wanted = " or ".join(repr(s) for s in sorted(SIGNAL_FIELDS[self.field]))
        return RuntimeError(
            f"method {self.method!r} read ImageInputs.{self.where}, which signal {wanted} fills, but it declares "
            f"signals={sorted(self.declared)}; add {wanted} to the method's `signals` (class attribute)"
        )


class _Extra(dict):
    """``ImageInputs.extra``: a key of an undeclared signal raises when read (``[]`` or ``get``)."""

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if isinstance(value, UndeclaredSignal):
            raise value.error()
        return value

    def get(self, key, default=None):
        return self[key] if key in self else default


@dataclass
class ImageInputs:
    """Everything a method may read about one image's (or video's) visual tokens: the fields both prune points give.
    The engine hands a method a :class:`VisionInputs` (vision entry) or a :class:`DecoderInputs` (decoder point);
    ``ImageInputs`` is their common type (annotate ``select`` with it). A field of the other kind reads as None
    (a vision-stage method reading ``hidden`` gets None), and a field of a signal the method did not declare raises.
    Calling ``ImageInputs(...)`` builds a :class:`DecoderInputs` when a decoder-only field is given, else a
    :class:`VisionInputs`.

    ``n`` the image's visual tokens reaching the point, ``k`` how many to keep, ``features`` ``[n, D]`` projected
    visual tokens (decoder points: those still present), ``image_start`` the image's first position (vision entry:
    in the prompt; decoder point: in the ``S`` tokens of ``hidden``), ``real_mask`` ``[n]`` bool, True where a token
    covers real image content rather than the padding of a padded-to-square image (only when the image sizes were
    given with ``vtprune.set_image_sizes``). Multi-point methods (:meth:`Method.layers`): ``layer`` the point's
    decoder layer K (0: vision entry) and ``n_original`` the image's visual token count before any point.
    ``extra``: ``"grid"`` the image's ``[1, 3]`` (t, h, w) patch grid (Qwen-VL; None elsewhere); with signal
    ``prompt_embeds`` (vision entry), ``"prompt_embeds"`` ``[T, D]`` the LLM input embeddings of the sample's real
    text tokens after the image; with signal ``instruction``, ``"instruction"`` the sample's text from
    ``vtprune.set_instructions`` (None when none was given).
    """

    n: int
    k: int
    features: torch.Tensor | None = None
    image_start: int = 0
    real_mask: torch.Tensor | None = None
    layer: int = 0
    n_original: int = 0
    extra: dict = field(default_factory=dict)

    def __new__(cls, *args, **kwargs):
        if cls is ImageInputs:  # the common type called directly: the record its keywords belong to
            cls = DecoderInputs if kwargs.keys() & _DECODER_ONLY else VisionInputs
        return object.__new__(cls)

    def __getattribute__(self, name):
        value = object.__getattribute__(self, name)
        if isinstance(value, UndeclaredSignal):
            raise value.error()
        return value

    def __getattr__(self, name):  # a field of the other kind of record: None, as before the split
        if name not in _ALL_FIELDS:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        undeclared = self.__dict__.get("_undeclared")
        if undeclared is not None and name in SIGNAL_FIELDS and not SIGNAL_FIELDS[name] & undeclared[1]:
            raise UndeclaredSignal(name, *undeclared).error()
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, k={self.k}, layer={self.layer})"

    def hide_undeclared(self, method: Method) -> ImageInputs:
        """Mark every field (and ``extra`` key) of a signal ``method`` did not declare, so that reading it raises
        instead of giving None (or a value filled for another method). Returns ``self``."""
        declared = frozenset(method.signals)
        object.__setattr__(self, "_undeclared", (method.name, declared))
        own = {f.name for f in fields(self)}
        extra = _Extra(self.extra)
        for name, signals in SIGNAL_FIELDS.items():
            if signals & declared:
                continue
            if name in ("prompt_embeds", "instruction"):  # vision stage: extra keys
                extra[name] = UndeclaredSignal(name, method.name, declared, extra=True)
            if name in own:
                object.__setattr__(self, name, UndeclaredSignal(name, method.name, declared))
        self.extra = extra
        return self


@dataclass(repr=False)
class VisionInputs(ImageInputs):
    """What the vision entry (after the projector) gives a method about one image, beyond :class:`ImageInputs`.

    ``cls_attention`` ``[C, L, H, 1+P]`` CLS rows of the requested vision layers for each of the image's ``C``
    crops, and ``pack_crop_scores`` maps per-crop patch scores ``[C, P]`` to the image's ``n`` visual tokens.
    ``vision_keys`` ``[C, L, 1+P, Dh]`` head-mean keys (``k_proj`` outputs) of the same vision layers; with
    ``importance="received"`` instead ``received`` ``[C, L, P]``, the attention each patch receives at those layers
    (mean over heads and queries; ``cls_attention`` is then None) and ``vision_keys`` ``[C, L, P, Dh]`` the head-mean
    keys as the layer uses them (after its rotary embedding), patches only. :func:`crop_importance` reads either.
    ``vision_qk`` ``[C, L, 2, 1+P, E]`` the ``q_proj`` (index 0) and ``k_proj`` (index 1) outputs of the same vision
    layers at full width (heads concatenated), CLS first (towers with a CLS token and ``importance="cls"`` only; None
    with ``importance="received"``).
    ``token_patches(C, P)`` ``[n, m]`` int64: the flat crop patches ``c * P + p`` each visual token carries (``m`` per
    token, e.g. Qwen's 2x2 merge unit), -1 for a token that carries none (LLaVA-NeXT's row separators).
    ``projector_inputs`` ``[C, P, D_in]`` what the projector received for each crop (signal ``projector_inputs``),
    ``projector`` the per-token projector ``[N, D_in] -> [N, D]`` in float32 (a float32 copy for fp16/bf16 models).
    ``frames``: for a video, its frame count ``T`` as the LLM sees it (Qwen-VL: temporal patches, each two frames;
    LLaVA-NeXT-Video: sampled frames): the unit's ``n`` tokens are ``T`` frames of ``n // T`` tokens in frame order,
    raster order inside a frame (frame ``t``'s token ``i`` at ``t * (n // T) + i``); None for an image.
    """

    cls_attention: torch.Tensor | None = None
    vision_keys: torch.Tensor | None = None
    vision_qk: torch.Tensor | None = None
    received: torch.Tensor | None = None
    pack_crop_scores: Callable[[torch.Tensor], torch.Tensor] | None = None
    token_patches: Callable[[int, int], torch.Tensor] | None = None
    projector_inputs: torch.Tensor | None = None
    projector: torch.nn.Module | None = None
    frames: int | None = None


@dataclass(repr=False)
class DecoderInputs(ImageInputs):
    """What a decoder point (before layer K) gives a method about one image, beyond :class:`ImageInputs`.

    ``hidden`` ``[S, D]`` input of layer K for the image's sample (padding removed), ``keys`` ``[S, Hkv*Dh]``
    post-RoPE keys of layer K-1, ``text_attention`` ``[H, S]`` attention of the last prompt token at layer K-1,
    ``final_norm`` the language model's final norm. Signal ``layer_attention``: ``text_attention`` is then the last
    prompt token's attention at layer K itself, recomputed on layer K's input (its input norm, q/k projections and
    rotary tables) instead of layer K-1's. Signal ``queries``: ``attention_rows(columns)`` gives ``[H, R, S]``
    attention probabilities of layer K-1 for the query tokens at the original prompt ``columns [R]`` (present text
    tokens) over the ``S`` slots of the current sequence (causal, padding masked). Signal ``rope_gravity`` (with
    ``queries``): ``rope_gravity(columns)`` gives ``[R, S]`` the RoPE-only logit of layer K-1 between those rows and
    every slot (:func:`vtprune.functional.rope_gravity`: all-ones q and k rotated to the positions the layer used;
    SparseVLM+). Signal ``prompt_embeds`` (SparseVLM): ``prompt_embeds`` ``[S0, D]`` the language model's input
    embeddings of the row (original prompt columns), ``image_columns`` ``[n_original]`` the image's columns in it and
    ``text_columns`` the columns of the real non-visual tokens after the image.
    """

    hidden: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    text_attention: torch.Tensor | None = None
    final_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    attention_rows: Callable[[torch.Tensor], torch.Tensor] | None = None
    rope_gravity: Callable[[torch.Tensor], torch.Tensor] | None = None
    prompt_embeds: torch.Tensor | None = None
    image_columns: torch.Tensor | None = None
    text_columns: torch.Tensor | None = None


_SHARED = frozenset(f.name for f in fields(ImageInputs))
_DECODER_ONLY = frozenset(f.name for f in fields(DecoderInputs)) - _SHARED
_ALL_FIELDS = frozenset(f.name for f in fields(VisionInputs)) | _DECODER_ONLY


def video_tokens(image: VisionInputs, method: str) -> torch.Tensor:
    """``[T, N, D]`` a video unit's projected features (signal ``features``) as ``T`` frames of ``N = n // T``
    tokens, for a video method (``modalities = {"video"}``). Raises ``ValueError`` naming ``method`` when the
    model's adapter cannot split the video into frames (``frames`` None) or an earlier step of a schedule already
    pruned it (``n < n_original``: the frames are no longer whole)."""
    if image.frames is None:
        raise ValueError(
            f"{method}: this video's tokens are not split into frames for this model (VisionInputs.frames is None: "
            "ModelAdapter.video_frames cannot tell its frames); a video method needs them. Use an image method "
            "(vtprune.list_methods(modality='image')), which treats the video as one unit"
        )
    if image.n_original and image.n != image.n_original:
        raise ValueError(
            f"{method}: the video reaches it with {image.n} of its {image.n_original} tokens (an earlier step of the "
            "schedule pruned it); a video method needs whole frames: put it first in the schedule"
        )
    return image.features.reshape(image.frames, image.n // image.frames, -1)


def crop_importance(image: ImageInputs) -> torch.Tensor:
    """``[C, P]`` float32 importance of each crop patch, summed over the method's vision layers: the head-mean CLS
    row with the CLS key dropped (``importance="cls"``, ``vtprune.functional.cls_scores``) or the attention the patch
    receives (``importance="received"``, ``vtprune.functional.received_attention``). Map it to the image's visual
    tokens with ``image.pack_crop_scores``."""
    if image.received is not None:
        return image.received.float().sum(dim=1)
    return F.cls_scores(image.cls_attention, slice(None))


@dataclass
class Selection:
    """What a merging method returns instead of bare indices: the ascending kept indices and, for each kept token,
    the vector that replaces it (vision stage: the projected feature; llm stage: the hidden state entering layer
    K), e.g. the mean of the tokens merged into it. Kept tokens keep their original position ids."""

    kept: torch.Tensor  # [k] int64, ascending
    merged: torch.Tensor | None = None  # [k, D]
    #: ``[k, n]`` float: ``merged[i] = sum_j weights[i, j] * x[j]`` over the unit's ``n`` input vectors (how the
    #: engine merges other per-token streams the same way, e.g. Qwen3-VL's DeepStack levels). None: not given
    weights: torch.Tensor | None = None


class Method:
    """Base class of registered methods (see ``vtprune.registry.register_method``)."""

    name: ClassVar[str]
    config_cls: ClassVar[type[PruneConfig]]
    stage: ClassVar[str] = "vision"  # "vision": after the projector; "llm": before decoder layer K
    signals: ClassVar[frozenset[str]] = frozenset()
    #: whether the method handles AnyRes / multi-crop images (LLaVA-NeXT)
    multi_crop: ClassVar[bool] = True
    #: whether ``select`` returns a :class:`Selection` with merged vectors (not only kept indices)
    merges: ClassVar[bool] = False
    # -- facts the registry record carries for other consumers (vtprune.registry.MethodSpec) --
    #: the kept tokens follow from the image / video grid and the options alone, never from the pixels (the vLLM
    #: plugin sizes Qwen3-VL video frames before the vision tower runs)
    kept_from_grid: ClassVar[bool] = False
    #: what the method prunes: ``"image"`` and / or ``"video"`` units (a video method reads ``VisionInputs.frames``)
    modalities: ClassVar[frozenset[str]] = frozenset({"image", "video"})
    #: options with which the vLLM plugin serves a method it refuses on its defaults (e.g. no late drop)
    vllm_options: ClassVar[dict] = {}
    #: options demos, benchmarks and the robustness audit run the method with, where its defaults need something the
    #: bundled random models lack (e.g. a CLIP text tower)
    run_options: ClassVar[dict] = {}
    #: how the robustness audit's attack reaches the method (:class:`vtprune.methods.surrogates.Surrogate`); None:
    #: through the first signal it declares
    surrogate: ClassVar[object] = None
    #: why no image perturbation can change the method's selection (the audit reports it unreachable); None: reachable
    unreachable: ClassVar[str | None] = None
    #: how many indices ``select`` returns (the engine checks it, with their range, order and type):
    #: ``"budget"`` exactly ``image.k``; ``"at_most"`` 1 to ``image.k`` (e.g. ``fastv debias=True`` keeps no more
    #: than the image's real tokens); ``"own"`` the method's own count, 1 to ``image.n``: its budget is a nominal
    #: setting (``sparsevlm``'s per-budget counts and recycled tokens, ``dart budget_rounding="official"``, a merge
    #: inside the vision tower), and ``vtprune.stats`` shows it beside the real count. An instance may set its own.
    kept_count: ClassVar[str] = "budget"

    def __init__(self, config: PruneConfig):
        self.config = config

    def grid_count(self, n: int, frames: int | None = None) -> int | None:
        """How many tokens the method keeps of a unit of ``n`` visual tokens (a video: ``frames`` frames of
        ``n // frames``), known before its pixels are seen (the vLLM plugin sizes a prompt's placeholder run with it);
        None when the count depends on the pixels. Default: the config's budget when ``kept_count`` is
        ``"budget"``."""
        return self.config.budget(n) if self.kept_count == "budget" else None

    def bind(self, adapter) -> None:
        """Called once by ``vtprune.patch`` with the model's adapter (:class:`vtprune.adapters.ModelAdapter`), before
        the method's points and signals are read: resolve options whose default depends on the model (e.g.
        ``cdpruner``'s ``text``), or raise ``ValueError`` naming the option when the model cannot serve it. The
        config itself is not changed (one config may patch several models). Default: nothing to resolve."""

    def check_budget(self, num_layers: int, tokens: int | None) -> None:
        """Called by ``vtprune.patch`` after :meth:`bind` and the method's points are read (and so by the sweep's
        pre-check, which patches a weightless copy of each model): raise ``ValueError`` naming the budget (or option)
        when it cannot be met on a language model of ``num_layers`` decoder layers whose images have ``tokens``
        visual tokens each (``None``: the count depends on the image; check what does not depend on it), so it fails
        at ``patch`` rather than from a hook at the first forward. Default: every budget can be met."""

    #: the method acts inside the vision tower (:meth:`install_in`), so the visual tokens that reach the LLM are not
    #: the model's fixed per-image count (``vtprune.methods.tower``)
    acts_in_tower: ClassVar[bool] = False

    def install_in(self, adapter, hook, wrap) -> None:
        """Install what the method needs beyond the engine's hooks (``acts_in_tower`` methods: the vision tower's),
        through ``hook(handle)`` and ``wrap(obj, name, make)`` so ``unpatch`` removes it. Default: nothing."""

    def adjust_stats(self, stats, fwd) -> None:
        """Correct the ``PruneStats`` of a prefill the method took part in (e.g. a tower merge's vision FLOPs).
        Default: nothing."""

    def importance(self) -> str | None:
        """How the vision-side scores are read (signals ``cls_attention`` / ``vision_keys``): the method's
        ``importance`` option (``"cls"``, ``"received"`` or None: the tower's default); ``"cls"`` for a method without
        that option."""
        return getattr(self.config, "importance", "cls")

    def received_attention(self, q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scaling: float):
        """With ``importance="received"``: the per-token score ``[N]`` of one vision attention layer from its queries
        and keys (:class:`vtprune.adapters.base.VisionQK`), which the engine splits per image as ``received``.
        Default: the attention each token receives (:func:`vtprune.functional.received_attention`); a method whose
        official code reduces the layer's attention otherwise overrides it (``fastvid``)."""
        return F.received_attention(q, k, cu_seqlens, scaling)

    def pad_threshold(self) -> float | None:
        """The share of a patch that must be padding for ``vtprune.set_image_sizes`` to mask it (``real_mask``);
        None: the method does not set it (the engine's default 0.5)."""
        return None

    def layer(self, num_layers: int) -> int | None:
        """Decoder layer K before which an llm-stage method prunes (None for vision-stage methods)."""
        return None

    def layers(self, num_layers: int) -> list[int]:
        """Decoder layers before which an llm-stage method prunes, one prune point each (default: one point,
        :meth:`layer`). A multi-point method (``pdrop``, ``sparsevlm``) returns several, ascending."""
        return [self.layer(num_layers)]

    def point_budget(self, n: int, n_original: int, layer: int, point) -> int:
        """Tokens to keep at the point before decoder ``layer`` (0: the vision entry) of an image that has ``n`` of
        its ``n_original`` visual tokens left (default: the config's budget of ``n``). Multi-point methods give
        each point its own count; a count ``>= n`` skips the point for that image. ``point`` is the prune point
        of the model's plan (:class:`vtprune.engine.plan.PrunePoint`): ``point.num_layers`` the model's decoder
        depth, ``point.layers`` every point layer of this method on that model (read these from it: a method keeps
        no per-model state, one instance may be bound to several models)."""
        return self.config.budget(n)

    def drop_layer(self, num_layers: int) -> int | None:
        """Vision-stage methods only: a decoder layer K2 at which :meth:`drop_all` may remove every remaining
        visual token of a sample (None: no late drop)."""
        return None

    def drop_all(self, share: float) -> bool:
        """Whether a sample whose last prompt token puts ``share`` of its (head-mean) attention on the visual
        tokens at layer K2-1 loses all of them from layer K2 on."""
        return False

    def vision_layers(self, num_layers: int) -> list[int]:
        """Vision-encoder layers whose CLS attention rows this method reads (``cls_attention`` signal)."""
        return []

    def score(self, image: ImageInputs) -> torch.Tensor:
        """``[n]`` importance of each of the image's visual tokens (higher: kept first). A method that keeps the
        top ``image.k`` of one score defines only this and inherits :meth:`select` (kvpress's ``ScorerPress``).
        Default: none (the method defines :meth:`select`)."""
        raise NotImplementedError(f"method {self.name!r} defines neither select() nor score()")

    def select(self, image: ImageInputs) -> torch.Tensor | Selection:
        """Ascending image-relative indices (int64) of the ``image.k`` visual tokens to keep, or a
        :class:`Selection` when the kept tokens' vectors are replaced (merging methods). Default: the ``image.k``
        tokens of largest :meth:`score`, ties to the lower index, ascending (:func:`vtprune.functional.topk_indices`,
        compared in float32, float64 for float64 scores)."""
        return F.topk_indices(self.score(image), image.k)


def check_layer(name: str, layer: int, num_layers: int) -> int:
    """Validate an llm-stage pruning layer K (1 <= K < num_layers)."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"{name}: layer must be an int, got {layer!r}")
    if not 1 <= layer < num_layers:
        raise ValueError(
            f"{name}: layer={layer} is out of range for a {num_layers}-layer language model; allowed: "
            f"1 <= layer <= {num_layers - 1} (the signals come from layer K-1)"
        )
    return layer


def vision_layer(method: str, value: int | None, num_layers: int, option: str = "layer") -> int:
    """The vision-tower layer a method reads (:meth:`Method.vision_layers`): ``value``, or ``num_layers - 2`` when it
    is None (the layer whose output the projector reads: LLaVA's ``vision_feature_layer=-2``, the official code's
    ``attentions[-2]`` / ``hidden_states[-2]``). Raises ``ValueError`` naming ``method``'s ``option`` when the layer is
    outside ``0 <= layer < num_layers``."""
    layer = num_layers - 2 if value is None else value
    if not 0 <= layer < num_layers:
        raise ValueError(
            f"{method}: {option}={layer} is out of range for a {num_layers}-layer vision tower; "
            f"allowed: 0 <= {option} <= {num_layers - 1}"
        )
    return layer


def merge_weights(assignment: torch.Tensor, k: int) -> torch.Tensor:
    """``[k, n]`` mean-merge weights (:attr:`Selection.weights`) from ``assignment [n]``: the kept token (0..k-1)
    each input token merged into, -1 for dropped tokens. Row ``i`` averages the tokens assigned to ``i``."""
    n = assignment.numel()
    weights = torch.zeros(k, n, dtype=torch.float32, device=assignment.device)
    member = assignment >= 0
    weights[assignment[member], torch.arange(n, device=assignment.device)[member]] = 1.0
    return weights / weights.sum(1, keepdim=True).clamp(min=1.0)
