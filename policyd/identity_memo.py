"""A bounded memo keyed by object identity, for values derived from shared objects.

Verdicts and greylist timings are built once and shared by every question that needs them;
what is derived from them (answer bytes, script arguments) need not be recomputed per
question. Keying by ``id()`` avoids hashing them (a dataclass or enum hashes in Python
code). Each entry holds its object, so an ``id`` can never be reused while it is cached;
objects built per question only pass through, and the memo is emptied when full.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

_K = TypeVar("_K")
_V = TypeVar("_V")


class IdentityMemo(Generic[_K, _V]):
    """``memo(obj)`` is ``compute(obj)``, computed once per live object (at most
    ``max_entries`` kept)."""

    __slots__ = ("_compute", "_entries", "max_entries")

    def __init__(self, compute: Callable[[_K], _V], max_entries: int) -> None:
        self._compute = compute
        self._entries: dict[int, tuple[_K, _V]] = {}
        self.max_entries = max_entries

    def __call__(self, obj: _K) -> _V:
        entry = self._entries.get(id(obj))
        if entry is not None and entry[0] is obj:
            return entry[1]
        value = self._compute(obj)
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[id(obj)] = (obj, value)
        return value
