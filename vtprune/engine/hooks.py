"""What one patch installed on a model instance, so that ``remove`` undoes exactly that: hook handles, instance
attributes it set, and wrapped methods (:class:`Installed`)."""

from __future__ import annotations

import functools
from collections.abc import Callable

_ABSENT = object()  # an attribute the instance did not have before ``set``


class Installed:
    """Hook handles and instance attributes installed by one patch; :meth:`remove` undoes them (in reverse)."""

    def __init__(self):
        self._handles: list = []
        self._set: list[tuple[object, str, object]] = []
        #: per id of a wrapped object, how many of its wrapped methods' host code is running (see :meth:`wrap`)
        self._in_host: dict[int, int] = {}

    def hook(self, handle) -> None:
        """Keep a hook's ``handle`` (anything with ``remove()``)."""
        self._handles.append(handle)

    def set(self, obj, name: str, value) -> None:
        """Set ``obj.name`` on the instance; ``remove`` puts back what the instance had there (or deletes it)."""
        self._set.append((obj, name, obj.__dict__.get(name, _ABSENT)))
        obj.__dict__[name] = value

    def wrap(self, obj, name: str, make: Callable) -> None:
        """Wrap ``obj.name`` on the instance with ``make(original)``, ``original`` being the method as it is now (the
        host's own, or a wrapper this patch installed before). A wrapped method that the host's own code calls while
        a wrapped method of the same object runs (Qwen3-VL's ``get_video_features`` returns
        ``self.get_image_features(...)``) goes straight to the host's method: wrappers see only the outermost call,
        each call from outside once."""
        current = obj.__dict__.get(name)
        host = getattr(current, "_vtprune_host", None)
        if host is None:  # the first wrapper of this method: below it, the host's own method, marked while it runs
            host = getattr(obj, name)
            current = self._running_host(obj, host)
        wrapper = make(current)

        @functools.wraps(wrapper)
        def outermost(*args, **kwargs):
            if self._in_host.get(id(obj)):  # called by the host's code inside a wrapped call: not a call of ours
                return host(*args, **kwargs)
            return wrapper(*args, **kwargs)

        outermost._vtprune_host = host
        self.set(obj, name, outermost)

    def _running_host(self, obj, host: Callable) -> Callable:
        """``host`` (a method of ``obj``), counting in ``_in_host`` while it runs."""

        @functools.wraps(host)
        def run(*args, **kwargs):
            self._in_host[id(obj)] = self._in_host.get(id(obj), 0) + 1
            try:
                return host(*args, **kwargs)
            finally:
                self._in_host[id(obj)] -= 1

        return run

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for obj, name, before in reversed(self._set):  # an attribute the instance had before comes back
            if before is _ABSENT:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = before
        self._handles, self._set = [], []
