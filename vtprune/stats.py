"""``PruneStats``: what the last pruning forward pass did."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class StageStats:
    """What one prune point did in the last pruning forward pass (an entry of ``PruneStats.stages``)."""

    method: str
    stage: str  # "vision" (after the projector) or "llm" (inside the language model)
    layer: int | None  # decoder layer K the point acts before (None: the vision entry)
    visual_tokens_kept: list[int]  # per sample, after this point (a late drop: 0 for the samples it emptied)
    select_ms: float
    late_drop: bool = False  # an all-or-nothing late drop (ToDRE stage 2)
    #: per sample, the visual tokens the method's budget names (``keep`` / ``ratio`` of each image's tokens at the
    #: method's first point, summed over the sample's images; None for a late drop). It differs from
    #: ``visual_tokens_kept`` where the budget is a nominal setting of the method's paper (``sparsevlm``'s per-budget
    #: counts, ``pdrop``'s layer average, ``dart budget_rounding="official"``) or an image had fewer real tokens
    visual_tokens_nominal: list[int] | None = None


def layer_lengths(stages: list[StageStats], row: int, visual_in: int, prompt_len: int, num_layers: int) -> list[int]:
    """Per decoder layer, the prompt length sample ``row`` ran on: ``prompt_len`` less the visual tokens that the
    points acting at or before that layer removed (``visual_in`` before the first point)."""
    lengths = []
    for i in range(num_layers):
        kept = visual_in
        for stage in stages:
            if (stage.layer or 0) <= i:
                kept = stage.visual_tokens_kept[row]
        lengths.append(prompt_len - (visual_in - kept))
    return lengths


@dataclass
class PruneStats:
    """Statistics of the last forward pass of a patched model that had visual tokens.

    Lists have one entry per sample (batch row). ``kept_indices[b]`` are the ascending indices of the kept visual
    tokens of sample b, relative to that sample's visual tokens in prompt order (all its images concatenated);
    for llm-stage methods, those kept at the pruning layer. FLOPs are analytic (``vtprune.flops``), summed over
    the batch's real (unpadded) tokens, vision tower and projector included.

    A "sample" is a row of the batch the prefill actually ran on. ``generate`` expands a batch of ``B`` prompts
    to ``B * k`` rows before the prefill, ``k = max(num_beams, num_return_sequences)`` (row ``b * k + j`` is copy
    ``j`` of prompt ``b``): after ``generate(num_beams=2)`` on one prompt the lists have 2 entries (the copies
    keep the same tokens), and the FLOPs count ``k`` prefills per prompt, as they ran.
    """

    visual_tokens_in: list[int]
    visual_tokens_kept: list[int]
    stage: str
    layer: int | None
    select_ms: float
    prefill_flops: int
    prefill_flops_full: int
    kept_indices: list[torch.Tensor] = field(default_factory=list)
    #: methods with a late drop (``todre``): the decoder layer, and per sample whether every visual token left
    #: there (``visual_tokens_kept`` counts the tokens kept before it)
    late_drop_layer: int | None = None
    late_dropped: list[bool] | None = None
    #: one entry per prune point that ran, in the order they act (a schedule of several methods, or a method's
    #: own several points)
    stages: list[StageStats] = field(default_factory=list)
    #: per sample, the visual tokens the last selecting method's budget names (``StageStats.visual_tokens_nominal``)
    #: beside ``visual_tokens_kept``, what really reached the end: ``sparsevlm keep=28`` may keep 8 (its nominal
    #: counts), ``pdrop keep=64`` keeps fewer after its last stage (64 is the layer average)
    visual_tokens_nominal: list[int] = field(default_factory=list)
    #: merging methods (``visionzip``, ``pact``, ``pool``, ...): per sample, for each original visual token the index
    #: of the kept token it was merged into (a kept token: itself; -1: dropped), None without merges
    #: (``vtprune.viz`` draws the regions merged tokens cover from it)
    merged_into: list[torch.Tensor | None] = field(default_factory=list)
    #: per sample, the real (unpadded) tokens of its unpruned prompt; the language model's decoder layer count
    prompt_lengths: list[int] = field(default_factory=list)
    num_layers: int | None = None
    #: per sample, one entry per image / video in prompt order: for a video (``VisionInputs.frames`` ``T``) the
    #: tokens each of its ``T`` frames kept (what reaches the last decoder layer, in frame order), None for an image
    frame_tokens_kept: list[list[list[int] | None]] = field(default_factory=list)

    def __repr__(self) -> str:
        """One line: counts and FLOPs in full, ``kept_indices`` as the number of indices per sample (print
        ``stats.kept_indices`` for the indices themselves)."""
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "kept_indices":
                value = f"<{len(value)} tensors of {[int(t.numel()) for t in value]} indices>"
            elif f.name == "merged_into":
                value = f"<{sum(t is not None for t in value)} of {len(value)} samples merged>"
            elif f.name == "stages":
                value = f"<{len(value)} stage(s): {[s.method for s in value]}>"
            else:
                value = repr(value)
            parts.append(f"{f.name}={value}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def sequence_lengths(self, row: int = 0, prompt_len: int | None = None, num_layers: int | None = None) -> list[int]:
        """Per decoder layer, the length of the prompt that layer ran on and cached for sample ``row``, whose
        unpruned prompt has ``prompt_len`` real tokens (every prune point counted, a late drop too).
        ``prompt_len`` and ``num_layers`` default to what the forward pass recorded (``prompt_lengths[row]``,
        ``num_layers``)."""
        rows = len(self.visual_tokens_in)
        if isinstance(row, int) and not isinstance(row, bool) and 0 <= row < rows:
            if prompt_len is None and row < len(self.prompt_lengths):
                prompt_len = self.prompt_lengths[row]
        if num_layers is None:
            num_layers = self.num_layers
        for name, value in (("prompt_len", prompt_len), ("num_layers", num_layers)):
            if value is None and isinstance(row, int) and 0 <= row < rows:
                raise ValueError(f"{name} was not recorded by this PruneStats: give {name}=")
        for name, value, low, high in (
            ("row", row, 0, rows - 1),
            ("num_layers", num_layers, 1, None),
            ("prompt_len", prompt_len, self.visual_tokens_in[row] if 0 <= row < rows else 0, None),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < low or (high is not None and value > high):
                allowed = f"{low} <= {name} <= {high}" if high is not None else f"{name} >= {low}"
                raise ValueError(f"{name}={value} is out of range; allowed: {allowed}")
        if self.stages and num_layers <= max(s.layer or 0 for s in self.stages):
            raise ValueError(
                f"num_layers={num_layers} but a prune point acts at layer "
                f"{max(s.layer or 0 for s in self.stages)}: give the model's decoder layer count"
            )
        return layer_lengths(self.stages, row, self.visual_tokens_in[row], prompt_len, num_layers)

    @property
    def flops_ratio(self) -> float:
        """``prefill_flops / prefill_flops_full``."""
        return self.prefill_flops / self.prefill_flops_full if self.prefill_flops_full else 1.0
