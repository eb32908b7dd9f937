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
from ..registry import get_method, list_methods

#: the key of the model config (``--hf-overrides``) that holds the setting
KEY = "vtprune"
#: signals the vLLM plugin hands a method: the projected visual tokens of one image / video (``features``, with its
#: (t, h, w) grid) and the patch merger's input per token with a float32 per-token copy of the merger
#: (``projector_inputs``, ``projector``)
SIGNALS = frozenset({"features", "projector_inputs"})

#: why the plugin cannot give a signal
_MISSING = {
    "cls_attention": "the vision tower's CLS attention (Qwen-VL vision towers have no CLS token)",
    "vision_keys": "the vision tower's keys of a CLS-token layer (Qwen-VL vision towers have no CLS token)",
    "prompt_embeds": "the prompt's text embeddings (vLLM runs the vision encoder on the image alone, before and "
                     "apart from the prompt's text)",
    "instruction": "the prompt's instruction text (vLLM runs the vision encoder on the image alone)",
}


def servable_methods(num_layers: int = 32) -> list[str]:
    """Registered methods the vLLM plugin can run (with their default options): vision stage, only
    :data:`SIGNALS`, no late drop inside the language model, and a kept count equal to the config's budget (the
    processor sizes the prompt before the vision tower runs). Merging methods are served (the merged vectors replace
    the kept rows; Qwen3-VL's DeepStack levels are merged with the same weights)."""
    return [name for name in list_methods() if _refusal(get_method(name).config_cls(keep=1), num_layers) is None]


def _refusal(config: PruneConfig, num_layers: int) -> str | None:
    """Why ``config``'s method cannot run in vLLM, or None."""
    cls = get_method(config.method).method_cls
    if cls.stage != "vision":
        return (f"it prunes inside the language model (stage {cls.stage!r}, from attention or hidden states of a "
                "decoder layer), which vLLM's paged attention does not expose")
    method = cls(config)  # some methods' signals depend on their options (cdpruner's text=)
    missing = sorted(method.signals - SIGNALS)
    if missing:
        reasons = "; ".join(_MISSING.get(m, m) for m in missing)
        return (f"it needs the signal(s) {missing}, which the vLLM plugin cannot give: {reasons}. The plugin gives "
                f"{sorted(SIGNALS)}")
    if method.drop_layer(num_layers) is not None:
        return "it drops visual tokens again inside the language model (a late drop)"
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
        raise ValueError(f"the {KEY!r} setting must be a mapping with a 'method' key and the method's options, e.g. "
                         f'{{"method": "divprune", "ratio": 0.25}}; got {raw!r}')
    text = getattr(hf_config, "text_config", hf_config)
    num_layers = int(getattr(text, "num_hidden_layers"))
    config = PruneConfig.from_dict(dict(raw))  # unknown method / option, bad budget: ValueError
    why = _refusal(config, num_layers)
    if why is not None:
        raise ValueError(f"method {config.method!r} cannot run in vLLM: {why}. Methods the vLLM plugin serves: "
                         f"{', '.join(servable_methods(num_layers))}")
    if config.positions != "original":
        raise ValueError(f"positions={config.positions!r} is not supported by the vLLM plugin (M-RoPE models keep "
                         "original positions); use positions='original'")
    return config


def method(config: PruneConfig):
    """The method object that selects the kept tokens (the same class the Hugging Face path runs)."""
    return get_method(config.method).method_cls(config)


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
