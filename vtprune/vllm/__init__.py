"""vtprune in vLLM: pre-LLM visual-token pruning in vLLM's Qwen2.5-VL and Qwen3-VL (images and videos; Qwen3-VL
videos only with methods whose kept tokens do not depend on the pixels), as a ``vllm.general_plugins`` plugin.

Install with ``pip install 'vtprune[vllm]'``; vLLM then calls :func:`register` in every process it starts. A
deployment turns pruning on with ``--hf-overrides '{"vtprune": {"method": "divprune", "ratio": 0.25}}'`` (see
:mod:`vtprune.vllm.setting`); without that key the model runs exactly as vLLM's stock one.

This package imports vLLM only inside :func:`register`, :mod:`vtprune.vllm.qwen_vl` (the model classes) and
:mod:`vtprune.vllm.sizing` (the processors), and of vtprune only the registry, configs and methods
(``vtprune.functional``), Qwen's grid (:mod:`vtprune.adapters.qwen_grid`, shared with the Hugging Face adapter) and
the engine's refill of a video's empty frames (``vtprune.engine.units.refill_frames``), so it runs with the
transformers release vLLM pins.
"""

from __future__ import annotations

from .setting import KEY, overrides, read, servable_methods, served

__all__ = ["register", "overrides", "read", "servable_methods", "served", "pruning_log", "KEY", "ARCHITECTURES"]

#: vLLM architectures the plugin replaces with its pruning subclass (inert without a ``vtprune`` setting)
ARCHITECTURES = {
    "Qwen2_5_VLForConditionalGeneration": "vtprune.vllm.qwen_vl:VTPruneQwen2_5_VL",
    "Qwen3VLForConditionalGeneration": "vtprune.vllm.qwen_vl:VTPruneQwen3VL",
}

_registered = False


def pruning_log(model) -> list[dict] | None:
    """What the served model's pruning kept, item by item in the order the vision encoder ran them (dicts with
    ``modality``, ``n``, ``kept``, ``select_ms``); None for a model the plugin does not serve. Read it from the
    engine with ``llm.apply_model(vtprune.vllm.pruning_log)`` (one list per worker)."""
    return getattr(model, "vtprune_log", None)


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the pruning model classes and let the model runner pass
    kept tokens' positions back (idempotent; vLLM calls it once per process)."""
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
    _enable_position_recompute()
    _registered = True


def _enable_position_recompute() -> None:
    """vLLM's model runners call ``model.recompute_mrope_positions`` only when ``is_multimodal_pruning_enabled``,
    which they set from ``video_pruning_rate`` (EVS) and which the CPU runner never sets. Set it, after the model
    loads, for a model that carries a vtprune setting, and for nothing else."""
    from vllm.v1.worker import gpu_model_runner

    runners = [gpu_model_runner.GPUModelRunner]
    try:
        from vllm.v1.worker import cpu_model_runner
    except ImportError:  # a vLLM build without the CPU runner
        pass
    else:
        runners.append(cpu_model_runner.CPUModelRunner)
    for cls in runners:
        load = cls.__dict__.get("load_model")
        if load is None or getattr(load, "_vtprune", False):
            continue

        def load_model(self, *args, _load=load, **kwargs):
            out = _load(self, *args, **kwargs)
            if getattr(self.get_model(), "vtprune_config", None) is not None:
                self.is_multimodal_pruning_enabled = True
            return out

        load_model._vtprune = True
        cls.load_model = load_model
