"""IdentityMemo: computed once per live object, by identity, bounded."""

from __future__ import annotations

from policyd.identity_memo import IdentityMemo


class Thing:
    """Equal to every other Thing: the memo must tell them apart by identity."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Thing)

    __hash__ = object.__hash__


def test_computed_once_per_object_and_told_apart_by_identity() -> None:
    calls: list[Thing] = []

    def compute(thing: Thing) -> int:
        calls.append(thing)
        return len(calls)

    memo: IdentityMemo[Thing, int] = IdentityMemo(compute, 8)
    a, b = Thing(), Thing()
    assert (memo(a), memo(a), memo(b), memo(b)) == (1, 1, 2, 2)
    assert calls == [a, b] and calls[0] is a and calls[1] is b


def test_bounded_and_emptied_when_full() -> None:
    memo: IdentityMemo[Thing, int] = IdentityMemo(id, 3)
    kept = [Thing() for _ in range(10)]
    for thing in kept:
        assert memo(thing) == id(thing)
    assert len(memo._entries) <= 3
