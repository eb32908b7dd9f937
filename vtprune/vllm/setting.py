"""The ``vtprune`` setting of a vLLM deployment: which method, budget and options, read from the model's config.

A server operator passes it with vLLM's own flag, e.g.::

    vllm serve Qwen/Qwen2.5-VL-7B-Instruct --hf-overrides '{"vtprune": {"method": "divprune", "ratio": 0.25}}'

The value is the JSON form of a vtprune config (``PruneConfig.to_dict()``: ``method`` plus that method's options).
Only methods that act before the language model on signals the plugin hands them can run inside vLLM; any other
method, and every malformed setting, is refused with a ``ValueError`` when the engine starts. Pure Python (no vLLM
import): the processor (front-end process) and the model (engine process) read the same setting the same way.
"""

from __future__ import annotations

import json
from typing import Any

from ..config import PruneConfig
from ..registry import get_method, list_methods, spec_for_config

#: the key of the model config (``--hf-overrides``) that holds the setting
KEY = "vtprune"
#: signals the vLLM plugin hands a method: the projected visual tokens of one image / video (``features``, with its
#: (t, h, w) grid), the patch merger's input per token with a float32 per-token copy of the merger
#: (``projector_inputs``, ``projector``) and, read from the vision tower's attention, the attention each patch
#: receives at the method's vision layers and their head-mean keys (``cls_attention`` / ``vision_keys`` with
#: ``importance="received"``: Qwen-VL towers have no CLS token, see :data:`RECEIVED`)
SIGNALS = frozenset({"features", "projector_inputs", "cls_attention", "vision_keys"})
#: the signals the plugin gives only as the attention each patch receives (``importance="received"``)
RECEIVED = frozenset({"cls_attention", "vision_keys"})

#: why the plugin cannot give a signal
_MISSING = {
    "prompt_embeds": "the prompt's text embeddings (vLLM's embed_multimodal receives an image's or video's pixels "
    "and grid only, never the prompt's text, and vLLM caches its output per media item by content "
    "hash and reuses it for every prompt that carries the same item, so a selection that depends on "
    "the prompt would be served to other prompts)",
    "instruction": "the prompt's instruction text (vLLM's embed_multimodal never sees the prompt's text, and its "
    "output is cached per media item by content hash and shared across prompts)",
}


def frame_counts_ahead() -> list[str]:
    """Methods whose kept tokens depend only on an item's size / grid and options, not on its pixels (registry
    ``kept_from_grid``): the processor can size each frame's placeholder run of a Qwen3-VL video before the vision
    tower runs (others are refused there)."""
    return list_methods(host="vlm", kept_from_grid=True)


def servable_methods(num_layers: int = 32) -> list[str]:
    """Registered methods the vLLM plugin can run with their default options: vision stage, only :data:`SIGNALS`
    (CLS-scored methods with ``importance="received"``, their default on Qwen-VL), no late drop inside the language
    model, and a kept count equal to the config's budget (the processor sizes the prompt before the vision tower
    runs). Merging methods are served (the merged vectors replace the kept rows; Qwen3-VL's DeepStack levels are
    merged with the same weights). A method's registry record names the options with which a method refused on its
    defaults is served (``vllm_options``: ``todre`` with ``late_drop=False``)."""
    return [
        name for name in list_methods(host="vlm") if _refusal(get_method(name).config_cls(keep=1), num_layers) is None
    ]


def served(num_layers: int = 32) -> str:
    """What the plugin serves, as printed in its refusals: :func:`servable_methods` and the methods served with the
    options of their registry record (``vllm_options``)."""
    extra = [
        f"{name} with " + ", ".join(f"{k}={json.dumps(v)}" for k, v in opts.items())
        for name in list_methods(host="vlm")
        if (opts := get_method(name).vllm_options)
    ]
    return ", ".join(servable_methods(num_layers) + extra)


def _refusal(config: PruneConfig, num_layers: int) -> str | None:
    """Why ``config``'s method cannot run in vLLM, or None."""
    cls = spec_for_config(config).method_cls
    if cls.stage != "vision":
        return (
            f"it prunes inside the language model (stage {cls.stage!r}, from attention or hidden states of a "
            "decoder layer), which vLLM's paged attention does not expose"
        )
    method = cls(config)  # some methods' signals depend on their options (cdpruner's text=)
    if method.kept_count != "budget":
        return (
            f"it keeps a count of its own (kept_count={method.kept_count!r}, e.g. per-frame rounding), but the plugin "
            "sizes each image's or video's placeholder run from the budget before the vision tower runs"
        )
    missing = sorted(method.signals - SIGNALS)
    if missing:
        reasons = "; ".join(_MISSING.get(m, m) for m in missing)
        return (
            f"it needs the signal(s) {missing}, which the vLLM plugin cannot give: {reasons}. The plugin gives "
            f"{sorted(SIGNALS)}"
        )
    if method.signals & RECEIVED and getattr(config, "importance", None) == "cls":
        return (
            "importance='cls' needs the vision tower's CLS attention, and Qwen-VL towers have no CLS token; use "
            "importance='received' (the attention each patch receives, the default on Qwen-VL) or leave it unset"
        )
    if method.drop_layer(num_layers) is not None:
        fix = spec_for_config(config).vllm_options
        how = f"; serve its pre-LLM selection alone with {json.dumps(fix)}" if fix else ""
        return (
            "it drops visual tokens again inside the language model (a late drop, from a decoder layer's attention, "
            f"which vLLM's paged attention does not expose){how}"
        )
    return None


def read(hf_config: Any) -> PruneConfig | None:
    """The deployment's vtprune config from ``hf_config.vtprune`` (a dict, or its JSON text), or None when the key is
    absent (the model then runs exactly as vLLM's stock model). Raises ``ValueError`` naming what was given and what
    is allowed when the setting is malformed or names a method vLLM cannot run."""
    raw = getattr(hf_config, KEY, None)
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"the {KEY!r} setting is not valid JSON ({err}): {raw!r}") from None
    if not isinstance(raw, dict) or "method" not in raw:
        raise ValueError(
            f"the {KEY!r} setting must be a mapping with a 'method' key and the method's options, e.g. "
            f'{{"method": "divprune", "ratio": 0.25}}; got {raw!r}'
        )
    text = getattr(hf_config, "text_config", hf_config)
    num_layers = int(text.num_hidden_layers)
    try:
        config = PruneConfig.from_dict(dict(raw))  # unknown method, bad budget: ValueError; unknown option: TypeError
    except TypeError as err:  # a setting is a value: every bad one is a ValueError here
        raise ValueError(str(err)) from None
    why = _refusal(config, num_layers)
    if why is not None:
        raise ValueError(
            f"method {config.method!r} cannot run in vLLM: {why}. Methods the vLLM plugin serves: {served(num_layers)}"
        )
    if config.positions != "original":
        raise ValueError(
            f"positions={config.positions!r} is not supported by the vLLM plugin (M-RoPE models keep "
            "original positions); use positions='original'"
        )
    return config


def method(config: PruneConfig):
    """The method object that selects the kept tokens (the same class the Hugging Face path runs)."""
    return spec_for_config(config).method_cls(config)


def overrides(config: PruneConfig | dict) -> str:
    """The ``--hf-overrides`` JSON for ``config`` (a vtprune config or its dict form), checked the way the engine
    will check it."""
    data = config.to_dict() if isinstance(config, PruneConfig) else dict(config)

    class _Probe:
        pass

    probe = _Probe()
    setattr(probe, KEY, data)
    probe.num_hidden_layers = 1 << 30
    read(probe)
    return json.dumps({KEY: data}, sort_keys=True)
