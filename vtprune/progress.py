"""Progress bars off for a block: ``--quiet`` (``progress=False``) silences every bar, not only vtprune's own."""

from __future__ import annotations

import contextlib

__all__ = ["progress_bars"]


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """With ``enabled=False``, every tqdm bar created inside the block is disabled, whoever creates it (lmms-eval's
    context and postprocessing bars pass ``disable=`` themselves; transformers' weight loading and datasets' split
    generation go through their own tqdm subclasses): ``tqdm.std.tqdm.__init__`` forces ``disable=True`` and is
    restored on exit. With ``enabled=True`` nothing changes."""
    if enabled:
        yield
        return
    from tqdm import std

    original = std.tqdm.__dict__["__init__"]  # a partialmethod (tqdm's TQDM_* environment overrides) or a function

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        original.__get__(self, type(self))(*args, **kwargs)

    std.tqdm.__init__ = __init__
    try:
        yield
    finally:
        std.tqdm.__init__ = original
