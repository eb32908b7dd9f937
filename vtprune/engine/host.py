"""The host's calls around a patched forward: which columns of ``generate``'s first forward are its prompt
(:func:`prompt_part`), generate settings a pruned prompt cannot follow (:func:`check_generate`), and the labels of
the host's loss after a prefill that pruned (:func:`kept_labels`)."""

from __future__ import annotations

import torch

from .. import compat

_VISUAL_KEYS = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")


def uses_cache(model, kwargs: dict) -> bool:
    """Whether a ``generate`` call with ``kwargs`` keeps a KV cache (``use_cache=False`` re-runs the prompt)."""
    config = kwargs.get("generation_config") or model.generation_config
    return kwargs.get("use_cache", getattr(config, "use_cache", True)) is not False


def check_generate(model, kwargs: dict) -> None:
    """Refuse ``generate(prefill_chunk_size=...)`` with images: vtprune prunes a prompt in one forward."""
    visual = any(kwargs.get(k) is not None for k in _VISUAL_KEYS)
    if visual and (chunk := compat.prefill_chunk_size(model, kwargs)) is not None:
        raise ValueError(
            f"generate(prefill_chunk_size={chunk}) with images on a pruned model: transformers runs the prompt "
            "in chunks and hands each chunk its rows of the visual features as one tensor (without the "
            "per-image records the methods read), and a decoder point scores the visual tokens with the last "
            "prompt token, which only the last chunk holds. vtprune prunes a prompt in one forward: pass "
            "prefill_chunk_size=None (or unpatch)"
        )


def prompt_part(prompt: torch.Tensor | None, input_ids: torch.Tensor) -> int | None:
    """Which columns of a prompt's first forward inside ``generate`` (given ``prompt``, its prompt ids) are the
    prompt: a forward longer than it (assisted decoding appends candidate tokens; ``use_cache=False`` re-runs the
    grown sequence) selects on the prompt's columns, returned as their count; one that runs only a first part of it
    (a custom decoding loop) is refused. None: the forward is the prompt (or runs outside generate)."""
    if prompt is None:
        return None
    s, total = input_ids.shape[1], prompt.shape[1]
    if s < total:
        raise ValueError(
            f"a forward inside generate ran the first {s} of the prompt's {total} tokens: vtprune prunes a prompt "
            "in one forward (a decoder point scores the visual tokens with the last prompt token's attention, "
            "which a first part does not hold). Run the whole prompt in the decoding loop's first forward"
        )
    return total if s > total else None


def kept_labels(columns: tuple, logits: torch.Tensor, labels: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """``labels`` (one per prompt column) compacted to the slots a pruned prefill ran on, ``columns`` ``(cols [B, L],
    real [B, L], prompt shape)``; padding slots get ``ignore_index``: the loss is then the unpatched model's fed only
    the kept tokens, at their original positions, with their labels."""
    cols, real, shape = columns
    if kwargs.get("shift_labels") is not None:
        raise ValueError(
            "shift_labels (labels already shifted by one column) cannot follow a pruned prompt: the "
            "token after a kept one is the next kept one, not the next column. Pass labels (one per "
            "prompt column); vtprune compacts them to the kept tokens"
        )
    if tuple(labels.shape) != shape:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)}; a patched model needs one label per prompt "
            f"column, the shape of input_ids {shape}"
        )
    if logits.shape[1] != cols.shape[1]:
        raise ValueError(
            f"the loss got logits for {logits.shape[1]} positions but the pruned prompt has "
            f"{cols.shape[1]}: compute the loss with logits_to_keep=0 (the default)"
        )
    ignore = kwargs.get("ignore_index", -100)
    device = labels.device
    return labels.gather(1, cols.to(device)).masked_fill(~real.to(device), ignore)
