"""The session: everything one ``patch`` installs on one model instance, and the flow of one forward pass.

Flow of a forward of a patched VLM (``model.model`` is the inner VLM, ``LM`` its language model), top to bottom:

1. ``_inner_pre`` (pre-hook on the inner VLM): a prompt with images on an empty cache starts a prefill; a call
   whose cache holds a pruned prompt (:class:`~.layout.PrunedPrompt`) continues it; anything else is left alone.
2. The wrapped feature methods (:mod:`.capture`) record each image's features and vision-side signals.
3. ``_lm_pre`` (pre-hook on the LM): prefill finds the units (:mod:`.units`) and runs the vision-entry point
   (select, merge, compact ``inputs_embeds`` / mask / position ids); a continuation compresses its mask through
   the prompt's stages (the cache reports the unpruned length, so positions continue as for the unpruned prompt).
4. Decoder points (:mod:`.points`): hooks on layer K-1's attention capture its q/k; the pre-hook of layer K
   selects and compacts (prefill) or sets the continuation's masks; layers after a point get its masks / rotary
   tables. Any number of points run in one forward, in layer order.
5. ``_inner_post``: the prompt's layout goes onto the cache it filled; :mod:`.stats` records ``PruneStats``.

Nothing changes a class or the attention implementation; ``remove`` undoes everything.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from .. import compat
from ..adapters import ModelAdapter
from ..methods.base import KEPT_COUNTS, ImageInputs, Method
from ..stats import PruneStats
from ..timing import clock, elapsed_ms
from . import points as P
from .capture import VisionCapture, outside_checkpoint
from .deepstack import DeepStack
from .layout import ORPHANED_CACHE, STATIC_CACHE, attach_prompt, detach_prompt, pruned_prompt
from .stats import make_stats
from .units import Unit, attach_real_masks, find_units

_ABSENT = object()  # an attribute the instance did not have before ``_wrap``


def build_points(methods: list[Method], num_layers: int) -> list[P.PrunePoint]:
    """The prune points of a schedule, in the order they act; two at one point raise ``ValueError``."""
    pts = []
    for method in methods:
        if method.kept_count not in KEPT_COUNTS:
            raise ValueError(
                f"method {method.name!r} declares kept_count={method.kept_count!r}; allowed: "
                f"{KEPT_COUNTS} (see vtprune.methods.base.Method.kept_count)"
            )
        if method.stage == "llm":
            pts.extend(P.PrunePoint(method, k, P.LLM) for k in method.layers(num_layers))
        else:
            pts.append(P.PrunePoint(method, 0, P.VISION))
            if (k2 := method.drop_layer(num_layers)) is not None:
                pts.append(P.PrunePoint(method, k2, P.LATE_DROP))
    pts.sort(key=lambda p: p.layer)
    for a, b in zip(pts, pts[1:]):
        if a.layer == b.layer:
            raise ValueError(
                f"two methods act at one prune point: {a.describe()} and {b.describe()}; "
                "a schedule takes one method per point (vision entry, or decoder layer K)"
            )
    check_later_budgets([p for p in pts if p.kind != P.LATE_DROP])
    return pts


def check_later_budgets(selecting: list[P.PrunePoint]) -> None:
    """Refuse a schedule step that would keep every token reaching it, where its config says so: a later one-point
    method with ``ratio=1`` after a step that prunes, or ``keep=`` at least an earlier one-point method's ``keep=``
    (whose count is its budget). A schedule that keeps everything at every step (``ratio=1`` throughout) is accepted,
    as a single method's is (bit-identical to the unpatched model). Budgets known only per image (a ratio, then a
    keep) are checked when they run (:func:`points.select` warns)."""
    points = {}
    for p in selecting:
        points.setdefault(id(p.method), []).append(p)
    one = {i for i, ps in points.items() if len(ps) == 1}  # multi-point methods count their own budgets

    def budget(cfg) -> str:
        return f"keep={cfg.keep}" if cfg.keep is not None else f"ratio={cfg.ratio}"

    for i, b in enumerate(selecting):
        cb = b.method.config
        if id(b.method) not in one or b.method.kept_count != "budget" or (cb.keep is None and cb.ratio is None):
            continue
        for a in selecting[:i]:
            ca = a.method.config
            if a.method is b.method:
                continue
            same = (
                id(a.method) in one
                and a.method.kept_count in ("budget", "at_most")
                and ca.keep is not None
                and cb.keep is not None
                and cb.keep >= ca.keep
            )
            if (cb.ratio == 1.0 and ca.ratio != 1.0) or same:
                raise ValueError(
                    f"schedule: {b.describe()} with {budget(cb)} acts after {a.describe()} with {budget(ca)}, so it "
                    "keeps every token that reaches it and does nothing; give the later step a smaller budget "
                    f"({f'keep < {ca.keep}' if ca.keep is not None else 'keep=N'} or ratio < 1), or leave it out"
                )


def check_signal_layer(point: P.PrunePoint, adapter: ModelAdapter, num_layers: int) -> None:
    """A decoder point at K reads its signals from layer K-1's softmax attention (q/k), or layer K's own (PyramidDrop):
    refuse, naming the layer types, when that layer is a linear-attention layer (Qwen3.5's Gated DeltaNet)."""
    own = "layer_attention" in point.method.signals  # PyramidDrop: layer K's own attention
    signal_layers = ([point.layer - 1] if P.reads_previous_layer(point) else []) + ([point.layer] if own else [])
    for signal_layer in signal_layers:
        if adapter.has_attention(signal_layer):
            continue
        shift = 0 if signal_layer == point.layer else 1
        ok = [k + shift for k in range(num_layers) if adapter.has_attention(k) and 1 <= k + shift < num_layers]
        types = [adapter.layer_type(i) for i in range(num_layers)]
        raise ValueError(
            f"{point.describe()} reads its signal from decoder layer {signal_layer}'s attention, but that layer is "
            f"{types[signal_layer]!r} (no softmax attention to score tokens with; layer_types: {types}). Prune before "
            f"a layer K whose signal layer is full attention: layer={ok[:8]}{'...' if len(ok) > 8 else ''}"
        )


class Session:
    """Everything one ``patch`` installed on one model; ``remove()`` undoes it. ``methods``: one method, or a
    schedule of several (each acting at its own points)."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, methods: Method | list[Method]):
        self.model, self.adapter = model, adapter
        self.methods = [methods] if isinstance(methods, Method) else list(methods)
        for method in self.methods:
            method.bind(adapter)
        self.method = self.methods[0]
        self.num_layers = len(adapter.decoder_layers)
        self.points = build_points(self.methods, self.num_layers)
        # a budget the model cannot meet fails here, not in a hook at the first forward; a merge inside the vision
        # tower changes how many visual tokens reach the LLM
        tokens = None if any(m.acts_in_tower for m in self.methods) else adapter.image_tokens()
        for method in self.methods:
            method.check_budget(self.num_layers, tokens)
        self.decoder_points = {p.layer: p for p in self.points if p.kind != P.VISION}
        vision = next((p.method for p in self.points if p.kind == P.VISION), None)
        self.capture = VisionCapture(adapter, vision, self._on_features)
        self.compact = any(m.config.positions == "compact" for m in self.methods)
        if self.compact and adapter.mrope:
            raise ValueError(
                f"positions='compact' renumbers 1-D position ids; {adapter.config.model_type!r} uses 3-D M-RoPE "
                "positions, whose image-grid layout has no compact form: use positions='original'"
            )
        if self.compact and len(self.methods) > 1:
            raise ValueError(
                f"positions='compact' needs a single method; this schedule has {len(self.methods)} "
                f"({', '.join(p.describe() for p in self.points)}): use positions='original'"
            )
        if self.compact and any(p.kind == P.LATE_DROP for p in self.points):
            raise ValueError(
                "positions='compact' does not combine with a late drop (todre): pass late_drop=False or "
                "positions='original'"
            )
        if self.decoder_points and (why := adapter.unsupported_llm_stage()):
            names = sorted({p.method.name for p in self.decoder_points.values()})
            raise ValueError(f"method(s) {names} prune inside the LLM, which {why}")
        for point in self.decoder_points.values():
            check_signal_layer(point, adapter, self.num_layers)
        self.visual_ids = adapter.visual_token_ids()
        self._needs_embeds = any("prompt_embeds" in p.method.signals for p in self.decoder_points.values())
        self.pad_threshold = next((t for m in self.methods if (t := m.pad_threshold()) is not None), 0.5)
        self.fwd: P.Forward | None = None
        self.stats: PruneStats | None = None
        #: generate(use_cache=False) re-runs the prompt at every step: selections are reused for the whole call
        self._sticky: dict | None = None
        #: the prompt ids of the ``generate`` call in progress (it repeats each row for beams / return sequences;
        #: its forwards may append candidate tokens to the prompt or split it into chunks)
        self._generate_ids: torch.Tensor | None = None
        #: some point reads the prompt's text (decoder points: its last token; prompt_embeds: the text after an image)
        self._reads_text = bool(self.decoder_points) or any("prompt_embeds" in p.method.signals for p in self.points)
        #: the last prefill that compacted the prompt: its slots' prompt columns, for the host's loss on ``labels``
        self._label_columns: tuple | None = None
        self._handles: list = []
        self._wrapped: list[tuple[object, str, object]] = []
        #: per id of a wrapped object, how many of its wrapped methods' host code is running (see :meth:`_wrap`)
        self._in_host: dict[int, int] = {}
        self._rope = adapter.rope_fn() if self.decoder_points else None
        self._masks = P.layer_masks(adapter, self.num_layers)
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
        a = self.adapter
        try:
            self._hook(self.model.register_forward_pre_hook(self._top_pre, with_kwargs=True))
            self._hook(a.inner.register_forward_pre_hook(self._inner_pre, with_kwargs=True))
            self._hook(a.inner.register_forward_hook(self._inner_post, always_call=True))
            self._hook(a.language_model.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
            self.capture.install(self._hook, self._wrap)
            for method in self.methods:  # a method acting inside the vision tower (vtprune.methods.tower)
                method.install_in(a, self._hook, self._wrap)
            if hasattr(self.model, "loss_function"):
                compat.wrap_loss_function(self.model, self._set, self._loss)
            if hasattr(self.model, "generate"):  # which tokens of generate's forwards are the prompt
                self._wrap(self.model, "generate", self._wrapped_generate)
            for i, layer in enumerate(a.decoder_layers):
                self._hook(layer.register_forward_pre_hook(self._make_layer_hook(i), with_kwargs=True))
            if a.deepstack_method is not None:
                self._wrap(a.language_model, a.deepstack_method, self._wrapped_deepstack)
            for point in self.decoder_points.values():
                if not P.reads_previous_layer(point):
                    continue
                attn = a.decoder_layers[point.layer - 1].self_attn
                self._hook(attn.register_forward_pre_hook(self._signal_hook(point, "_rope"), with_kwargs=True))
                self._hook(attn.k_proj.register_forward_hook(self._signal_hook(point, "_k")))
                if point.needs_text_attention:
                    self._hook(attn.q_proj.register_forward_hook(self._signal_hook(point, "_q")))
                if "queries" in point.method.signals:
                    self._hook(attn.q_proj.register_forward_hook(self._signal_hook(point, "_q_all")))
        except Exception:
            self.remove()
            raise
        self.installed = True

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for obj, name, before in reversed(self._wrapped):  # an attribute the instance had before comes back
            if before is _ABSENT:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = before
        self._handles, self._wrapped = [], []
        self.capture.clear()
        self.fwd = None
        self.installed = False

    def _hook(self, handle) -> None:
        self._handles.append(handle)

    def _set(self, obj, name: str, value) -> None:
        """Set ``obj.name`` on the instance; ``remove`` puts back what the instance had there (or deletes it)."""
        self._wrapped.append((obj, name, obj.__dict__.get(name, _ABSENT)))
        obj.__dict__[name] = value

    def _wrap(self, obj, name: str, make: Callable) -> None:
        """Wrap ``obj.name`` on the instance with ``make(original)``, ``original`` being the method as it is now (the
        host's own, or a wrapper this patch installed before). A wrapped method that the host's own code calls while
        a wrapped method of the same object runs (Qwen3-VL's ``get_video_features`` returns
        ``self.get_image_features(...)``) goes straight to the host's method: wrappers see only the outermost call,
        each call from outside once."""
        current = obj.__dict__.get(name)
        host = getattr(current, "_vtprune_host", None)
        if host is None:  # the first wrapper of this method: below it, the host's own method, marked while it runs
            host = getattr(obj, name)
            current = self._running_host(obj, host)
        wrapper = make(current)

        @functools.wraps(wrapper)
        def outermost(*args, **kwargs):
            if self._in_host.get(id(obj)):  # called by the host's code inside a wrapped call: not a call of ours
                return host(*args, **kwargs)
            return wrapper(*args, **kwargs)

        outermost._vtprune_host = host
        self._set(obj, name, outermost)

    def _running_host(self, obj, host: Callable) -> Callable:
        """``host`` (a method of ``obj``), counting in ``_in_host`` while it runs."""

        @functools.wraps(host)
        def run(*args, **kwargs):
            self._in_host[id(obj)] = self._in_host.get(id(obj), 0) + 1
            try:
                return host(*args, **kwargs)
            finally:
                self._in_host[id(obj)] -= 1

        return run

    def _wrapped_generate(self, original):
        """Records the prompt of a ``generate`` call: its first forward may run more than the prompt (assisted
        decoding's candidate tokens, ``use_cache=False``'s grown sequence), which then selects on the prompt's
        tokens only (see :meth:`_prompt_part`); ``prefill_chunk_size`` with images is refused.
        ``generate(use_cache=False)`` of a method that reads the prompt's text also reuses the first forward's
        selections at every step."""

        @functools.wraps(original)
        def generate(*args, **kwargs):
            config = kwargs.get("generation_config") or self.model.generation_config
            use_cache = kwargs.get("use_cache", getattr(config, "use_cache", True))
            sticky = {} if use_cache is False and self._reads_text else None
            visual = any(
                kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")
            )
            if visual and (chunk := compat.prefill_chunk_size(self.model, kwargs)) is not None:
                raise ValueError(
                    f"generate(prefill_chunk_size={chunk}) with images on a pruned model: transformers runs the prompt "
                    "in chunks and hands each chunk its rows of the visual features as one tensor (without the "
                    "per-image records the methods read), and a decoder point scores the visual tokens with the last "
                    "prompt token, which only the last chunk holds. vtprune prunes a prompt in one forward: pass "
                    "prefill_chunk_size=None (or unpatch)"
                )
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

    def _on_features(self, token_id: int, feats: list[torch.Tensor]) -> None:
        if self.fwd is not None and self.fwd.prefill:  # computed inside a forward (not by generate beforehand)
            self.fwd.features.setdefault(token_id, []).extend(feats)

    # -- top-level / inner model ----------------------------------------------------------------------------
    def _top_pre(self, module, args, kwargs):
        self._label_columns = None
        visual_keys = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw")
        has_visual = any(kwargs.get(k) is not None for k in visual_keys) or bool(kwargs.get("mm_encoder_outputs"))
        if self.adapter.mrope and has_visual and kwargs.get("mm_token_type_ids") is None:
            raise ValueError(
                f"{self.adapter.config.model_type!r} needs mm_token_type_ids with pixel_values / pixel_values_videos "
                "to number the visual tokens' 3-D M-RoPE positions (without it the model falls back to 1-D positions "
                "and the kept tokens would lose theirs): pass the processor's mm_token_type_ids (1 for image "
                "tokens, 2 for video tokens, 0 elsewhere)"
            )

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
            if prompt.owner is not self:
                raise ValueError(ORPHANED_CACHE)
            if has_visual:
                raise ValueError(
                    "new images on a KV cache that vtprune pruned are not supported; start a new prompt (no cache)"
                )
            self.fwd = P.Forward(
                input_ids=input_ids, prefill=False, prompt=prompt, mask_in=kwargs.get("attention_mask")
            )
            return
        if not has_visual:
            self.fwd = None
            return
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
        prompt_end = self._prompt_part(input_ids)
        rows = self._generate_ids.shape[0] if self._generate_ids is not None else None
        #: generate repeats each prompt row in place (repeat_interleave) for beams / return sequences
        copies = input_ids.shape[0] // rows if rows and input_ids.shape[0] % rows == 0 else 1
        self.fwd = P.Forward(
            input_ids=input_ids,
            prefill=True,
            image_sizes=self.image_sizes,
            mask_in=kwargs.get("attention_mask"),
            row_copies=copies,
            prompt_end=prompt_end,
        )
        if self.adapter.token_types_key is not None and (types := kwargs.get(self.adapter.token_types_key)) is not None:
            if tuple(types.shape) != tuple(input_ids.shape):
                raise ValueError(
                    f"{self.adapter.token_types_key} has shape {tuple(types.shape)}; expected the shape of "
                    f"input_ids {tuple(input_ids.shape)} (one type per prompt token)"
                )
            self.fwd.token_types = types.to(input_ids.device).long()
        self.image_sizes = None
        texts, self.instructions = self.instructions, None
        if texts is not None and copies > 1 and len(texts) * copies == input_ids.shape[0]:
            texts = [t for t in texts for _ in range(copies)]
        self.fwd.signals["instructions"] = texts
        for modality, encoded in (kwargs.get("mm_encoder_outputs") or {}).items():
            if encoded is not None:
                feats = self.capture.split_features(encoded.pooler_output)
                self.fwd.features.setdefault(self.capture.token_id(modality), []).extend(feats)

    def _prompt_part(self, input_ids: torch.Tensor) -> int | None:
        """Which columns of a prompt's first forward inside ``generate`` are the prompt generate was given: a forward
        longer than it (assisted decoding appends candidate tokens; ``use_cache=False`` re-runs the grown sequence)
        selects on the prompt's columns, returned as their count; one that runs only a first part of it (a custom
        decoding loop) is refused. None: the forward is the prompt (or runs outside generate)."""
        prompt = self._generate_ids
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

    def _loss(self, original, logits, labels, *args, **kwargs):
        """The host's loss after a prefill that pruned: its logits cover the kept slots only, so ``labels`` (one per
        prompt column) are compacted to the same slots (padding slots ignored): the loss is the unpatched model's fed
        only the kept tokens, at their original positions, with their labels."""
        columns, self._label_columns = self._label_columns, None
        if columns is None or labels is None:
            return original(logits, labels, *args, **kwargs)
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
        kept = labels.gather(1, cols.to(device)).masked_fill(~real.to(device), ignore)
        return original(logits, kept, *args, **kwargs)

    # -- language model: units, the vision entry, continuations ---------------------------------------------
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
            return self._continue(fwd, kwargs, embeds, mask)
        b, s = embeds.shape[:2]
        fwd.mask2d = torch.ones(b, s, dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        fwd.units = self._find_units(fwd)
        if not fwd.units:
            self.fwd = None
            return None
        fwd.cols = torch.arange(s, device=embeds.device).expand(b, -1)
        fwd.real = fwd.mask2d.clone()
        fwd.visual_ids = torch.tensor(self.visual_ids, device=embeds.device)
        if self._needs_embeds:
            fwd.prompt_embeds = embeds
        if self.adapter.deepstack_method is not None and kwargs.get("deepstack_visual_embeds") is not None:
            fwd.deepstack = DeepStack.from_host(kwargs["visual_pos_masks"], kwargs["deepstack_visual_embeds"])
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = self.adapter.default_position_ids(b, s, 0, embeds.device)
        if self.adapter.rotary_per_layer_type:  # decoder points compute each layer type's tables at these
            fwd.positions = pos.expand(b, -1)
        first = self.points[0]
        if first.kind != P.VISION:
            return None
        t0 = clock()
        keep = P.select(first, fwd, lambda unit, slots: self._vision_inputs(first, unit, embeds), self._sticky)
        self._record(fwd, first, keep, t0)
        if keep is None:
            return None
        embeds = P.merge(fwd, embeds, first.method.name)
        layout = P.compact(fwd, keep, start=0)
        kwargs["inputs_embeds"] = layout.take(embeds, 1)
        # always pass a mask (kept position ids have gaps, which transformers would read as packed sequences)
        kwargs["attention_mask"] = layout.compress_mask(fwd.mask2d.long(), s)
        if fwd.token_types is not None:  # each image's kept tokens: one bidirectional block (the host's masks, rebuilt)
            kwargs["attention_mask"] = self._masks(
                kwargs["inputs_embeds"], kwargs["attention_mask"], compat.get_cache(kwargs), 0, fwd.current_types()
            )
        kwargs["position_ids"] = layout.compact_positions() if self.compact else layout.take(pos, -1)
        if fwd.positions is not None and self.compact:
            fwd.positions = kwargs["position_ids"]
        if fwd.deepstack is not None:  # the host's own copy, kept consistent with the sequence (injection: ours)
            kwargs["visual_pos_masks"] = fwd.deepstack.index >= 0
        fwd.scrub_position_ids = True
        return args, kwargs

    def _continue(self, fwd: P.Forward, kwargs, embeds, mask):
        """A forward that continues a pruned prompt's cache (a decode step, or a later text turn of ``q`` tokens).
        ``mask`` covers the unpruned columns (``S + t``, as the unpatched model's would); the cache reports the
        unpruned length, so the host numbers positions as for the unpruned prompt."""
        cache = compat.get_cache(kwargs)
        q = embeds.shape[1]
        if isinstance(mask, dict):  # built by the host over the unpruned columns: rebuilt from its 2-D mask
            mask = fwd.mask_in
        rows = fwd.prompt.stages[0][1].gather.shape[0]
        if embeds.shape[0] != rows:
            raise ValueError(
                f"a forward continues a pruned KV cache with {embeds.shape[0]} rows, but its prompt was pruned with "
                f"{rows}: a decoding loop that expands the batch after the prompt's forward (contrastive search, "
                "a custom_generate loop) cannot continue it. Expand the inputs before the prompt's forward (as beam "
                "search does), or unpatch"
            )
        past = cache.get_seq_length()  # unpruned length (PrunedPrompt)
        fwd.decode_masks = fwd.prompt.masks(mask, past + q)
        if self.compact:  # kept tokens renumbered from each row's first real token, dropped ones not counted
            pos = kwargs.get("position_ids")
            if pos is None and mask is not None:  # number from the mask, as the compacted prompt was
                pos = (mask.long().cumsum(1) - 1).clamp(min=0)[:, -q:]
            elif pos is None:
                pos = self.adapter.default_position_ids(embeds.shape[0], q, past, embeds.device)
            shift = torch.zeros_like(pos[:, 0])
            for start, layout in fwd.prompt.stages:  # each stage's tokens are renumbered after its compaction
                shift = shift + layout.shift.to(pos.device)
                fwd.decode_positions[start] = pos - shift[:, None]
        if 0 not in fwd.decode_masks:
            return None  # the vision entry dropped nothing: the LM's input is as unpatched
        kwargs["attention_mask"] = fwd.decode_masks[0]
        if self.compact:
            kwargs["position_ids"] = fwd.decode_positions[0]
        return (), kwargs

    def _find_units(self, fwd: P.Forward) -> list[Unit]:
        units = find_units(fwd.input_ids, self.visual_ids, fwd.features, self.capture.info, tiled=self.adapter.tiled)
        if fwd.image_sizes is not None:
            attach_real_masks(
                self.adapter, fwd.input_ids, units, fwd.image_sizes, self.pad_threshold, copies=fwd.row_copies
            )
        needs = self.capture.signals & {"features", "cls_attention", "projector_inputs", "vision_keys", "vision_qk"}
        if units and needs and any(u.info is None or u.features is None for u in units):
            raise ValueError(
                f"method {self.points[0].method.name!r} needs {sorted(needs)} from the vision tower; pass "
                "pixel_values (features computed by an unpatched model carry no signals)"
            )
        return units

    def _vision_inputs(self, point: P.PrunePoint, unit: Unit, embeds: torch.Tensor) -> ImageInputs:
        n = unit.positions.numel()
        info = unit.info
        signals = point.method.signals
        extra = {"grid": info.grid if info else None}
        if "prompt_embeds" in signals:  # the row's real text tokens after the image (all of them if none follows)
            fwd = self.fwd
            after = torch.zeros_like(fwd.mask2d[unit.row])
            after[int(unit.positions[-1]) + 1 :] = True
            visual = torch.isin(fwd.input_ids[unit.row], torch.tensor(self.visual_ids, device=after.device))
            text = fwd.prompt_mask[unit.row] & ~visual
            extra["prompt_embeds"] = embeds[unit.row, after & text if bool((after & text).any()) else text]
        if "instruction" in signals:
            texts = self.fwd.signals.get("instructions")
            if texts is not None and len(texts) != self.fwd.input_ids.shape[0]:
                raise ValueError(
                    f"vtprune.set_instructions gave {len(texts)} text(s) for a batch of "
                    f"{self.fwd.input_ids.shape[0]} prompt(s); give one instruction per prompt row"
                )
            extra["instruction"] = texts[unit.row] if texts is not None else None
        return ImageInputs(
            n=n,
            k=point.method.config.budget(n),
            features=unit.features,
            cls_attention=info.cls_attention if info else None,
            vision_keys=info.vision_keys if info else None,
            vision_qk=info.vision_qk if info else None,
            received=info.received if info else None,
            pack_crop_scores=info.pack if info else None,
            token_patches=info.token_patches if info else None,
            projector_inputs=info.projector_inputs if info else None,
            projector=self.capture.float32_projector() if "projector_inputs" in signals else None,
            real_mask=unit.real_mask,
            image_start=int(unit.positions[0]),
            extra=extra,
        )

    def _record(self, fwd: P.Forward, point: P.PrunePoint, keep, t0: float, late_dropped=None) -> None:
        b = fwd.real.shape[0]
        kept, nominal = [0] * b, [0] * b
        for unit in fwd.units:
            kept[unit.row] += unit.present.numel()
            nominal[unit.row] += fwd.nominal.get((id(point.method), unit.key), unit.present.numel())
        if late_dropped is not None:
            kept, nominal = [0 if d else k for k, d in zip(kept, late_dropped)], None
        fwd.records.append(P.PointRecord(point, kept, keep is not None, elapsed_ms(t0), late_dropped, nominal))

    # -- decoder layers: signals, points, the layers after them ---------------------------------------------
    def _signal_hook(self, point: P.PrunePoint, name: str):
        def hook(module, args, out_or_kwargs, output=None):
            fwd = self.fwd
            if fwd is None or not fwd.prefill or fwd.cols is None:  # prefill, units found: points run in layer order
                return None
            if name == "_rope":
                fwd.signals["_rope"] = out_or_kwargs["position_embeddings"]
            elif name == "_q":  # inside layer K-1, which activation checkpointing may recompute in backward
                with outside_checkpoint():
                    fwd.signals["_q"] = out_or_kwargs[torch.arange(out_or_kwargs.shape[0]), fwd.last]
            elif name == "_q_all":
                fwd.signals["_q_all"] = out_or_kwargs
            else:
                fwd.signals["_k"] = out_or_kwargs
            return None

        return hook

    def _make_layer_hook(self, index: int):
        def hook(module, args, kwargs):
            fwd = self.fwd
            if fwd is None:
                return None
            changed = True
            if fwd.override_from is not None and index > fwd.override_from:  # after an earlier point
                kwargs.update(fwd.layer_kwargs["override"])
                kwargs["attention_mask"] = fwd.layer_kwargs["masks"][self.adapter.layer_type(index)]
                if fwd.layer_kwargs.get("rope") is not None:  # rotary tables per layer type (Gemma 3)
                    kwargs["position_embeddings"] = fwd.layer_kwargs["rope"][self.adapter.layer_type(index)]
            elif fwd.scrub_position_ids:  # after the vision entry: kept position ids have gaps
                kwargs["position_ids"] = None
            else:
                changed = False
            point = self.decoder_points.get(index)
            if point is not None and (out := self._at_point(fwd, point, args, kwargs)) is not None:
                return out  # a point here: it starts from this layer's inputs as the earlier points left them
            return (args, kwargs) if changed else None

        return hook

    def _at_point(self, fwd: P.Forward, point: P.PrunePoint, args, kwargs):
        cache = compat.get_cache(kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        if not fwd.prefill:
            if point.layer not in fwd.decode_masks:
                return None
            kwargs.pop("hidden_states", None)
            masks = P.decode_at(
                fwd, point.layer, hidden, kwargs, cache, self._masks, self._rotary, self._rope_types(point.layer)
            )
            kwargs["attention_mask"] = masks[self.adapter.layer_type(point.layer)]
            return (hidden,), kwargs
        if fwd.cols is None:
            return None
        if point.kind == P.LATE_DROP and not self._ran(fwd, point.method):
            fwd.signals.clear()
            return None  # the method's own first point kept everything: so does its late drop
        t0 = clock()
        P.llm_signals(
            point, fwd, self.adapter, self._rope, self._rotary, hidden, kwargs.get("position_embeddings"), self.compact
        )
        late_dropped = None
        if point.kind == P.LATE_DROP:
            keep, late_dropped = P.late_drop(fwd, point, self.visual_ids, self._sticky)
        else:
            final_norm = self.adapter.final_norm
            keep = P.select(
                point, fwd, lambda unit, slots: P.llm_inputs(fwd, point, unit, slots, hidden, final_norm), self._sticky
            )
        fwd.signals.clear()
        self._record(fwd, point, keep, t0, late_dropped)
        if keep is None:
            return None
        kwargs.pop("hidden_states", None)
        hidden = P.merge(fwd, hidden, point.method.name, point.layer)
        layout = P.compact(fwd, keep, start=point.layer)
        hidden, masks = P.shorten(
            fwd,
            layout,
            point.layer,
            hidden,
            kwargs,
            cache,
            self._masks,
            self._rotary,
            self.compact,
            self._rope_types(point.layer),
        )
        kwargs["attention_mask"] = masks[self.adapter.layer_type(point.layer)]
        return (hidden,), kwargs

    def _ran(self, fwd: P.Forward, method: Method) -> bool:
        return any(r.point.method is method and r.pruned for r in fwd.records)

    def _rotary(self, hidden, position_ids, layer: int):
        """The rotary tables ``(cos, sin)`` decoder layer ``layer`` uses at ``position_ids``."""
        return self.adapter.rotary(hidden, position_ids, layer)

    def _rope_types(self, start: int) -> dict[str, int] | None:
        """Rotary per layer type: each layer type of layers >= ``start`` -> its first layer; else None."""
        return P.first_layers(self.adapter, start, self.num_layers) if self.adapter.rotary_per_layer_type else None
