"""The one place that knows transformers' calling conventions (supported: transformers >= 5.23, < 6).

Everything vtprune reads from or passes to transformers' modelling code goes through here, so the next rename
is a one-line change:

* the KV-cache keyword of forwards, decoder layers and mask functions: ``past_key_values=`` up to 5.23,
  ``cache=`` from 5.24 (the old name is a deprecated alias there until 5.40), and the output field that returns
  the cache (``past_key_values`` / ``cache``);
* the mask function of each decoder layer type (``create_causal_mask``, ``create_sliding_window_causal_mask``,
  ``create_recurrent_attention_mask``) and their arguments (``cache`` / ``past_key_values``), and how a host composes
  bidirectional image blocks with them (``block_sequence_ids``, ``blockwise_overlay``: Gemma 3);
* which tokens are the prompt of a ``generate`` call: its ``input_ids`` (keyword ``input_ids`` / ``inputs``, or
  the first positional argument), whatever forwards its decoding loop then runs (assisted decoding's first forward
  appends candidate tokens, ``prefill_chunk_size`` splits the prompt, ``use_cache=False`` re-runs it grown);
* how a cache reports its length: ``Cache.get_seq_length(layer_idx)`` (what generate, position ids and
  ``rope_deltas`` consumers read) and ``Cache.get_query_offset(layer_idx)`` (what the mask functions read), and
  which caches are static (pre-allocated, ``is_compileable``);
* Qwen-VL image processors: where their pixel bounds live (``size`` with ``shortest_edge`` / ``longest_edge``, or the
  older ``min_pixels`` / ``max_pixels`` attributes) and their ``smart_resize`` (the sweeps' ``downsample`` row);
* the loss: a ``*ForConditionalGeneration`` forward computes ``self.loss_function(logits, labels, vocab_size,
  **kwargs)`` (by keyword or position) on the inner model's output; ``loss_function`` reads the instance attribute
  ``_loss_function`` first (:func:`wrap_loss_function`).

Checked and found to need nothing here: transformers 5.25 depends on ``kernels`` and turns functions decorated with
``use_kernel_forward_from_hub`` (Qwen3.5's ``causal_conv1d_forward``, ...) into ``nn.Module`` instances shared by every
model. vtprune hooks the model's own named modules (decoder layers, attention, projections), never those kernel
layers, and the FLOPs of Qwen3.5's linear-attention layers are unchanged (``tests/tools/test_flops.py``). What 5.25
broke was torch's ``FlopCounterMode`` module tracker in the test's cross-check (it hooks gradients of module inputs that
require grad); the cross-check freezes the model's parameters.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers import masking_utils

#: the oldest transformers release vtprune is tested with (pyproject's floor; ``make test-oldest``)
MIN_TRANSFORMERS = "5.23.0"
#: keyword names a host may use for the KV cache, newest first
CACHE_KEYWORDS = ("cache", "past_key_values")


def check_transformers() -> None:
    """Raise a clear ``ImportError`` when the installed transformers is older than vtprune supports."""
    found = Version(transformers.__version__)
    if found < Version(MIN_TRANSFORMERS) or found.major >= 6:
        raise ImportError(
            f"vtprune supports transformers >= {MIN_TRANSFORMERS}, < 6; found {transformers.__version__}. "
            f"Install a supported release: pip install 'transformers>={MIN_TRANSFORMERS},<6'"
        )


# -- generate's prompt ----------------------------------------------------------------------------------------
def generate_prompt(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The prompt ids ``[B, S]`` of a ``generate(*args, **kwargs)`` call (``generate(inputs=None, ...)``: the first
    positional argument, or keyword ``input_ids`` / ``inputs``), or None (``inputs_embeds`` only)."""
    ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    return ids if torch.is_tensor(ids) and ids.ndim == 2 else None


def prefill_chunk_size(model, kwargs: dict[str, Any]) -> int | None:
    """The ``prefill_chunk_size`` a ``generate(**kwargs)`` call runs its prompt with (keyword, the call's
    ``generation_config``, or the model's), or None (the prompt in one forward)."""
    if "prefill_chunk_size" in kwargs:
        return kwargs["prefill_chunk_size"]
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return getattr(config, "prefill_chunk_size", None)


# -- the cache keyword --------------------------------------------------------------------------------------
def get_cache(kwargs: dict[str, Any]):
    """The KV cache a forward / decoder layer was called with (under either keyword), or None."""
    for name in CACHE_KEYWORDS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def output_cache(output: Any):
    """The cache a model output carries (field ``cache`` from 5.24, ``past_key_values`` before), or None. Reads only
    the field the output class declares (5.24's ``past_key_values`` property is a deprecated alias that logs)."""
    if not dataclasses.is_dataclass(output):
        return None
    declared = {f.name for f in dataclasses.fields(output)}
    for name in CACHE_KEYWORDS:
        if name in declared:
            return getattr(output, name)
    return None


#: ``_cache_keyword``'s answers per function: a plain dict, not ``functools.cache`` (the lookup runs inside a patched
#: forward, which users ``torch.compile``; dynamo warns on every lru_cache-wrapped call it traces)
_CACHE_KEYWORD: dict = {}


def _cache_keyword(fn) -> str:
    name = _CACHE_KEYWORD.get(fn)
    if name is None:
        params = inspect.signature(fn).parameters
        name = next((n for n in CACHE_KEYWORDS if n in params), None)
        if name is None:
            raise TypeError(
                f"{fn.__qualname__} takes none of the cache keywords {CACHE_KEYWORDS}: unsupported transformers"
            )
        _CACHE_KEYWORD[fn] = name
    return name


def causal_masks(
    config,
    inputs_embeds: torch.Tensor,
    attention_mask,
    cache,
    layers: dict[str, int],
    block_ids: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The decoder's masks for ``inputs_embeds`` ``[B, q, D]`` over ``cache`` and the 2-D ``attention_mask``
    ``[B, cached + q]`` (or None), keyed by layer type, as the host's decoder builds them. ``layers`` maps each layer
    type the masks are for (``full_attention``, ``sliding_attention``, ``linear_attention``: Gated DeltaNet /
    Mamba-style layers, which take the 2-D padding mask of the local sequence) to a layer index of that type whose
    cache sizes the mask.

    ``block_ids`` ``[B, cached + q]`` (long, -1: none): tokens of one block attend to each other bidirectionally, the
    rest causally (Gemma 3's image tokens), composed as Gemma 3's ``create_masks_for_vision_model`` does: full layers
    OR(causal, block), sliding layers AND(window, OR(causal, block))."""
    common = dict(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=None)
    masks = {}
    for kind, layer_idx in layers.items():
        fn = _MASK_FUNCTIONS.get(kind)
        if fn is None:
            raise NotImplementedError(
                f"decoder layers of type {kind!r} are not supported by vtprune yet (known: {sorted(_MASK_FUNCTIONS)})"
            )
        fn = getattr(masking_utils, fn)
        extra = {} if kind == "linear_attention" else {"layer_idx": layer_idx}
        if block_ids is not None and kind == "full_attention":
            extra["block_sequence_ids"] = block_ids
        elif block_ids is not None and kind == "sliding_attention":
            fn = masking_utils.create_causal_mask
            extra.update(
                or_mask_function=masking_utils.blockwise_overlay(_pad_blocks(common, cache, layer_idx, block_ids)),
                and_mask_function=masking_utils.sliding_window_overlay(config.sliding_window),
            )
        elif block_ids is not None:
            raise NotImplementedError(
                f"bidirectional image blocks on decoder layers of type {kind!r} are not "
                "supported (known: full_attention, sliding_attention)"
            )
        masks[kind] = fn(**common, **{_cache_keyword(fn): cache}, **extra)
    return masks


def _pad_blocks(common: dict, cache, layer_idx: int, block_ids: torch.Tensor) -> torch.Tensor:
    """``block_ids`` padded (-1) to the key length layer ``layer_idx``'s mask spans, as the host pads them for its
    sliding mask (a mask function given as an overlay is not padded by the mask builder)."""
    args = (common["config"], common["inputs_embeds"], common["attention_mask"], cache, None, layer_idx)
    early_exit, _, _, _, kv_length, _, kv_offset = masking_utils._preprocess_mask_arguments(*args)
    if early_exit:
        return block_ids
    return masking_utils.maybe_pad_block_sequence_ids(block_ids, common["attention_mask"], kv_length, kv_offset)


#: the host's mask function for each decoder layer type
_MASK_FUNCTIONS = {
    "full_attention": "create_causal_mask",
    "sliding_attention": "create_sliding_window_causal_mask",
    "linear_attention": "create_recurrent_attention_mask",
}


def length_layer(cache, layer_idx: int = 0) -> int:
    """The layer whose stored length ``cache.get_seq_length(layer_idx)`` reads: hybrid caches (linear-attention
    layers keep a fixed-size state, not a sequence) answer layer 0 from their first attention layer."""
    layers = getattr(cache, "layers", None)
    if layer_idx != 0 or not layers or hasattr(layers[0], "get_seq_length"):
        return layer_idx
    return next((i for i, layer in enumerate(layers) if hasattr(layer, "get_seq_length")), layer_idx)


# -- cache lengths ----------------------------------------------------------------------------------------
def stored_length(cache, layer_idx: int = 0) -> int:
    """How many positions layer ``layer_idx`` of ``cache`` physically holds (whatever the cache reports to its
    other consumers; see :func:`vtprune.engine` 's pruned caches)."""
    if cache is None:
        return 0
    if not callable(getattr(type(cache), "get_seq_length", None)):
        raise TypeError(
            f"the KV cache must be a transformers Cache (e.g. DynamicCache, or none), got {type(cache).__name__}"
        )
    return int(type(cache).get_seq_length(cache, layer_idx))


def is_static(cache) -> bool:
    """A pre-allocated cache (``StaticCache`` and kin: ``cache_implementation="static"``)."""
    return bool(getattr(cache, "is_compileable", False))


def report_lengths(cache, hidden) -> None:
    """Make ``cache`` report ``stored + hidden(cache, layer_idx)`` as its length to every consumer that asks
    ``get_seq_length`` (generate's slicing of new tokens, default position ids, M-RoPE decode positions), while
    the mask functions (``get_query_offset``) keep seeing what each layer stores. On this instance only, as methods
    bound to it: ``copy.deepcopy`` of the cache rebinds them to the copy (``hidden`` must read the cache it is given,
    not a closed-over one)."""
    cls = type(cache)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(cls.get_seq_length(self, layer_idx)) + hidden(self, length_layer(self, layer_idx))

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return int(cls.get_seq_length(self, layer_idx))

    cache.__dict__["get_seq_length"] = types.MethodType(get_seq_length, cache)
    cache.__dict__["get_query_offset"] = types.MethodType(get_query_offset, cache)


def restore_lengths(cache) -> None:
    """Undo :func:`report_lengths`."""
    cache.__dict__.pop("get_seq_length", None)
    cache.__dict__.pop("get_query_offset", None)


# -- the loss ----------------------------------------------------------------------------------------------
#: the instance attribute ``PreTrainedModel.loss_function`` returns when set (its setter writes it)
LOSS_FUNCTION_ATTR = "_loss_function"


def wrap_loss_function(model, wrap, fn) -> None:
    """Make ``model``'s forward compute its loss with ``fn(original, logits, labels, *args, **kwargs)`` (``original``:
    the loss function in use before), through ``wrap(obj, name, value)`` (which records the attribute for removal)."""
    original = model.loss_function

    def loss_function(logits, labels, *args, **kwargs):
        return fn(original, logits, labels, *args, **kwargs)

    wrap(model, LOSS_FUNCTION_ATTR, loss_function)


# -- image processors -------------------------------------------------------------------------------------------
def qwen_pixel_bounds(image_processor) -> tuple[int, int]:
    """``(min_pixels, max_pixels)`` of a Qwen-VL image processor: its ``size`` (``shortest_edge`` / ``longest_edge``, a
    ``SizeDict`` or a dict in 5.x), else its ``min_pixels`` / ``max_pixels`` attributes. ``ValueError`` if neither."""
    size = getattr(image_processor, "size", None)
    get = size.get if isinstance(size, dict) else (lambda key: getattr(size, key, None))
    low, high = get("shortest_edge"), get("longest_edge")
    low = low if low is not None else getattr(image_processor, "min_pixels", None)
    high = high if high is not None else getattr(image_processor, "max_pixels", None)
    if low is None or high is None:
        raise ValueError(
            f"{type(image_processor).__name__} gives no pixel bounds (size.shortest_edge / longest_edge or "
            f"min_pixels / max_pixels); got size={size!r}"
        )
    return int(low), int(high)


def qwen_smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The ``(height, width)`` in pixels a Qwen-VL image processor resizes an image of ``height x width`` to
    (transformers' ``smart_resize``: multiples of ``factor`` = patch size x merge size, within the pixel bounds)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return int(h), int(w)


def versions() -> dict[str, str]:
    """Versions of Python and of the packages vtprune's behaviour depends on (what a test run had installed)."""
    import platform
    from importlib import metadata

    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "torchvision", "lmms_eval", "filelock", "numpy", "accelerate"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "-"
    return found
