"""The session: everything one ``patch`` installs on one model instance, and the flow of one forward pass.

Flow of a forward of a patched VLM (``model.model`` is the inner VLM, ``LM`` its language model), top to bottom:

1. ``_inner_pre`` (pre-hook on the inner VLM): a prompt with images on an empty cache starts a prefill; a call
   whose cache holds a pruned prompt (:class:`~.layout.PrunedPrompt`) continues it; anything else is left alone.
2. The wrapped feature methods (:mod:`.capture`) record each image's features and vision-side signals.
3. ``_lm_pre`` (pre-hook on the LM): prefill finds the units (:mod:`.units`) and runs the vision-entry point
   (select, merge, compact ``inputs_embeds`` / mask / position ids); a continuation compresses its mask through
   the prompt's stages (:meth:`.layers.LayerInputs.continue_prompt`).
4. Decoder points: hooks on layer K-1's attention capture its q/k (:class:`~.forward.LayerCapture`); the pre-hook
   of layer K scores (:mod:`.scoring`), selects and compacts (:mod:`.points`) in prefill, or sets the
   continuation's masks; layers after a point get its :class:`~.forward.LayerOverrides` (:mod:`.layers`). Any number
   of points run in one forward, in layer order.
5. ``_inner_post``: the prompt's layout goes onto the cache it filled; :mod:`.stats` records ``PruneStats``.

Where points act and with what budgets is the frozen :class:`~.plan.Plan` (:mod:`.plan`), the only thing the
session reads about its methods' placement; method inputs come from :mod:`.inputs`. Nothing changes a class or the
attention implementation; ``remove`` undoes everything (:mod:`.hooks`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .. import compat
from ..adapters import ModelAdapter
from ..methods.base import TOWER_SIGNALS, Method
from ..stats import PruneStats
from ..timing import clock
from . import host
from . import points as P
from .capture import VisionCapture
from .deepstack import DeepStack
from .forward import Forward, LayerCapture
from .hooks import Installed
from .inputs import decoder_inputs, vision_inputs
from .layers import LayerInputs
from .layout import ORPHANED_CACHE, STATIC_CACHE, attach_prompt, detach_prompt, pruned_prompt
from .plan import LATE_DROP, PrunePoint, bind
from .scoring import install_capture, point_signals
from .stats import make_stats
from .units import Unit, attach_real_masks, find_units, mark_videos


class Session:
    """Everything one ``patch`` installed on one model; ``remove()`` undoes it. ``methods``: one method, or a
    schedule of several (each acting at its own points)."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, methods: Method | list[Method]):
        self.model, self.adapter = model, adapter
        self.methods = [methods] if isinstance(methods, Method) else list(methods)
        self.method = self.methods[0]
        self.plan = bind(self.methods, adapter)
        self.num_layers = self.plan.num_layers
        self.points = list(self.plan.points)
        self.decoder_points = self.plan.decoder_points
        vision = self.plan.vision_point.method if self.plan.vision_point is not None else None
        self.capture = VisionCapture(adapter, vision, self._on_features)
        self.compact = any(m.config.positions == "compact" for m in self.methods)
        self.layer_inputs = LayerInputs(adapter, self.num_layers, self.compact)
        self.visual_ids = adapter.visual_token_ids()
        self._needs_embeds = any("prompt_embeds" in p.method.signals for p in self.decoder_points.values())
        self.pad_threshold = next((t for m in self.methods if (t := m.pad_threshold()) is not None), 0.5)
        self.fwd: Forward | None = None
        self.stats: PruneStats | None = None
        #: generate(use_cache=False) re-runs the prompt at every step: selections are reused for the whole call
        self._sticky: dict | None = None
        #: the methods already warned that they keep some unit whole (``points.select``: one warning per patch)
        self._warned: set[str] = set()
        #: the prompt ids of the ``generate`` call in progress (it repeats each row for beams / return sequences;
        #: its forwards may append candidate tokens to the prompt or split it into chunks)
        self._generate_ids: torch.Tensor | None = None
        #: some point reads the prompt's text (decoder points: its last token; prompt_embeds: the text after an image)
        self._reads_text = bool(self.decoder_points) or any("prompt_embeds" in p.method.signals for p in self.points)
        #: the last prefill that compacted the prompt: its slots' prompt columns, for the host's loss on ``labels``
        self._label_columns: tuple | None = None
        self._installed = Installed()
        self._rope = adapter.rope_fn() if self.decoder_points else None
        self.image_sizes: list | None = None  # for the next prompt (vtprune.set_image_sizes)
        self.instructions: list | None = None  # for the next prompt (vtprune.set_instructions)
        self.installed = False

    def __deepcopy__(self, memo):
        raise TypeError(
            "a model patched by vtprune cannot be deep-copied (its hooks and wrapped methods belong to "
            "this instance): vtprune.unpatch(model), copy it, then patch each copy"
        )

    # -- install / remove -----------------------------------------------------------------------------------
    def install(self) -> None:
        a, on = self.adapter, self._installed
        try:
            on.hook(self.model.register_forward_pre_hook(self._top_pre, with_kwargs=True))
            on.hook(a.inner.register_forward_pre_hook(self._inner_pre, with_kwargs=True))
            on.hook(a.inner.register_forward_hook(self._inner_post, always_call=True))
            on.hook(a.language_model.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
            self.capture.install(on.hook, on.wrap)
            for method in self.methods:  # a method acting inside the vision tower (vtprune.methods.tower)
                method.install_in(a, on.hook, on.wrap)
            if hasattr(self.model, "loss_function"):
                compat.wrap_loss_function(self.model, on.set, self._loss)
            if hasattr(self.model, "generate"):  # which tokens of generate's forwards are the prompt
                on.wrap(self.model, "generate", self._wrapped_generate)
            for i, layer in enumerate(a.decoder_layers):
                on.hook(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
            if a.deepstack_method is not None:
                on.wrap(a.language_model, a.deepstack_method, self._wrapped_deepstack)
            for point in self.decoder_points.values():
                if point.reads_previous_layer:
                    install_capture(on, a.decoder_layers[point.layer - 1].self_attn, point, lambda: self.fwd)
        except Exception:
            self.remove()
            raise
        self.installed = True

    def remove(self) -> None:
        self._installed.remove()
        self.capture.clear()
        self.fwd = None
        self.installed = False

    # -- the host's calls: generate, DeepStack injection, loss -----------------------------------------------
    def _wrapped_generate(self, original):
        """Records the prompt of a ``generate`` call: its first forward may run more than the prompt (assisted
        decoding's candidate tokens, ``use_cache=False``'s grown sequence), which then selects on the prompt's
        tokens only (:func:`.host.prompt_part`); ``prefill_chunk_size`` with images is refused.
        ``generate(use_cache=False)`` of a method that reads the prompt's text also reuses the first forward's
        selections at every step."""

        @functools.wraps(original)
        def generate(*args, **kwargs):
            sticky = {} if not host.uses_cache(self.model, kwargs) and self._reads_text else None
            host.check_generate(self.model, kwargs)
            outer = self._sticky, self._generate_ids
            self._sticky, self._generate_ids = sticky, compat.generate_prompt(args, kwargs)
            try:
                return original(*args, **kwargs)
            finally:
                self._sticky, self._generate_ids = outer

        return generate

    def _wrapped_deepstack(self, original):
        """The text model's DeepStack injection: once a point compacted or merged the sequence, each level's rows
        go to the slots that hold them (:class:`~.deepstack.DeepStack`); otherwise the host's own call."""

        @functools.wraps(original)
        def inject(hidden_states, visual_pos_masks, visual_embeds, *args, **kwargs):
            fwd = self.fwd
            if fwd is not None and fwd.prefill and fwd.deepstack is not None and fwd.deepstack.changed:
                return fwd.deepstack.inject(hidden_states, visual_embeds)
            return original(hidden_states, visual_pos_masks, visual_embeds, *args, **kwargs)

        return inject

    def _loss(self, original, logits, labels, *args, **kwargs):
        """The host's loss after a prefill that pruned: on ``labels`` compacted to the kept slots."""
        columns, self._label_columns = self._label_columns, None
        if columns is not None and labels is not None:
            labels = host.kept_labels(columns, logits, labels, kwargs)
        return original(logits, labels, *args, **kwargs)

    def _on_features(self, token_id: int, feats: list[torch.Tensor]) -> None:
        if self.fwd is not None and self.fwd.prefill:  # computed inside a forward (not by generate beforehand)
            self.fwd.features.setdefault(token_id, []).extend(feats)

    # -- 1. top-level / inner model: which kind of forward this is --------------------------------------------
    def _top_pre(self, module, args, kwargs):
        self._label_columns = None
        self.adapter.check_model_inputs(kwargs)

    def _inner_pre(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = compat.get_cache(kwargs)
        stored = compat.stored_length(cache)
        prompt = pruned_prompt(cache)
        if prompt is not None and stored == 0:  # the cache was reset: whatever comes is a new prompt
            detach_prompt(cache)
            prompt = None
        has_visual = any(kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos"))
        has_visual = has_visual or bool(kwargs.get("mm_encoder_outputs"))
        if prompt is not None:
            self.fwd = self._continuation(prompt, input_ids, kwargs, has_visual)
        elif has_visual:
            self.fwd = self._prefill(input_ids, kwargs, cache, stored)
        else:
            self.fwd = None

    def _continuation(self, prompt, input_ids, kwargs, has_visual: bool) -> Forward:
        if prompt.owner is not self:
            raise ValueError(ORPHANED_CACHE)
        if has_visual:
            raise ValueError(
                "new images on a KV cache that vtprune pruned are not supported; start a new prompt (no cache)"
            )
        return Forward(input_ids=input_ids, prefill=False, prompt=prompt, mask_in=kwargs.get("attention_mask"))

    def _prefill(self, input_ids, kwargs, cache, stored: int) -> Forward:
        if cache is not None and compat.is_static(cache):
            raise ValueError(STATIC_CACHE)
        if stored > 0:
            raise ValueError(
                f"images in a forward that continues a KV cache already holding {stored} positions (a later turn or a "
                "prefix cache): vtprune prunes the visual tokens of a prompt's first forward. Put the images in the "
                "conversation's first prompt, or unpatch to run this turn unpruned"
            )
        if input_ids is None:
            raise ValueError("a patched model needs input_ids (not only inputs_embeds) to locate the visual tokens")
        prompt_end = host.prompt_part(self._generate_ids, input_ids)
        rows = self._generate_ids.shape[0] if self._generate_ids is not None else None
        #: generate repeats each prompt row in place (repeat_interleave) for beams / return sequences
        copies = input_ids.shape[0] // rows if rows and input_ids.shape[0] % rows == 0 else 1
        texts, self.instructions = self.instructions, None
        if texts is not None and copies > 1 and len(texts) * copies == input_ids.shape[0]:
            texts = [t for t in texts for _ in range(copies)]
        fwd = Forward(
            input_ids=input_ids,
            prefill=True,
            image_sizes=self.image_sizes,
            instructions=texts,
            mask_in=kwargs.get("attention_mask"),
            row_copies=copies,
            prompt_end=prompt_end,
            token_types=self.adapter.token_types(kwargs, input_ids),
        )
        self.image_sizes = None
        for modality, encoded in (kwargs.get("mm_encoder_outputs") or {}).items():
            if encoded is not None:
                feats = self.capture.split_features(encoded.pooler_output)
                fwd.features.setdefault(self.capture.token_id(modality), []).extend(feats)
        return fwd

    # -- 3. language model: units, the vision entry, continuations ---------------------------------------------
    def _lm_pre(self, module, args, kwargs):
        fwd = self.fwd
        if fwd is None:
            return None
        embeds = kwargs["inputs_embeds"]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict):  # the host built each layer type's mask before the LM (Gemma 3): from this 2-D one
            mask = fwd.mask_in
        if mask is not None and mask.ndim != 2:
            raise ValueError(f"pruned models need a 2-D attention_mask, got shape {tuple(mask.shape)}")
        if not fwd.prefill:
            return self.layer_inputs.continue_prompt(fwd, kwargs, embeds, mask)
        if not self._start_sequence(fwd, kwargs, embeds, mask):
            self.fwd = None
            return None
        if self.plan.vision_point is None:
            return None
        return self._vision_entry(fwd, self.plan.vision_point, args, kwargs, embeds)

    def _start_sequence(self, fwd: Forward, kwargs, embeds, mask) -> bool:
        """The prefill's current sequence before any point (every prompt column, its units); False: no unit."""
        b, s = embeds.shape[:2]
        fwd.mask2d = torch.ones(b, s, dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        fwd.units = self._find_units(fwd)
        if not fwd.units:
            return False
        fwd.cols = torch.arange(s, device=embeds.device).expand(b, -1)
        fwd.real = fwd.mask2d.clone()
        fwd.visual_ids = torch.tensor(self.visual_ids, device=embeds.device)
        if self._needs_embeds:
            fwd.prompt_embeds = embeds
        if self.adapter.deepstack_method is not None and kwargs.get("deepstack_visual_embeds") is not None:
            fwd.deepstack = DeepStack.from_host(kwargs["visual_pos_masks"], kwargs["deepstack_visual_embeds"])
        if self.adapter.rotary_per_layer_type:  # decoder points compute each layer type's tables at these
            fwd.positions = self._positions(kwargs, embeds).expand(b, -1)
        return True

    def _vision_entry(self, fwd: Forward, point: PrunePoint, args, kwargs, embeds):
        """The vision-entry point: select per unit, merge, compact the LM's inputs (embeddings, mask, positions)."""
        t0 = clock()
        projector = self.capture.float32_projector

        def make_inputs(unit, slots, k):
            return vision_inputs(fwd, point, unit, k, embeds, projector)

        keep = P.select(point, fwd, make_inputs, self._sticky, self._warned)
        P.record(fwd, point, keep, t0)
        if keep is None:
            return None
        s, pos = embeds.shape[1], self._positions(kwargs, embeds)
        embeds = P.merge(fwd, embeds, point.method.name)
        layout = P.compact(fwd, keep, start=0)
        kwargs["inputs_embeds"] = layout.take(embeds, 1)
        # always pass a mask (kept position ids have gaps, which transformers would read as packed sequences)
        kwargs["attention_mask"] = layout.compress_mask(fwd.mask2d.long(), s)
        if fwd.token_types is not None:  # each image's kept tokens: one bidirectional block (the host's masks, rebuilt)
            kwargs["attention_mask"] = self.layer_inputs.masks(
                kwargs["inputs_embeds"], kwargs["attention_mask"], compat.get_cache(kwargs), 0, fwd.current_types()
            )
        kwargs["position_ids"] = layout.compact_positions() if self.compact else layout.take(pos, -1)
        if fwd.positions is not None and self.compact:
            fwd.positions = kwargs["position_ids"]
        if fwd.deepstack is not None:  # the host's own copy, kept consistent with the sequence (injection: ours)
            kwargs["visual_pos_masks"] = fwd.deepstack.index >= 0
        fwd.scrub_position_ids = True
        return args, kwargs

    def _positions(self, kwargs, embeds) -> torch.Tensor:
        """The prompt's position ids: the host's, or the adapter's default numbering."""
        pos = kwargs.get("position_ids")
        b, s = embeds.shape[:2]
        return self.adapter.default_position_ids(b, s, 0, embeds.device) if pos is None else pos

    def _find_units(self, fwd: Forward) -> list[Unit]:
        units = find_units(fwd.input_ids, self.visual_ids, fwd.features, self.capture.info, tiled=self.adapter.tiled)
        if (sizes := fwd.image_sizes) is not None:
            attach_real_masks(self.adapter, fwd.input_ids, units, sizes, self.pad_threshold, copies=fwd.row_copies)
        mark_videos(self.adapter, fwd.input_ids, units)
        needs = self.capture.signals & TOWER_SIGNALS
        if units and needs and any(u.info is None or u.features is None for u in units):
            raise ValueError(
                f"method {self.points[0].method.name!r} needs {sorted(needs)} from the vision tower; pass "
                "pixel_values (features computed by an unpatched model carry no signals)"
            )
        return units

    # -- 4. decoder layers: signals, points, the layers after them ---------------------------------------------
    def _layer_hook(self, index: int):
        def hook(module, args, kwargs):
            fwd = self.fwd
            if fwd is None:
                return None
            changed = True
            if fwd.overrides is not None and index > fwd.overrides.start:  # after an earlier point
                fwd.overrides.apply(kwargs, self.adapter.layer_type(index))
            elif fwd.scrub_position_ids:  # after the vision entry: kept position ids have gaps
                kwargs["position_ids"] = None
            else:
                changed = False
            point = self.decoder_points.get(index)
            if point is not None and (out := self._at_point(fwd, point, args, kwargs)) is not None:
                return out  # a point here: it starts from this layer's inputs as the earlier points left them
            return (args, kwargs) if changed else None

        return hook

    def _at_point(self, fwd: Forward, point: PrunePoint, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if not fwd.prefill:
            if point.layer not in fwd.decode_masks:
                return None
            masks = self.layer_inputs.continue_at(fwd, point.layer, hidden, kwargs, compat.get_cache(kwargs))
            return self._layer_inputs(point, hidden, kwargs, masks)
        if fwd.cols is None:
            return None
        if point.kind == LATE_DROP and not fwd.ran(point.method):
            fwd.capture = LayerCapture()
            return None  # the method's own first point kept everything: so does its late drop
        t0 = clock()
        keep, late_dropped = self._decide(fwd, point, hidden, kwargs)
        P.record(fwd, point, keep, t0, late_dropped)
        if keep is None:
            return None
        hidden = P.merge(fwd, hidden, point.method.name, point.layer)
        layout = P.compact(fwd, keep, start=point.layer)
        hidden, masks = self.layer_inputs.shorten(fwd, layout, point.layer, hidden, kwargs, compat.get_cache(kwargs))
        return self._layer_inputs(point, hidden, kwargs, masks)

    def _decide(self, fwd: Forward, point: PrunePoint, hidden, kwargs):
        """A decoder point's signals, then its selection (or a late drop): ``(keep [B, L] or None, late_dropped)``."""
        signals = point_signals(
            point, fwd, self.adapter, self._rope, hidden, kwargs.get("position_embeddings"), self.compact
        )
        if point.kind == LATE_DROP:
            return P.late_drop(fwd, point, signals.text_attention, self._sticky)
        final_norm = self.adapter.final_norm

        def make_inputs(unit, slots, k):
            return decoder_inputs(fwd, point, unit, slots, k, hidden, signals, final_norm)

        return P.select(point, fwd, make_inputs, self._sticky, self._warned), None

    def _layer_inputs(self, point: PrunePoint, hidden, kwargs, masks):
        """Layer K's call on the shortened sequence: ``hidden`` positional, its layer type's mask."""
        kwargs.pop("hidden_states", None)
        kwargs["attention_mask"] = masks[self.adapter.layer_type(point.layer)]
        return (hidden,), kwargs

    # -- 5. after the inner model: the cache's layout, stats ------------------------------------------------------
    def _inner_post(self, module, args, output):
        fwd, self.fwd = self.fwd, None
        if fwd is None or not fwd.prefill:
            return
        if fwd.prompt is not None:  # the LM ran on the kept slots: the host's loss reads labels at their columns
            self._label_columns = (fwd.cols, fwd.real, tuple(fwd.mask2d.shape))
        if fwd.prompt is not None and output is not None and (cache := compat.output_cache(output)) is not None:
            fwd.prompt.owner = self
            attach_prompt(cache, fwd.prompt)  # the cache now holds the pruned prompt: it carries its layout
        if fwd.records:
            self.stats = make_stats(fwd, self.adapter, self.num_layers, self.points)
            for method in self.methods:
                method.adjust_stats(self.stats, fwd)
