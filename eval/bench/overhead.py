"""Selection overhead: every registered method's selection time against the prefill time of one 7B-wide decoder layer.

Requirement (issue 3): each method's selection time <= the prefill time of one decoder layer of a 7B-wide LM
(4096 hidden, 11008 MLP, 32 heads) on the same ~650-token LLaVA-1.5 prompt, measured side by side in one run on CPU.

The model: a random-weight LLaVA-1.5 at the real widths that set the selection cost — CLIP ViT-L/14-336 tower
(1024 wide, MLP 4096, 16 heads, 24 layers, 336 px: 576 patches + CLS), projector to 4096, Llama LM 4096 wide (MLP
11008, 32 heads) — but only as many LM layers as the methods need: each method is patched onto tiny LLaVAs with 1, 2,
... LM layers until ``patch`` accepts it, and the benchmark model gets the largest of those counts. Prompt: BOS + 4
text tokens + 576 image tokens + 70 text tokens (651), batch 1, fp32, SDPA, no grad.

Timed in interleaved rounds (``vtprune.timing``: every variant once per round, order reversed every other round):

* per method x keep: a full prefill of the patched model; the number recorded is the engine's own
  ``vtprune.stats(model).select_ms`` (the method's ``select`` plus the signal post-processing: for llm-stage methods
  RoPE on the captured keys/query and the attention row);
* per method whose signals include ``cls_attention`` / ``vision_keys`` / ``vision_qk``: what the vision-tower hooks
  compute while the tower runs (``vtprune.signals.cls_attention_rows`` on [1, 577, 1024] q/k and the head-mean keys
  or the stacked full-width q/k, once per hooked layer; with ``importance="received"``, e.g. ``hiprune``'s default,
  the q/k recomputed from the layer's input and the attention every patch receives) — selection work outside
  ``select_ms``, added to it for the verdict;
* ``one layer``: decoder layer 0 of that LM (a ``LlamaDecoderLayer`` of the 4096 / 11008 / 32-head config) alone on
  the prompt's 651 hidden states, with its rotary embeddings and the causal mask the model itself builds.

    PYTHONPATH=. .venv/bin/python eval/bench/overhead.py --threads 1 --repeats 3 --keep 64,192 --text-layers 5 \
        --variant zoo:sketch=256 --out eval/results/overhead.md

``--text-layers 5`` lets PACT prune before its official layer 4 (its default clamps K to L-1 in shorter LMs; the
selection work is the same at any K, on the same 651 tokens). About 12 CPU-minutes at 1 thread, about 7.5 GB.
More ``--repeats`` on a quieter machine.

``--variant METHOD:key=value`` adds a row for a method with non-default options (e.g. a cheaper estimator).

``--small`` runs the same code on the tiny demo-sized LLaVA in a few seconds (used by the tests).

``--sizes N1,N2,...`` times instead the selection functions whose cost grows with the image's token count —
CDPruner's greedy DPP (``vtprune.functional.cdpruner_select`` on ``[N, 4096]`` projected tokens and ``[N, 768]`` CLIP
embeddings, k = N / 9, about 64 of 576) and VisPruner's duplicate removal (``vispruner_select`` on ``[N, 1024]``
vision features, same k) — against one 7B-wide decoder layer on ``N + 75`` hidden states, at AnyRes / video token
counts (LLaVA-NeXT up to 2,880; a 16-frame Qwen video ~ 5,000 and more):

    PYTHONPATH=. .venv/bin/python eval/bench/overhead.py --threads 1 --repeats 3 --sizes 576,2880,5760 \
        --out eval/results/overhead_sizes.md

``--video`` times instead the pure video selection functions of one video (``evs_select``, ``vidcom2_select``,
``fastvid_select``, ``frame_budgets`` with the ``uniqueness`` and ``segments`` rules, ``dyseg_segments``, and the
DPC-KNN scores of one FastVID anchor frame) on ``[T, N, 3584]`` post-merger features (Qwen2.5-VL-7B's LM width) at
``--frames`` x ``--frame-tokens``, against one Qwen2-7B-wide decoder layer (3,584 wide, MLP 18,944, 28 heads, 4 KV
heads) on the same ``T * N`` visual tokens + 75 text tokens; goal <= 0.1 of a layer at 32 frames (issue 25):

    PYTHONPATH=. .venv/bin/python eval/bench/overhead.py --video --threads 1 --repeats 3 --frames 16,32 \
        --frame-tokens 100,400 --out eval/results/overhead_video.md
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass

import torch

import vtprune
from vtprune import compat
from vtprune import functional as F
from vtprune.adapters import get_adapter
from vtprune.latency import build_random_llava, prefill
from vtprune.registry import get_method
from vtprune.signals import cls_attention_rows, resolve_importance
from vtprune.timing import interleaved_times_ms, num_threads, provenance

LAYER = "one layer"

#: LLaVA-1.5-7B shapes (CLIP ViT-L/14-336 + Vicuna-7B widths) and the tiny --small model
REAL = dict(
    image_size=336,
    patch_size=14,
    vision_hidden=1024,
    vision_intermediate=4096,
    vision_layers=24,
    vision_heads=16,
    text_hidden=4096,
    text_intermediate=11008,
    text_heads=32,
    text_before=5,
    text_after=70,
)
SMALL = dict(
    image_size=224,
    patch_size=14,
    vision_hidden=128,
    vision_intermediate=512,
    vision_layers=4,
    vision_heads=4,
    text_hidden=256,
    text_intermediate=704,
    text_heads=4,
    text_before=5,
    text_after=15,
)


@dataclass
class Row:
    method: str  # the table's label: the method name, plus its options for --variant rows
    keep: int | None
    stage: str = "-"
    layer: str = "-"
    kept: int = 0
    skipped: str | None = None


def layers_needed(
    method: str, keep: int, vision_layers: int, max_layers: int, options: dict | None = None
) -> tuple[int | None, str | None]:
    """Fewest LM layers a LLaVA needs for ``patch(model, method, keep=keep, **options)`` to succeed (a tiny probe
    model with the benchmark's vision depth), or ``(None, reason)`` when no count up to ``max_layers`` works."""
    reason = None
    for n in range(1, max_layers + 1):
        probe, _ = _probe_model(n, vision_layers)
        try:
            vtprune.patch(probe, method, keep=keep, **(options or {}))
        except ValueError as err:
            reason = str(err)
            continue
        vtprune.unpatch(probe)
        return n, None
    return None, reason


_PROBES: dict[tuple[int, int], tuple] = {}


def _probe_model(text_layers: int, vision_layers: int):
    key = (text_layers, vision_layers)
    if key not in _PROBES:
        _PROBES[key] = build_random_llava(
            image_size=28,
            patch_size=14,
            vision_hidden=32,
            vision_layers=vision_layers,
            vision_heads=2,
            text_hidden=32,
            text_layers=text_layers,
            text_heads=2,
        )
    return _PROBES[key]


def one_layer(model, hidden: torch.Tensor):
    """``fn(hidden) -> output`` of the model's decoder layer 0 alone, as the model runs it in prefill: rotary
    embeddings of positions 0..S-1 and the causal mask ``create_causal_mask`` builds for an all-ones 2-D mask."""
    lm = model.model.language_model
    layer = lm.layers[0]
    s = hidden.shape[1]
    positions = torch.arange(s, device=hidden.device)[None]
    with torch.no_grad():
        rotary = lm.rotary_emb(hidden, positions)
    ones = torch.ones(1, s, dtype=torch.long)
    mask = compat.causal_masks(lm.config, hidden, ones, None, {"full_attention": 0})["full_attention"]

    def run(h: torch.Tensor = hidden) -> torch.Tensor:
        with torch.no_grad():
            out = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
        return out[0] if isinstance(out, tuple) else out

    return run


def vision_hook_work(model, method: str, keep: int, options: dict | None = None):
    """The selection signals the engine's vision-tower hooks compute while the tower runs (outside ``select_ms``),
    as a timed callable, or None when the method reads none. The method's ``importance`` is resolved on the model as
    the engine resolves it (``vtprune.signals.resolve_importance``): with ``"cls"``, per hooked vision layer the CLS
    attention row (``cls_attention_rows``) on the layer's q / k outputs, for ``vision_keys`` the head-mean of its keys,
    for ``vision_qk`` the stacked full-width q / k; with ``"received"`` (e.g. ``hiprune``'s default), per hooked layer
    the adapter's ``vision_qk`` (the layer's q / k projections recomputed from its input) and
    ``vtprune.functional.received_attention`` over every query, CLS dropped, for ``vision_keys`` the head-mean keys;
    then the per-layer results stacked, as the engine does. On random inputs of the tower's shape ``[1, 1+P, E]``.
    Returns ``run() -> (cls rows or received attention, head-mean keys or None, full-width q / k or None)``."""
    spec = get_method(method)
    impl = spec.method_cls(spec.make_config({"keep": keep, **(options or {})}))
    if not impl.signals & {"cls_attention", "vision_keys", "vision_qk"}:
        return None
    adapter = get_adapter(model)
    attn = adapter.vision_attention_modules()
    hooked = impl.vision_layers(len(attn))
    importance = resolve_importance(method, impl.importance(), model.config.model_type, adapter.has_cls_token)
    received = importance == "received"
    keys = "vision_keys" in impl.signals
    full = "vision_qk" in impl.signals and not received  # the full-width q / k outputs stacked (prumerge)
    vcfg = model.config.vision_config
    tokens = (vcfg.image_size // vcfg.patch_size) ** 2 + 1
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, tokens, vcfg.hidden_size, generator=gen).to(model.dtype)
    k = torch.randn(1, tokens, vcfg.hidden_size, generator=gen).to(model.dtype)
    x = torch.randn(1, tokens, vcfg.hidden_size, generator=gen).to(model.dtype)  # a hooked layer's input

    def run_received():
        got, means = [], []
        with torch.no_grad():
            for i in hooked:
                qk = adapter.vision_qk(attn[i], (x,), {})
                got.append(F.received_attention(qk.q, qk.k, qk.cu_seqlens, qk.scaling)[1:])  # CLS dropped
                if keys:
                    means.append(qk.k.mean(1)[1:])
            return (
                torch.stack(got).unsqueeze(0),  # [1, L, P], as the engine hands it
                torch.stack(means).unsqueeze(0) if means else None,  # [1, L, P, Dh]
                None,
            )

    def run():
        rows, means, qks = [], [], []
        with torch.no_grad():
            for i in hooked:
                heads = attn[i].num_heads
                rows.append(cls_attention_rows(q[:, :1], k, heads, attn[i].scale))
                if keys:
                    means.append(k.view(1, tokens, heads, -1).mean(2))
                if full:
                    qks.append(torch.stack([q, k], dim=1))
            return (
                torch.stack(rows, dim=1),
                torch.stack(means, dim=1) if means else None,
                torch.stack(qks, dim=1) if qks else None,
            )

    return run_received if received else run


def _layers(st) -> str:
    """Where the method acted in the LM: llm-stage layer K, and the late-drop layer of two-stage methods."""
    late = getattr(st, "late_drop_layer", None)
    layer = "-" if st.layer is None else str(st.layer)
    return layer if late is None else f"{layer}, late drop {late}"


def _median_iqr(values: list[float]) -> tuple[float, float, float]:
    t = sorted(values)
    q1, q3 = statistics.quantiles(t, n=4, method="inclusive")[0::2] if len(t) > 1 else (t[0], t[0])
    return statistics.median(t), q1, q3


def _value(text: str):
    low = text.lower()
    if low in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[low]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _variant(text: str) -> tuple[str, str, dict]:
    """``METHOD:key=value[,key=value]`` -> (label, method, options)."""
    method, sep, rest = text.partition(":")
    pairs = [p for p in rest.split(",") if p.strip()]
    if not sep or not pairs or any("=" not in p for p in pairs):
        raise argparse.ArgumentTypeError(f"--variant takes METHOD:key=value[,key=value], got {text!r}")
    options = {k.strip(): _value(v.strip()) for k, v in (p.split("=", 1) for p in pairs)}
    return f"{method.strip()} " + " ".join(f"{k}={v}" for k, v in options.items()), method.strip(), options


def _keeps(text: str) -> list[int]:
    try:
        keeps = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--keep takes comma-separated ints >= 1, got {text!r}") from None
    if not keeps or min(keeps) < 1:
        raise argparse.ArgumentTypeError(f"--keep takes comma-separated ints >= 1, got {text!r}")
    return keeps


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def _command_line(argv) -> str:
    exe = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    words = [exe, *(sys.argv if argv is None else ["eval/bench/overhead.py", *argv])]
    env = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} " if os.environ.get("PYTHONPATH") else ""
    return env + " ".join(shlex.quote(w) for w in words)


def _native_ops() -> str:
    try:
        from vtprune.kernels import available
    except ImportError:
        return "none in this version"
    state = available()
    return ", ".join(f"{k} {'loaded' if v else 'not loaded'}" for k, v in state.items())


HEADERS = (
    "method",
    "stage",
    "layer",
    "keep",
    "kept",
    "select ms (median)",
    "p25–p75",
    "signal ms outside select",
    "one-layer ms",
    "ratio",
    "within budget",
)


def size_variants(n: int, text_hidden: int, text_layer, seed: int = 0) -> dict:
    """Timed callables at ``n`` visual tokens: CDPruner's and VisPruner's selection functions (LLaVA widths) and one
    decoder layer (``text_layer``: a callable on ``[1, n + 75, text_hidden]`` hidden states)."""
    from vtprune import functional as F

    gen = torch.Generator().manual_seed(seed)
    k = max(1, n // 9)
    feats = torch.randn(n, text_hidden, generator=gen)
    clip_img, clip_txt = torch.randn(n, 768, generator=gen), torch.randn(1, 768, generator=gen)
    vis_feats, attn = torch.randn(n, 1024, generator=gen), torch.rand(n, generator=gen)
    hidden = torch.randn(1, n + 75, text_hidden, generator=gen)
    return {
        f"cdpruner_select N={n}": lambda: F.cdpruner_select(feats, clip_img, clip_txt, k),
        f"vispruner_select N={n}": lambda: F.vispruner_select(attn, vis_feats, k, 0.5),
        f"{LAYER} N={n}": lambda: text_layer(hidden),
    }


def sizes_report(args, command: str) -> int:
    sizes = args.sizes
    t_start = time.perf_counter()
    shape = SMALL if args.small else REAL
    with num_threads(args.threads):
        model, _ = build_random_llava(
            **{
                **shape,
                "image_size": 28,
                "vision_hidden": 32,
                "vision_intermediate": 64,
                "vision_layers": 2,
                "vision_heads": 2,
            },
            text_layers=1,
            seed=args.seed,
        )
        hidden_size = model.config.text_config.hidden_size
        layer = model.model.language_model.layers[0]
        lm = model.model.language_model

        def text_layer(h):
            s = h.shape[1]
            positions = torch.arange(s)[None]
            with torch.no_grad():
                rotary = lm.rotary_emb(h, positions)
                mask = compat.causal_masks(
                    lm.config, h, torch.ones(1, s, dtype=torch.long), None, {"full_attention": 0}
                )["full_attention"]
                return layer(h, attention_mask=mask, position_ids=positions, position_embeddings=rotary)

        variants = {}
        for n in sizes:
            variants.update(size_variants(n, hidden_size, text_layer, args.seed))
        times = interleaved_times_ms(variants, repeats=args.repeats, warmup=args.warmup)
        threads = torch.get_num_threads()
    elapsed = time.perf_counter() - t_start
    lines = []
    for n in sizes:
        layer_ms = _median_iqr(times[f"{LAYER} N={n}"])[0]
        for fn in ("cdpruner_select", "vispruner_select"):
            ms, q1, q3 = _median_iqr(times[f"{fn} N={n}"])
            lines.append(
                f"| {fn} | {n} | {max(1, n // 9)} | {ms:.2f} | {q1:.2f}–{q3:.2f} | {layer_ms:.1f} | "
                f"{ms / layer_ms:.4f} |"
            )
    table = "\n".join(
        [
            "| function | N | k | ms (median) | p25–p75 | one-layer ms (N + 75 tokens) | ratio |",
            "|:--|--:|--:|--:|--:|--:|--:|",
            *lines,
        ]
    )
    setup = (
        f"Selection functions alone at N visual tokens (k = N // 9) vs one Llama decoder layer {hidden_size} wide "
        f"(MLP {model.config.text_config.intermediate_size}, {model.config.text_config.num_attention_heads} heads) "
        f"on N + 75 hidden states; fp32, no grad, median of {args.repeats} interleaved rounds after "
        f"{args.warmup} warm-up run(s)."
    )
    print(setup + "\n\n" + table + f"\n\n({elapsed:.0f} s)")
    if args.out:
        meta = "\n".join(
            provenance(command, f"{threads} (both sides)")
            + [f"- native ops: {_native_ops()}", f"- wall time of the run: {elapsed:.0f} s"]
        )
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(f"# Selection cost at AnyRes / video token counts\n\n{setup}\n\n{meta}\n\n{table}\n")
        print(f"wrote {args.out}")
    return 0


#: Qwen2-7B / Qwen2.5-VL-7B LM widths (the decoder layer the video functions are compared with) and a tiny one
VIDEO_LAYER = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4)
VIDEO_LAYER_SMALL = dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2)
VIDEO_FUNCTIONS = (
    "evs_select",
    "vidcom2_select",
    "fastvid_select",
    "frame_budgets uniqueness",
    "frame_budgets segments",
    "dyseg_segments",
    "dpc_knn_scores",
)


def qwen2_layer(widths: dict, device: str = "cpu", seed: int = 0):
    """``fn(hidden [1, S, D]) -> output`` of one random-weight Qwen2 decoder layer of ``widths`` as the model runs
    it in prefill (rotary embeddings of positions 0..S-1, the causal mask the model builds), fp32, no grad."""
    from transformers import Qwen2Config, Qwen2Model

    torch.manual_seed(seed)
    config = Qwen2Config(**widths, num_hidden_layers=1, vocab_size=16, rope_theta=1e6, attn_implementation="sdpa")
    lm = Qwen2Model(config).eval().to(device)

    def run(h: torch.Tensor) -> torch.Tensor:
        s = h.shape[1]
        positions = torch.arange(s, device=h.device)[None]
        with torch.no_grad():
            rotary = lm.rotary_emb(h, positions)
            ones = torch.ones(1, s, dtype=torch.long, device=h.device)
            mask = compat.causal_masks(lm.config, h, ones, None, {"full_attention": 0})["full_attention"]
            out = lm.layers[0](h, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
        return out[0] if isinstance(out, tuple) else out

    run.model = lm  # the tests check the layer against the model's own forward
    return run


def video_features(frames: int, tokens: int, width: int, seed: int = 0, device: str = "cpu"):
    """Seeded ``(features [T, N, D], frame_attn [T, N])`` with the temporal redundancy a video has, so that the
    data-dependent paths (DySeg segments, FastVID anchors and runs, DPC-KNN on anchor frames) do their usual work:
    four scenes of ``T / 4`` frames, each frame its scene's tokens plus 0.3-scaled noise (consecutive frames of a scene
    ~0.9 cosine, across scenes ~0); ``frame_attn`` rows are softmaxes (each sums to 1, as FastVID's)."""
    gen = torch.Generator().manual_seed(seed)
    scenes = torch.randn(4, tokens, width, generator=gen)
    scene_of = torch.arange(frames) * 4 // frames
    feats = scenes[scene_of] + 0.3 * torch.randn(frames, tokens, width, generator=gen)
    attn = torch.softmax(2 * torch.randn(frames, tokens, generator=gen), dim=-1)
    return feats.to(device), attn.to(device)


def video_variants(frames: int, tokens: int, width: int, layer, seed: int = 0, device: str = "cpu") -> dict:
    """Timed callables for one ``[frames, tokens, width]`` video: every function of ``VIDEO_FUNCTIONS`` at its
    official defaults (EVS q = 0.75, VidCom2 ratio 0.25, FastVID retention 0.27; ``frame_budgets`` for 25% of the
    tokens) and ``layer`` on ``[1, frames * tokens + 75, layer width]`` hidden states."""
    from vtprune import functional as F

    feats, attn = video_features(frames, tokens, width, seed, device)
    k = frames * tokens // 4
    gen = torch.Generator().manual_seed(seed + 1)
    hidden = torch.randn(1, frames * tokens + 75, layer.width, generator=gen).to(device)
    anchor = feats[0, : max(2, tokens // 2)]  # FastVID's DPC-KNN runs per anchor frame on its context candidates
    shape = f"T={frames} N={tokens}"
    return {
        f"evs_select {shape}": lambda: F.evs_select(feats, 0.75),
        f"vidcom2_select {shape}": lambda: F.vidcom2_select(feats, 0.25),
        f"fastvid_select {shape}": lambda: F.fastvid_select(feats, attn),
        f"frame_budgets uniqueness {shape}": lambda: F.frame_budgets(feats, k, "uniqueness"),
        f"frame_budgets segments {shape}": lambda: F.frame_budgets(feats, k, "segments"),
        f"dyseg_segments {shape}": lambda: F.dyseg_segments(feats),
        f"dpc_knn_scores {shape}": lambda: F.dpc_knn_scores(anchor, 4),
        f"{LAYER} {shape}": lambda: layer(hidden),
    }


def video_report(args, command: str) -> int:
    t_start = time.perf_counter()
    widths = VIDEO_LAYER_SMALL if args.small else VIDEO_LAYER
    width = args.width or widths["hidden_size"]
    with num_threads(args.threads):
        layer = qwen2_layer(widths, args.device, args.seed)
        layer.width = widths["hidden_size"]
        variants = {}
        for frames in args.frames:
            for tokens in args.frame_tokens:
                variants.update(video_variants(frames, tokens, width, layer, args.seed, args.device))
        times = interleaved_times_ms(variants, repeats=args.repeats, warmup=args.warmup)
        threads = torch.get_num_threads()
        native = _native_ops()
    elapsed = time.perf_counter() - t_start
    lines, over = [], []
    goal_frames = max(args.frames)
    for frames in args.frames:
        for tokens in args.frame_tokens:
            shape = f"T={frames} N={tokens}"
            layer_ms = _median_iqr(times[f"{LAYER} {shape}"])[0]
            for fn in VIDEO_FUNCTIONS:
                ms, q1, q3 = _median_iqr(times[f"{fn} {shape}"])
                ratio = ms / layer_ms
                if frames == goal_frames and ratio > 0.1:
                    over.append(f"{fn} {shape} ({ratio:.3f})")
                lines.append(
                    f"| {fn} | {frames} | {tokens} | {frames * tokens} | {ms:.2f} | {q1:.2f}–{q3:.2f} "
                    f"| {layer_ms:.2f} | {ratio:.4f} |"
                )
    table = "\n".join(
        [
            "| function | T | N | T x N | ms (median) | p25–p75 | one-layer ms (T x N + 75 tokens) | ratio |",
            "|:--|--:|--:|--:|--:|--:|--:|--:|",
            *lines,
        ]
    )
    setup = (
        f"Pure video selection functions of vtprune.functional on one video of T frames x N tokens, {width}-wide "
        f"post-merger features (seeded, four scenes, see `video_features`), vs one Qwen2 decoder layer "
        f"{widths['hidden_size']} wide (MLP {widths['intermediate_size']}, {widths['num_attention_heads']} heads, "
        f"{widths['num_key_value_heads']} KV heads; SDPA) on T x N + 75 hidden states; {args.device}, fp32, no grad, "
        f"median of {args.repeats} interleaved rounds after {args.warmup} warm-up run(s). dpc_knn_scores: one anchor "
        "frame's context candidates (N / 2 rows, 4 neighbours), the unit FastVID repeats per anchor frame."
    )
    verdict = (
        "Verdict (goal: <= 0.1 of a layer at "
        + f"{goal_frames} frames): "
        + (f"over: {', '.join(over)}." if over else "every function is within the goal.")
    )
    print(setup + "\n\n" + table + "\n\n" + verdict + f"\n\n({elapsed:.0f} s)")
    # one line for eval/gpu/check.sh's summary: a measurement, so PASS whenever every function ran
    print(
        f"SUMMARY: PASS: {len(VIDEO_FUNCTIONS)} video functions x {len(args.frames) * len(args.frame_tokens)} sizes "
        f"on {args.device}; {len(over)} over 0.1 of a layer at {goal_frames} frames"
    )
    if args.out:
        title = "Video selection cost vs one 7B-wide decoder layer"
        _write_table(
            args.out, title, setup, command, threads, f"native ops: {native}", elapsed, f"{table}\n\n{verdict}"
        )
        print(f"wrote {args.out}")
    return 0


def _write_table(path, title, setup, command, threads, native, elapsed, body) -> None:
    """Write a committed overhead table: title, setup, provenance (command, threads, native ops, wall time), body."""
    meta = "\n".join(
        provenance(command, f"{threads} (both sides)")
        + [
            "- the machine was shared with other jobs while this ran: absolute times are noisy, the interleaved "
            "rounds keep the comparison fair",
            f"- {native}",
            f"- wall time of the run: {elapsed:.0f} s",
        ]
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# {title}\n\n{setup}\n\n{meta}\n\n{body}\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--threads",
        type=_positive,
        default=1,
        help="torch intra-op threads for both sides (default 1: the machine's 2 cores are shared)",
    )
    p.add_argument("--repeats", type=_positive, default=5, help="interleaved timing rounds (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first (default 1)")
    p.add_argument("--keep", type=_keeps, default=[64], help="comma-separated budgets (default 64)")
    p.add_argument("--methods", default=None, help="comma-separated subset of the registered methods (default: all)")
    p.add_argument(
        "--variant",
        type=_variant,
        action="append",
        default=[],
        help="extra row: a method with non-default options, METHOD:key=value[,key=value] (repeatable)",
    )
    p.add_argument(
        "--text-layers",
        type=_positive,
        default=None,
        help="LM layers of the benchmark model (default: the most any method needs)",
    )
    p.add_argument("--max-layers", type=_positive, default=8, help="most LM layers tried per method (default 8)")
    p.add_argument("--small", action="store_true", help="tiny model (seconds; for tests), same code")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the Markdown report to this path")
    p.add_argument(
        "--sizes",
        type=_keeps,
        default=None,
        help="comma-separated visual-token counts: time CDPruner's / VisPruner's selection functions there "
        "against one decoder layer, instead of the per-method table",
    )
    p.add_argument(
        "--video",
        action="store_true",
        help="time the pure video selection functions (evs_select, vidcom2_select, fastvid_select, frame_budgets, "
        "dyseg_segments, dpc_knn_scores) against one Qwen2-7B-wide layer, instead of the per-method table",
    )
    p.add_argument("--frames", type=_keeps, default=[16, 32], help="--video: comma-separated frame counts")
    p.add_argument("--frame-tokens", type=_keeps, default=[100, 400], help="--video: comma-separated tokens per frame")
    p.add_argument("--width", type=_positive, default=None, help="--video: feature width (default: the layer's)")
    p.add_argument("--device", default="cpu", help="--video: cpu or cuda (default cpu)")
    args = p.parse_args(argv)
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    methods = vtprune.list_methods(host="vlm", modality="image")
    if args.methods is not None:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in methods]
        if unknown or not wanted:
            p.error(f"--methods: unknown {unknown or args.methods!r}; registered: {', '.join(methods)}")
        methods = wanted
    for label, method, options in args.variant:
        if method not in vtprune.list_methods(host="vlm"):
            registered = ", ".join(vtprune.list_methods(host="vlm"))
            p.error(f"--variant {label!r}: unknown method {method!r}; registered: {registered}")
        try:
            get_method(method).make_config({"keep": args.keep[0], **options})
        except (TypeError, ValueError) as err:
            p.error(f"--variant {label!r}: {err}")
    entries = [(m, m, get_method(m).run_options) for m in methods] + list(args.variant)
    command = _command_line(argv)
    if args.video:
        return video_report(args, command)
    if args.sizes:
        return sizes_report(args, command)
    shape = SMALL if args.small else REAL

    t_start = time.perf_counter()
    with num_threads(args.threads):
        need = {
            label: layers_needed(method, args.keep[0], shape["vision_layers"], args.max_layers, options)
            for label, method, options in entries
        }
        counts = [n for n, _ in need.values() if n is not None]
        text_layers = args.text_layers or max(counts, default=1)
        model, inputs = build_random_llava(**shape, text_layers=text_layers, seed=args.seed)
        cfg, tcfg = model.config, model.config.text_config
        n_visual = int((inputs["input_ids"] == cfg.image_token_id).sum())
        seq = inputs["input_ids"].shape[1]

        gen = torch.Generator().manual_seed(args.seed)
        hidden = torch.randn(1, seq, tcfg.hidden_size, generator=gen).to(model.dtype)
        variants, contexts = {LAYER: one_layer(model, hidden)}, {}
        rows: list[Row] = []
        signal_variants: dict[str, str] = {}  # method -> variant name of its outside-select signal work
        samples: dict[str, list[float]] = {}

        for label, method, options in entries:
            n_layers, reason = need[label]
            if n_layers is None or n_layers > text_layers:
                rows.append(Row(label, None, skipped=reason or f"needs {n_layers} LM layers, model has {text_layers}"))
                continue
            for keep in args.keep:
                row = Row(label, keep)
                rows.append(row)
                try:
                    with vtprune.patched(model, method, keep=keep, **options):
                        prefill(model, inputs)
                        st = vtprune.stats(model)
                except Exception as err:  # report it in the table rather than stop the whole benchmark
                    row.skipped = f"{type(err).__name__}: {err}"
                    continue
                if st is None:
                    row.skipped = "the patched prefill recorded no PruneStats"
                    continue
                row.stage, row.layer, row.kept = st.stage, _layers(st), st.visual_tokens_kept[0]
                name = f"{label} keep={keep}"
                samples[name] = []

                def timed(name=name):
                    prefill(model, inputs)
                    samples[name].append(vtprune.stats(model).select_ms)

                variants[name] = timed
                contexts[name] = lambda m=method, k=keep, o=options: vtprune.patched(model, m, keep=k, **o)
                if label not in signal_variants and (work := vision_hook_work(model, method, keep, options)):
                    signal_variants[label] = f"{label} vision-hook signals"
                    variants[signal_variants[label]] = work

        times = interleaved_times_ms(variants, repeats=args.repeats, warmup=args.warmup, contexts=contexts)
        threads = torch.get_num_threads()
        native = _native_ops()
    elapsed = time.perf_counter() - t_start

    layer_ms, layer_q1, layer_q3 = _median_iqr(times[LAYER])
    lines, over, cannot = [], [], []
    for row in rows:
        if row.skipped is not None:
            keep = "-" if row.keep is None else str(row.keep)
            cannot.append(f"{row.method}" + ("" if row.keep is None else f" keep={row.keep}"))
            lines.append(
                f"| {row.method} | - | - | {keep} | - | - | - | - | {layer_ms:.1f} | - | cannot run: "
                f"{row.skipped.replace('|', '/')} |"
            )
            continue
        sel, q1, q3 = _median_iqr(samples[f"{row.method} keep={row.keep}"][-args.repeats :])
        outside = statistics.median(times[signal_variants[row.method]]) if row.method in signal_variants else 0.0
        ratio = (sel + outside) / layer_ms
        if ratio > 1:
            over.append(f"{row.method} keep={row.keep} ({ratio:.2f}x one layer)")
        lines.append(
            f"| {row.method} | {row.stage} | {row.layer} | {row.keep} | {row.kept} "
            f"| {sel:.2f} | {q1:.2f}–{q3:.2f} | {f'{outside:.2f}' if row.method in signal_variants else '-'} "
            f"| {layer_ms:.1f} | {ratio:.4f} | {'yes' if ratio <= 1 else '**no**'} |"
        )
    table = "\n".join(
        [
            "| " + " | ".join(HEADERS) + " |",
            "|:--|:--|--:|--:|--:|--:|--:|--:|--:|--:|:--|",
            *lines,
        ]
    )
    layers_why = "set by --text-layers" if args.text_layers else "the most any method needs"
    vcfg = cfg.vision_config
    layer_cls = type(model.model.language_model.layers[0]).__name__
    setup = (
        f"Random-weight LLaVA-1.5 layout: CLIP tower {vcfg.image_size} px / patch {vcfg.patch_size} ({n_visual} "
        f"patches + CLS), {vcfg.hidden_size} wide (MLP {vcfg.intermediate_size}, {vcfg.num_attention_heads} heads) x "
        f"{vcfg.num_hidden_layers} layers; projector to {tcfg.hidden_size}; Llama LM {tcfg.hidden_size} wide (MLP "
        f"{tcfg.intermediate_size}, {tcfg.num_attention_heads} heads) x {text_layers} layers ({layers_why}; the fewest "
        f"each method accepts: {', '.join(f'{m} {n}' for m, (n, _) in need.items() if n is not None)}). "
        f"Prompt: {seq} tokens "
        f"({n_visual} visual + {seq - n_visual} text), batch 1, fp32, SDPA, no grad. Median of {args.repeats} "
        f"interleaved rounds after {args.warmup} warm-up run(s) per variant."
    )
    notes = [
        f"one-layer ms: decoder layer 0 of this LM ({layer_cls}, {tcfg.hidden_size} / {tcfg.intermediate_size} / "
        f"{tcfg.num_attention_heads} heads) alone on {seq} hidden states with rotary embeddings and the model's causal "
        f"mask: median {layer_ms:.1f} ms (p25–p75 {layer_q1:.1f}–{layer_q3:.1f}), timed in the same rounds as the "
        "selections.",
        "select ms: `vtprune.stats(model).select_ms` of a full patched prefill — the engine's clock around the "
        "method's `select` and the signal post-processing (llm stage: RoPE of the captured q/k rows and the "
        "attention row of the last prompt token; two-stage methods: both stages, the late drop's attention share "
        "included). Capturing layer outputs and projector inputs with hooks costs no compute.",
        "signal ms outside select: for methods that read the vision tower's CLS attention or keys, what the tower "
        "hooks compute while the tower runs (not in `select_ms`): per hooked layer the CLS attention row and, for "
        "`vision_keys`, the head-mean keys, for `vision_qk`, the full-width q / k stacked; with "
        "`importance=\"received\"` (hiprune's default) instead the layer's q / k recomputed from its input and the "
        "attention every patch receives (all queries); timed separately in the same rounds (same shapes, random "
        "inputs) and added to select ms for the ratio and the verdict.",
        "ratio = (select ms + signal ms outside select) / one-layer ms; within budget when <= 1.",
    ]
    bench_options = {m: o for label, m, _ in entries if label == m and (o := get_method(m).run_options)}
    if bench_options:
        notes.append(
            "options the method rows ran with (each method's registry `run_options`): "
            + "; ".join(f"{m} {', '.join(f'{k}={v!r}' for k, v in o.items())}" for m, o in bench_options.items())
            + (
                " (cdpruner: the random model has no CLIP text tower for its default text='clip'; the greedy DPP is "
                "the same, the CLIP projections of text='clip' are not timed)"
                if "cdpruner" in bench_options
                else ""
            )
        )
    verdict = (
        "Verdict: "
        + (f"over budget: {', '.join(over)}" if over else "every method that ran is within budget")
        + (f"; could not run: {', '.join(cannot)}" if cannot else "")
        + "."
    )
    body = "\n\n".join([table, verdict, "Notes:\n" + "\n".join(f"- {n}" for n in notes)])
    print(setup + "\n\n" + body)
    print(f"\n({elapsed:.0f} s)")
    if args.out:
        native = f"native ops (csrc/, used by vtprune.functional when loaded): {native}"
        _write_table(
            args.out, "Selection overhead vs one 7B-wide decoder layer", setup, command, threads, native, elapsed, body
        )
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
