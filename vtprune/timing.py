"""Wall-clock timing of forward passes: the one place that knows how vtprune measures latency.

* :func:`median_ms` — median of ``repeats`` timed calls of one function, after ``warmup`` untimed ones.
* :func:`interleaved_median_ms` — several variants timed in alternating rounds (each round runs every variant
  once; the order is reversed every other round), so slow drift of the machine (thermal, other processes)
  hits all variants alike. A variant may come with a context (e.g. ``vtprune.patched(model, ...)``) that is
  entered around each of its calls but outside the timed region.
* :func:`num_threads` — run a block with a given number of torch intra-op threads, restoring it afterwards.
* :func:`cpu_model` — the CPU's model name, and :func:`provenance` — the lines a benchmark report starts with.

CUDA work is synchronised before the clock is read, so GPU timings are real too.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch

from ._version import __version__

__all__ = ["median_ms", "interleaved_median_ms", "interleaved_times_ms", "num_threads", "clock", "elapsed_ms"]


def clock() -> float:
    """``time.perf_counter()`` in eager code; ``0.0`` while ``torch.compile`` traces the caller, so that the clock
    is not read inside a compiled graph (a patched model under ``torch.compile`` reports ``select_ms`` 0 for the
    compiled points: time the whole call from outside instead)."""
    if torch.compiler.is_compiling():
        return 0.0
    return time.perf_counter()


def elapsed_ms(t0: float) -> float:
    """Milliseconds since ``t0 = clock()``; 0.0 where either end was read inside a compiled graph."""
    t1 = clock()
    return (t1 - t0) * 1e3 if t0 and t1 else 0.0


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _time_once(fn: Callable[[], Any]) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return (time.perf_counter() - t0) * 1e3


def _check_counts(repeats: int, warmup: int) -> None:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")


def median_ms(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock milliseconds of ``repeats`` calls of ``fn()``, after ``warmup`` untimed calls."""
    _check_counts(repeats, warmup)
    for _ in range(warmup):
        fn()
    return statistics.median(_time_once(fn) for _ in range(repeats))


def interleaved_times_ms(
    variants: Mapping[str, Callable[[], Any]],
    repeats: int = 5,
    warmup: int = 1,
    contexts: Mapping[str, Callable[[], AbstractContextManager]] | None = None,
) -> dict[str, list[float]]:
    """All timings (ms) of every variant, measured in interleaved rounds; see :func:`interleaved_median_ms`."""
    _check_counts(repeats, warmup)
    contexts = dict(contexts or {})
    unknown = sorted(set(contexts) - set(variants))
    if unknown:
        raise ValueError(f"contexts given for unknown variants {unknown}; variants: {sorted(variants)}")
    names = list(variants)

    def ctx(name: str) -> AbstractContextManager:
        make = contexts.get(name)
        return make() if make is not None else contextlib.nullcontext()

    for name in names:
        with ctx(name):
            for _ in range(warmup):
                variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            with ctx(name):
                times[name].append(_time_once(variants[name]))
    return times


def interleaved_median_ms(
    variants: Mapping[str, Callable[[], Any]],
    repeats: int = 5,
    warmup: int = 1,
    contexts: Mapping[str, Callable[[], AbstractContextManager]] | None = None,
) -> dict[str, float]:
    """Median ms of each variant, timed in ``repeats`` interleaved rounds after ``warmup`` untimed calls each.

    ``variants``: name -> zero-argument callable. ``contexts``: optional name -> zero-argument factory of a
    context manager entered around each call of that variant (not timed), e.g.
    ``lambda: vtprune.patched(model, "cls", keep=64)``. Returns name -> median ms, in ``variants`` order.
    """
    times = interleaved_times_ms(variants, repeats, warmup, contexts)
    return {name: statistics.median(t) for name, t in times.items()}


@contextlib.contextmanager
def num_threads(n: int | None):
    """Run the block with ``torch.set_num_threads(n)`` (None: leave it), restoring the previous value."""
    if n is None:
        yield
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be an int >= 1, got {n!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else ``platform.processor()``), for benchmark reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def provenance(command: str, threads: str) -> list[str]:
    """Markdown bullet lines of a benchmark report: the command, date, library versions, threads and CPU."""
    import datetime
    import os

    import transformers

    return [
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, vtprune {__version__}, "
        f"Python {platform.python_version()}",
        f"- threads: {threads}; CPU: {cpu_model()} ({os.cpu_count()} logical CPUs visible)",
    ]
