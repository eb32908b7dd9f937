"""The ``vtprune`` lmms-eval model: a Hugging Face VLM pruned by a vtprune method, with per-request costs.

lmms-eval finds it through the ``lmms_eval.models`` entry point (:func:`manifest`, declared in pyproject.toml)::

    lmms-eval --model vtprune --tasks gqa --batch_size 4 \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=dart,keep=128,layer=2

``model_args``: ``pretrained`` (local path or hub id of any model type vtprune supports), ``method`` (a name
from ``vtprune.list_methods()``, ``none`` for the unpruned model, or ``downsample`` for the downsampling baseline
below), ``keep=N`` or ``ratio=r`` (the budget), loading options (``device``, ``dtype``, ``device_map``,
``attn_implementation``, ``trust_remote_code``, ``revision``) and every other key is an option of the method,
validated by its config before anything loads.

Each batch of requests is rendered with the processor's chat template (one user turn: the request's images
and videos (:func:`is_video`; video files are decoded, ``num_frames`` frames sampled uniformly), then its text),
left-padded and passed to ``generate`` (greedy unless the task asks
for sampling). The model is always run through vtprune's engine: with the method, or for ``none`` with every
visual token kept (random at ratio 1.0, which leaves the outputs bit-identical to the unpatched model), so pruned
and unpruned runs are measured by the same accounting. Per request it records and reports through
lmms-eval's metric hook (``log_metrics``; lmms-eval reports the means as ``avg_<key>`` under ``results["throughput"]``):

* ``visual_tokens_in`` / ``visual_tokens_kept``: the request's own counts (``vtprune.stats``), and
  ``visual_tokens_nominal`` the count its budget names (``PruneStats.visual_tokens_nominal``);
* ``prefill_tflops``: analytic prefill FLOPs (vision tower, projector, LLM), the batch's total divided by its
  requests (exact at batch size 1);
* ``prefill_ms``: wall time from the ``generate`` call until its first forward pass returns (vision tower,
  pruning and LLM prefill: the time to the first token's logits), divided by the batch's requests (the first
  batch a model sees is run once untimed beforehand, so one-off start-up costs are not counted);
* ``kv_cache_mb``: bytes of the request's KV cache after prefill (``vtprune.flops.kv_cache_bytes``), in MiB.

The same records are kept in :attr:`VTPrune.records` for the sweep runner.

``method=downsample,keep=N`` is the downsampling baseline (VTC-Bench's row to beat): the *unpatched* model (kept
tokens: all, as for ``none``) on inputs shrunk so that the model itself produces at most ``N`` (about ``N``) visual
tokens per image: the adapter's :meth:`~vtprune.adapters.base.ModelAdapter.downsample_inputs` resizes the images
(Qwen-VL) or gives the processor fewer tiles (InternVL) before the request is rendered; images that already give no
more than ``N`` are left as they are. The records hold the tokens and FLOPs of what really ran (vision tower on the
smaller input included), and ``visual_tokens_nominal = N``. Fixed-resolution families (LLaVA-1.5, Gemma 3, the
bundled demo model) refuse it: their processor resizes every image back to one size, so no token is saved.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from .. import flops
from ..adapters import get_adapter
from ..api import is_patched, patch, set_instructions, stats, unpatch
from ..config import PruneConfig
from ..methods import RandomConfig
from ..registry import get_method

try:  # lmms-eval is the optional extra ``vtprune[eval]``
    from lmms_eval.api.model import lmms
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("vtprune.harness needs lmms-eval: pip install 'vtprune[eval]'") from err

__all__ = [
    "VTPrune",
    "RequestRecord",
    "manifest",
    "method_config",
    "budget_options",
    "UNPRUNED",
    "DOWNSAMPLE",
    "MODEL_NAME",
]

#: the name lmms-eval knows this model by (``--model vtprune``)
MODEL_NAME = "vtprune"
#: the method name of the unpruned baseline
UNPRUNED = "none"
#: the method name of the downsampling baseline: the unpatched model on inputs shrunk to about the budget's tokens
DOWNSAMPLE = "downsample"
#: the method name of a composed schedule (options: schedule=[{"method": ..., ...}, ...])
SCHEDULE = "schedule"
#: model_args that configure loading, not the method
LOAD_ARGS = ("device", "dtype", "device_map", "attn_implementation", "trust_remote_code", "revision")
#: generation kwargs of lmms-eval tasks that are passed to ``generate``; others are ignored with a warning
_GEN_KEYS = ("max_new_tokens", "temperature", "top_p", "num_beams", "do_sample", "until")
DEFAULT_MAX_NEW_TOKENS = 128
#: set on a model once it ran one untimed warm-up batch
_WARM = "_vtprune_harness_warm"


def manifest():
    """The ``lmms_eval.models`` entry point: ``vtprune`` -> :class:`VTPrune`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.VTPrune")


def budget_options(budget: int | float | None) -> dict[str, Any]:
    """A sweep budget as the method's budget option: an int is ``keep=N`` (visual tokens kept per unit), a float in
    (0, 1) is ``ratio=r`` (the kept fraction of each unit's tokens: a retention rate, for inputs such as videos whose
    token count varies); None (the unpruned row) is no option."""
    if budget is None:
        return {}
    return {"ratio": budget} if isinstance(budget, float) else {"keep": budget}


def method_config(
    method: str | None, keep: int | None = None, ratio: float | None = None, **options: Any
) -> PruneConfig | list[PruneConfig] | None:
    """The validated config of ``method`` at the given budget, or None for the unpruned model (``none``) and for the
    downsampling baseline (``downsample``: the unpatched model on smaller inputs; it takes ``keep`` and nothing else).

    ``method="schedule"`` composes methods (``vtprune.patch`` with a list): ``schedule=[{"method": "divprune",
    "ratio": 0.33}, {"method": "fastv", "layer": 2}]``, each element a method's options; every element but the
    last carries its own budget, the last one gets ``keep`` / ``ratio`` (the visual tokens that reach the end).
    Unknown methods or options and bad budgets raise ValueError (TypeError for wrongly typed values)."""
    budget = {k: v for k, v in (("keep", keep), ("ratio", ratio)) if v is not None}
    if method is None or method == UNPRUNED:
        if budget or options:
            raise ValueError(f"method {UNPRUNED!r} (unpruned) takes no budget or options, got {budget | options}")
        return None
    if method == DOWNSAMPLE:
        if options or ratio is not None:
            raise ValueError(
                f"method {DOWNSAMPLE!r} (the unpatched model on smaller inputs) takes only keep=N (visual tokens per "
                f"image), got {({'ratio': ratio} if ratio is not None else {}) | options}"
            )
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"method {DOWNSAMPLE!r} needs keep=N, an int >= 1 (visual tokens per image); got {keep!r}")
        return None
    if method == SCHEDULE:
        return _schedule_configs(options, budget)
    spec = get_method(method)
    return spec.make_config({**budget, **options}, error=TypeError if spec.host == "vit" else ValueError)


def _schedule_configs(options: dict[str, Any], budget: dict[str, Any]) -> list[PruneConfig]:
    steps = options.get("schedule")
    if set(options) != {"schedule"} or not isinstance(steps, (list, tuple)) or len(steps) < 2:
        raise ValueError(
            f"method {SCHEDULE!r} takes one option, schedule: a list of two or more method option "
            f"mappings ({{'method': NAME, ...}}), got {options!r}"
        )
    configs = []
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or not isinstance(step.get("method"), str):
            raise ValueError(f"schedule[{i}] must be a mapping with a 'method' name, got {step!r}")
        opts = {k: v for k, v in step.items() if k != "method"}
        last = i == len(steps) - 1
        if last and ({"keep", "ratio"} & set(opts)):
            raise ValueError(
                f"schedule[{i}] (the last step) takes the cell's budget; remove its "
                f"{sorted({'keep', 'ratio'} & set(opts))}"
            )
        if not last and not ({"keep", "ratio"} & set(opts)):
            raise ValueError(
                f"schedule[{i}] ({step['method']!r}) needs its own budget (keep or ratio); only the "
                "last step takes the cell's budget"
            )
        configs.append(get_method(step["method"]).make_config({**(budget if last else {}), **opts}, error=ValueError))
    return configs


@dataclasses.dataclass
class RequestRecord:
    """What one request cost. Batch-level quantities (FLOPs, ms) are the batch's divided by its requests."""

    task: str
    doc_id: int
    batch_size: int
    visual_tokens_in: int
    visual_tokens_kept: int
    prefill_tflops: float
    prefill_ms: float
    select_ms: float
    kv_cache_mb: float
    new_tokens: int
    visual_tokens_nominal: int | None = None  # what the budget names (``PruneStats.visual_tokens_nominal``)


class VTPrune(lmms):
    """lmms-eval model wrapping any HF VLM that vtprune supports (see the module docstring)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        method: str = UNPRUNED,
        keep: int | None = None,
        ratio: float | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str = "auto",
        device_map: str | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
        max_batch_size: int | None = None,
        num_frames: int | str | None = None,
        model=None,
        processor=None,
        **options: Any,
    ) -> None:
        super().__init__()
        del max_batch_size  # lmms-eval passes it; batches have a fixed size here
        # everything about the method is checked before any weight is read
        self.prune_config = method_config(method, keep, ratio, **options)
        self.downsample = keep if method == DOWNSAMPLE else None  # tokens per image the inputs are shrunk to
        if self.downsample is not None:
            self.method = DOWNSAMPLE
        elif self.prune_config is None:
            self.method = UNPRUNED
        elif isinstance(self.prune_config, list):
            self.method = "+".join(c.method for c in self.prune_config)
        else:
            self.method = self.prune_config.method
        self.num_frames = None if num_frames in (None, "") else int(num_frames)
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"num_frames must be an int >= 1 (frames sampled per video file), got {num_frames!r}")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")

        from accelerate import Accelerator

        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:  # accelerate launch: one device per process (data parallel)
            device = str(self.accelerator.device)
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes
        elif device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"

        self._owns_model = model is None
        if model is None:
            if not pretrained:
                raise ValueError("the vtprune model needs pretrained=<local path or hub id> in model_args")
            model, processor = load_pretrained(
                pretrained,
                device=device,
                dtype=dtype,
                device_map=device_map,
                attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
                revision=revision,
            )
        elif processor is None:
            raise ValueError("pass the processor together with an already loaded model")
        self._model = model
        self.processor = processor
        if self.downsample is not None:
            get_adapter(model).check_downsample(self.downsample, processor)
        self.pretrained = pretrained or getattr(model.config, "_name_or_path", type(model).__name__)
        self._device = next(model.parameters()).device
        if getattr(processor, "chat_template", None) is None:
            raise ValueError(
                f"the processor of {self.pretrained!r} has no chat template; vtprune renders every request with it"
            )
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "left"
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.records: list[RequestRecord] = []
        self.peak_memory_bytes: int | None = None
        self._warned_keys: set[str] = set()

    # -- lmms interface ------------------------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "the vtprune model answers generation tasks (output_type generate_until) only; "
            "loglikelihood / multiple_choice tasks are not supported"
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the vtprune model does not support multi-round generation tasks")

    def clean(self):
        """lmms-eval calls this after each evaluation: free cached memory, and drop the model only if this
        instance loaded it (a sweep passes in a model it reuses for the next cell)."""
        if self._owns_model:
            super().clean()
        elif torch.cuda.is_available():
            torch.cuda.empty_cache()

    def generate_until(self, requests) -> list[str]:
        from lmms_eval import utils
        from tqdm import tqdm

        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        collator = utils.Collator(
            [r.args for r in requests], sort_fn=lambda a: (-len(a[0]), a[0]), group_fn=lambda a: a[1], grouping=True
        )
        outputs = []
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="vtprune generate", leave=False)
        config = self.prune_config if self.prune_config is not None else RandomConfig(ratio=1.0)
        if is_patched(self._model):
            raise ValueError("the model given to the vtprune lmms-eval model is already patched; pass it unpatched")
        patch(self._model, config)
        try:
            for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
                outputs.extend(self._generate_batch(chunk))
                bar.update(len(chunk))
        finally:
            unpatch(self._model)
            bar.close()
        if self._device.type == "cuda":
            self.peak_memory_bytes = max(self.peak_memory_bytes or 0, torch.cuda.max_memory_allocated(self._device))
        return collator.get_original(outputs)

    # -- one batch --------------------------------------------------------------------------------------------
    def _generate_batch(self, chunk) -> list[str]:
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        contexts, all_gen_kwargs, doc_to_visuals, doc_ids, tasks, splits = zip(*chunk)
        visuals = [
            list(fn(self.task_dict[t][s][d]) or []) for fn, t, s, d in zip(doc_to_visuals, tasks, splits, doc_ids)
        ]
        visuals = [[self._load_video(x) if is_video_file(x) else x for x in v] for v in visuals]
        texts = [self._prompt(ctx, v) for ctx, v in zip(contexts, visuals)]
        images = [im for v in visuals for im in v if not is_video(im)]
        videos = [im for v in visuals for im in v if is_video(im)]
        processor = self.processor
        if self.downsample is not None and videos:
            raise ValueError(
                f"method {DOWNSAMPLE!r} shrinks images only; task {tasks[0]!r} gives videos (run the video-capable "
                "methods on it instead)"
            )
        if self.downsample is not None and images:
            images, processor = get_adapter(self._model).downsample_inputs(processor, images, self.downsample)
        media = {"images": images or None} | ({"videos": videos} if videos else {})
        inputs = processor(text=texts, **media, padding=True, return_tensors="pt")
        inputs = inputs.to(self._device)
        for key, value in inputs.items():
            if torch.is_tensor(value) and value.is_floating_point():
                inputs[key] = value.to(self._model.dtype)
        gen_kwargs, until = self._gen_kwargs(all_gen_kwargs[0])

        if not getattr(self._model, _WARM, False):  # the first generate of a model pays one-off costs: untimed
            set_instructions(self._model, list(contexts))
            with torch.inference_mode():
                self._model.generate(**inputs, **gen_kwargs)
            setattr(self._model, _WARM, True)
        previous = stats(self._model)
        prefill_end: list[float] = []

        def first_forward(module, args, output):
            if not prefill_end:
                _sync(self._device)
                prefill_end.append(time.perf_counter())

        handle = self._model.register_forward_hook(first_forward)
        try:
            set_instructions(self._model, list(contexts))  # the task's text: cdpruner text="clip" reads it
            _sync(self._device)
            start = time.perf_counter()
            with torch.inference_mode():
                out = self._model.generate(**inputs, **gen_kwargs)
            _sync(self._device)
            total_s = time.perf_counter() - start
        finally:
            handle.remove()

        rows = len(texts)
        prompt_len = inputs["input_ids"].shape[1]
        new_ids = out[:, prompt_len:]
        answers = [
            self._stop(t, until) for t in self.processor.tokenizer.batch_decode(new_ids, skip_special_tokens=True)
        ]
        real_lens = inputs["attention_mask"].sum(1).tolist()
        st = stats(self._model)
        num_layers = self._model.config.get_text_config().num_hidden_layers
        if st is previous:  # no image in this batch: nothing went through the pruning path
            n_in = n_kept = n_nominal = [0] * rows
            batch_flops, select_ms = sum(flops.decoder_prefill_flops(self._model.config, n) for n in real_lens), 0.0
            lengths = [[n] * num_layers for n in real_lens]
        else:
            n_in, n_kept, n_nominal, batch_flops, select_ms = (
                st.visual_tokens_in,
                st.visual_tokens_kept,
                st.visual_tokens_nominal,
                st.prefill_flops,
                st.select_ms,
            )
            lengths = [st.sequence_lengths(i, real_lens[i], num_layers) for i in range(rows)]
        if self.downsample is not None:  # what the budget names: N tokens per image of the request
            n_nominal = [self.downsample * len(v) for v in visuals]
        prefill_ms = (prefill_end[0] - start) * 1e3
        pad = self.pad_token_id
        for i in range(rows):
            kv = flops.kv_cache_bytes(self._model.config, lengths[i], dtype=self._model.dtype)
            new_tokens = int((new_ids[i] != pad).sum()) if pad is not None else new_ids.shape[1]
            record = RequestRecord(
                task=tasks[i],
                doc_id=int(doc_ids[i]),
                batch_size=rows,
                visual_tokens_in=int(n_in[i]),
                visual_tokens_kept=int(n_kept[i]),
                prefill_tflops=batch_flops / rows / 1e12,
                prefill_ms=prefill_ms / rows,
                select_ms=select_ms / rows,
                kv_cache_mb=kv / 2**20,
                new_tokens=new_tokens,
                visual_tokens_nominal=int(n_nominal[i]),
            )
            self.records.append(record)
            log_metrics(
                total_elapsed_time=total_s / rows,
                total_gen_tokens=new_tokens,
                avg_speed=new_tokens * rows / total_s if total_s > 0 else 0.0,
                additional_metrics={
                    "prefill_ms": record.prefill_ms,
                    "visual_tokens_kept": record.visual_tokens_kept,
                    "prefill_tflops": record.prefill_tflops,
                    "kv_cache_mb": record.kv_cache_mb,
                },
            )
            self.cache_hook.add_partial("generate_until", (contexts[i], all_gen_kwargs[i]), answers[i])
        return answers

    def _load_video(self, path) -> Any:
        """A video file's frames (``uint8 [T, H, W, 3]``), ``num_frames`` of them sampled uniformly (all when
        None), decoded by transformers' ``load_video`` (PyAV)."""
        from transformers.video_utils import load_video

        video, _ = load_video(str(path), num_frames=self.num_frames)
        return video

    def _prompt(self, context: str, visuals: list) -> str:
        content = [{"type": "video" if is_video(v) else "image"} for v in visuals] + [{"type": "text", "text": context}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    def _gen_kwargs(self, task_kwargs: dict | None) -> tuple[dict, list[str]]:
        task_kwargs = dict(task_kwargs or {})
        ignored = sorted(set(task_kwargs) - set(_GEN_KEYS) - self._warned_keys)
        if ignored:
            from loguru import logger

            logger.warning(f"vtprune model: ignoring generation kwargs {ignored} of the task")
            self._warned_keys.update(ignored)
        until = task_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(task_kwargs.get("temperature") or 0.0)
        do_sample = bool(task_kwargs.get("do_sample", False)) and temperature > 0
        out = {
            "max_new_tokens": int(task_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
            "num_beams": int(task_kwargs.get("num_beams") or 1),
            "do_sample": do_sample,
            "pad_token_id": self.pad_token_id,
        }
        if do_sample:
            out["temperature"] = temperature
            if task_kwargs.get("top_p") is not None:
                out["top_p"] = float(task_kwargs["top_p"])
        return out, until

    @staticmethod
    def _stop(text: str, until: list[str]) -> str:
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text.strip()


def is_video(visual) -> bool:
    """Whether a visual returned by a task's ``doc_to_visual`` is a video: an array (numpy or torch) of frames
    ``[T, H, W, C]`` or ``[T, C, H, W]``, or a list / tuple of frames (PIL images or 3-D arrays). A PIL image or a
    3-D array is an image. Videos go to the processor's ``videos=`` and the prompt's ``{"type": "video"}``."""
    if isinstance(visual, (list, tuple)):
        return len(visual) > 0
    return getattr(visual, "ndim", None) == 4


#: file name endings of the video files lmms-eval video tasks give (``doc_to_visual`` returns their paths)
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".flv", ".mpeg", ".mpg")


def is_video_file(visual) -> bool:
    """Whether a visual is the path of a video file (a ``str`` / ``Path`` ending in :data:`VIDEO_SUFFIXES`)."""
    from pathlib import PurePath

    return isinstance(visual, (str, PurePath)) and str(visual).lower().endswith(VIDEO_SUFFIXES)


def check_device(device: str | None) -> None:
    """``ValueError`` unless ``device`` (None: chosen later) is a torch device this machine has, before any weight
    loads."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device ({err}); e.g. cpu, cuda, cuda:1") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r}: this machine has no CUDA device (torch.cuda.is_available() is False); "
            "use device: cpu, or leave device out (cuda when available, else cpu)"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available on this machine; use device: cpu")


def load_pretrained(
    pretrained: str,
    device: str = "cpu",
    dtype: str | torch.dtype = "auto",
    device_map=None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    revision=None,
):
    """(model, processor) of a local path or hub id, in eval mode on ``device`` (or spread by ``device_map``)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if not device_map:
        check_device(device)
    if isinstance(dtype, str) and dtype != "auto":
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype must be 'auto' or a torch dtype name (float16, bfloat16, float32), got {dtype!r}")
        dtype = resolved
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map:
        kwargs["device_map"] = device_map
    model = AutoModelForImageTextToText.from_pretrained(pretrained, **kwargs)
    if not device_map:
        model.to(device)
    processor = AutoProcessor.from_pretrained(
        pretrained, trust_remote_code=trust_remote_code, **({"revision": revision} if revision else {})
    )
    return model.eval(), processor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
