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
#: signals the vLLM plugin hands a method: the projected visual tokens of one image / video
SIGNALS = frozenset({"features"})


def servable_methods(num_layers: int = 32) -> list[str]:
    """Registered methods the vLLM plugin can run: vision stage, only :data:`SIGNALS`, no merged vectors, no late
    drop inside the language model, and a kept count equal to the config's budget (the processor sizes the prompt
    before the vision tower runs)."""
    return [name for name in list_methods() if _refusal(name, num_layers) is None]


def _refusal(name: str, num_layers: int) -> str | None:
    spec = get_method(name)
    cls = spec.method_cls
    if cls.stage != "vision":
        return (f"it prunes inside the language model (stage {cls.stage!r}, from attention or hidden states of a "
                "decoder layer), which vLLM's paged attention does not expose")
    missing = sorted(cls.signals - SIGNALS)
    if missing:
        return f"it needs the signal(s) {missing}, and the vLLM plugin provides only {sorted(SIGNALS)}"
    if cls.merges:
        return "it merges tokens (replaces the kept vectors), which the vLLM plugin does not support"
    probe = spec.config_cls(keep=1)
    if cls(probe).drop_layer(num_layers) is not None:
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
    why = _refusal(config.method, num_layers)
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
