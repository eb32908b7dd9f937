"""How the attack reaches a method: the surrogate on its registry record (``vtprune.methods.surrogates``)."""

from __future__ import annotations

from ..methods.surrogates import Surrogate, from_signals
from ..registry import get_method

__all__ = ["Surrogate", "surrogate_for"]


def surrogate_for(method: str) -> tuple[Surrogate | None, str | None]:
    """``(surrogate, None)`` for a method the attack can reach, else ``(None, reason)``: the method's own surrogate
    (registry ``surrogate``), else the stand-in of the first signal it declares; ``unreachable`` says why not."""
    spec = get_method(method)
    if spec.unreachable:
        return None, spec.unreachable
    surrogate = spec.surrogate or from_signals(spec.signals)
    if surrogate is not None:
        return surrogate, None
    return None, (
        f"it declares no image-dependent signal a gradient can reach (signals: {sorted(spec.signals) or 'none'})"
    )
