"""The plan: what binding a schedule of methods to one model decides, frozen before any hook is installed.

:func:`bind` turns methods + adapter into a :class:`Plan`: every prune point (a method at the vision entry, before
decoder layer K, or a late drop at K) in the order they act, the layer each point reads its signals from, and
per point the budget rule (:meth:`PrunePoint.budget`). The engine reads only the plan: nothing about the model is
cached on a method, so one method (or config) bound to two models gives each its own plan, in any order.
Schedules that cannot work (two methods at one point, a later step that keeps everything, a signal layer without
softmax attention, ``positions="compact"`` where it has no meaning) are refused here, at ``patch``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..methods.base import KEPT_COUNTS, Method

VISION, LLM, LATE_DROP = "vision", "llm", "late_drop"


@dataclass(frozen=True)
class PrunePoint:
    """``method`` acting at ``layer`` (0: the vision entry, after the projector; K: before decoder layer K).
    ``kind``: ``"vision"``, ``"llm"`` or ``"late_drop"`` (every visual token of a row, or none: ToDRE stage 2).
    A multi-point llm method (``Method.layers`` returns several layers: pdrop, sparsevlm) has one point per layer,
    each with its own budget. ``layers``: every point layer of the method on this model (ascending);
    ``num_layers``: the model's decoder depth (what ``Method.point_budget`` reads through :meth:`budget`)."""

    method: Method
    layer: int
    kind: str
    num_layers: int = 0
    layers: tuple[int, ...] = ()

    @property
    def stage(self) -> str:
        return VISION if self.kind == VISION else LLM

    @property
    def needs_text_attention(self) -> bool:
        return self.kind == LATE_DROP or "text_attention" in self.method.signals

    @property
    def reads_previous_layer(self) -> bool:
        """Whether the point reads layer K-1's q/k (captured by hooks on that layer)."""
        return self.kind == LATE_DROP or bool(self.method.signals & {"text_attention", "keys", "queries"})

    @property
    def signal_layers(self) -> tuple[int, ...]:
        """The decoder layers whose attention the point scores with: K-1 (captured q/k), and K itself for
        ``layer_attention`` (PyramidDrop, recomputed on layer K's input)."""
        own = self.kind != VISION and "layer_attention" in self.method.signals
        return ((self.layer - 1,) if self.reads_previous_layer else ()) + ((self.layer,) if own else ())

    def budget(self, n: int, n_original: int) -> int:
        """Tokens to keep here of an image with ``n`` of its ``n_original`` visual tokens left (``>= n``: skip)."""
        return self.method.point_budget(n, n_original, self.layer, self)

    def describe(self) -> str:
        where = "the vision entry" if self.kind == VISION else f"decoder layer {self.layer}"
        return f"{self.method.name!r} ({'late drop' if self.kind == LATE_DROP else self.stage}) at {where}"


@dataclass(frozen=True)
class Plan:
    """A schedule bound to one model: ``points`` in the order they act (ascending layer), ``num_layers`` the
    language model's depth. Built by :func:`bind`; frozen."""

    methods: tuple[Method, ...]
    points: tuple[PrunePoint, ...]
    num_layers: int

    @property
    def vision_point(self) -> PrunePoint | None:
        return self.points[0] if self.points and self.points[0].kind == VISION else None

    @property
    def decoder_points(self) -> dict[int, PrunePoint]:
        """Layer K -> the point acting before decoder layer K (llm points and late drops)."""
        return {p.layer: p for p in self.points if p.kind != VISION}

    def late_drop_layer(self) -> int | None:
        return next((p.layer for p in self.points if p.kind == LATE_DROP), None)


def bind(methods: list[Method], adapter) -> Plan:
    """Bind ``methods`` (each with :meth:`Method.bind`) to ``adapter``'s model and build its :class:`Plan`; a
    schedule the model cannot run raises ``ValueError`` naming what to change."""
    for method in methods:
        method.bind(adapter)
    num_layers = len(adapter.decoder_layers)
    plan = Plan(tuple(methods), tuple(build_points(methods, num_layers)), num_layers)
    # a budget the model cannot meet fails here, not in a hook at the first forward; a merge inside the vision
    # tower changes how many visual tokens reach the LLM
    tokens = None if any(m.acts_in_tower for m in methods) else adapter.image_tokens()
    for method in methods:
        method.check_budget(num_layers, tokens)
    check_positions(plan, adapter)
    check_frame_budget(methods, adapter)
    decoder = plan.decoder_points
    if decoder and (why := adapter.unsupported_llm_stage()):
        names = sorted({p.method.name for p in decoder.values()})
        raise ValueError(f"method(s) {names} prune inside the LLM, which {why}")
    for point in decoder.values():
        check_signal_layer(point, adapter, num_layers)
    return plan


def check_frame_budget(methods: list[Method], adapter) -> None:
    """Refuse, at ``patch``, a ``frame_budget`` other than ``"video"`` (or a video-only method) that the schedule
    cannot honour: a method pruning inside the LLM or inside the vision tower, or a family without video units
    (``ModelAdapter.no_video_units``)."""
    for method in methods:
        rule = getattr(method.config, "frame_budget", "video")
        video_only = "image" not in method.modalities
        if rule == "video" and not video_only:
            continue
        if (why := adapter.no_video_units) is not None:
            what = f"frame_budget={rule!r} of method {method.name!r}"
            if rule == "video":
                what = f"method {method.name!r} (it prunes videos only)"
            raise ValueError(
                f"{what}: {why}; use an image method with frame_budget='video' there, "
                "or a video family (qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_5, llava_next_video, llava_onevision)"
            )
        if rule == "video":
            continue
        where = "inside the LLM" if method.stage == "llm" else "inside the vision tower" if method.acts_in_tower else ""
        if where:
            raise ValueError(
                f"frame_budget={rule!r} runs a method once per video frame at the vision entry; method "
                f"{method.name!r} prunes {where}: use frame_budget='video' (or a vision-entry method such as "
                "'divprune', 'cls', 'visionzip')"
            )


def build_points(methods: list[Method], num_layers: int) -> list[PrunePoint]:
    """The prune points of a schedule, in the order they act; two at one point raise ``ValueError``."""
    pts = []
    for method in methods:
        if method.kept_count not in KEPT_COUNTS:
            raise ValueError(
                f"method {method.name!r} declares kept_count={method.kept_count!r}; allowed: "
                f"{KEPT_COUNTS} (see vtprune.methods.base.Method.kept_count)"
            )
        if method.stage == "llm":
            layers = tuple(method.layers(num_layers))
            pts.extend(PrunePoint(method, k, LLM, num_layers, layers) for k in layers)
        else:
            pts.append(PrunePoint(method, 0, VISION, num_layers, (0,)))
            if (k2 := method.drop_layer(num_layers)) is not None:
                pts.append(PrunePoint(method, k2, LATE_DROP, num_layers, (0, k2)))
    pts.sort(key=lambda p: p.layer)
    for a, b in zip(pts, pts[1:]):
        if a.layer == b.layer:
            raise ValueError(
                f"two methods act at one prune point: {a.describe()} and {b.describe()}; "
                "a schedule takes one method per point (vision entry, or decoder layer K)"
            )
    check_later_budgets([p for p in pts if p.kind != LATE_DROP])
    return pts


def check_later_budgets(selecting: list[PrunePoint]) -> None:
    """Refuse a schedule step that would keep every token reaching it, where its config says so: a later one-point
    method with ``ratio=1`` after a step that prunes, or ``keep=`` at least an earlier one-point method's ``keep=``
    (whose count is its budget). A schedule that keeps everything at every step (``ratio=1`` throughout) is accepted,
    as a single method's is (bit-identical to the unpatched model). Budgets known only per image (a ratio, then a
    keep) are checked when they run (:func:`vtprune.engine.points.select` warns)."""
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


def check_positions(plan: Plan, adapter) -> None:
    """``positions="compact"`` (renumbered 1-D positions) needs 1-D positions, one method and no late drop."""
    if not any(m.config.positions == "compact" for m in plan.methods):
        return
    if adapter.mrope:
        raise ValueError(
            f"positions='compact' renumbers 1-D position ids; {adapter.config.model_type!r} uses 3-D M-RoPE "
            "positions, whose image-grid layout has no compact form: use positions='original'"
        )
    if len(plan.methods) > 1:
        raise ValueError(
            f"positions='compact' needs a single method; this schedule has {len(plan.methods)} "
            f"({', '.join(p.describe() for p in plan.points)}): use positions='original'"
        )
    if plan.late_drop_layer() is not None:
        raise ValueError(
            "positions='compact' does not combine with a late drop (todre): pass late_drop=False or "
            "positions='original'"
        )


def check_signal_layer(point: PrunePoint, adapter, num_layers: int) -> None:
    """A decoder point at K reads its signals from layer K-1's softmax attention (q/k), or layer K's own (PyramidDrop):
    refuse, naming the layer types, when that layer is a linear-attention layer (Qwen3.5's Gated DeltaNet)."""
    for signal_layer in point.signal_layers:
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
