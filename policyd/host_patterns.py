"""Whitelist host patterns (``client_host_re``), matched in time linear in the host name.

Python's ``re`` backtracks: ``(a|aa)+$`` against a 31-character name took half a second per
question, and these patterns come from operators and from imported postgrey and sqlgrey
lists. So they are not run by ``re``. Each is parsed by Python's own parser (the same
syntax and error messages as before), refused if it uses what a finite automaton cannot
express (RE2 refuses the same: backreferences, lookaround, conditionals; and here also
possessive and atomic constructs, word boundaries and the MULTILINE/ASCII/LOCALE flags),
and all patterns of a whitelist are compiled into one Thompson NFA, run as a DFA that is
built as it is met. Each character of the host name then costs one dict lookup, whatever
the patterns; a DFA state not met before costs one pass over the NFA. Matching is
case-insensitive and finds a match anywhere in the name unless the pattern is anchored
(``re.search``), as it did with ``re``; ``$`` is the end of the name.

Uses ``re._parser`` (private; canary in tests/unit/test_internals.py).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

# Private modules of the standard library (no public parse tree): typeshed does not
# describe them, so they are imported by name and read as Any.
_parser: Any = importlib.import_module("re._parser")
sre: Any = importlib.import_module("re._constants")

#: NFA states of one pattern; counted repeats are expanded, so ``.{0,100}`` costs ~200.
#: A DFA state met for the first time costs a pass over these.
MAX_STATES: Final = 1_000
#: Bound of a counted repeat (``{m,n}``); a DNS label has at most 63 characters.
MAX_REPEAT: Final = 100
#: NFA states of all the patterns of one whitelist (~100 B each).
MAX_TOTAL_STATES: Final = 50_000
#: DFA states, their NFA states in all, and transitions kept; past any, the cache starts
#: afresh, so memory stays bounded (a few MiB) whatever host names clients send.
MAX_DFA_STATES: Final = 1_000
MAX_DFA_SIZE: Final = 200_000
MAX_DFA_EDGES: Final = 20_000
#: Inline flags that change nothing here: matching is case-insensitive, VERBOSE only
#: changes parsing, and a host name holds no newline for DOTALL to matter.
_HARMLESS_FLAGS: Final = re.IGNORECASE | re.VERBOSE | re.DOTALL | re.UNICODE
#: What an automaton cannot do, by the parser's opcode, in words for the error message.
_REFUSED: Final = {
    sre.GROUPREF: "backreferences (\\1) need backtracking",
    sre.GROUPREF_EXISTS: "conditional groups need backtracking",
    sre.ASSERT: "lookahead and lookbehind need backtracking",
    sre.ASSERT_NOT: "lookahead and lookbehind need backtracking",
    sre.ATOMIC_GROUP: "atomic groups (?>…) are not supported; write a plain group",
    sre.POSSESSIVE_REPEAT: "possessive quantifiers (*+, ++) are not supported; drop the +",
}

_CHAR, _SPLIT, _BEGIN, _END, _MATCH = range(5)
Predicate = Callable[[str], bool]


class PatternError(ValueError):
    """A host pattern that cannot be matched in linear time (or is not a pattern)."""


def check_host_pattern(pattern: str) -> int:
    """The automaton states ``pattern`` needs; PatternError, saying why, if it cannot be a
    host pattern."""
    nfa = _NFA()
    _compile(nfa, pattern, 0)
    return len(nfa.kind)


class _NFA:
    """States in parallel lists: kind, character predicate, successors, pattern index."""

    def __init__(self) -> None:
        self.kind: list[int] = []
        self.test: list[Predicate | None] = []
        self.out: list[list[int]] = []
        self.tag: list[int] = []
        self.limit = 0

    def add(self, kind: int, out: list[int], test: Predicate | None = None, tag: int = -1) -> int:
        if len(self.kind) >= self.limit:
            raise PatternError(f"too complex (over {MAX_STATES} automaton states)")
        self.kind.append(kind)
        self.test.append(test)
        self.out.append(out)
        self.tag.append(tag)
        return len(self.kind) - 1


def _compile(nfa: _NFA, pattern: str, tag: int) -> int:
    """Add ``pattern`` to ``nfa``; its start state."""
    try:
        parsed = _parser.parse(pattern, re.IGNORECASE)
    except re.error as exc:
        raise PatternError(f"invalid regular expression: {exc}") from None
    if parsed.state.flags & ~_HARMLESS_FLAGS:
        raise PatternError("inline flags other than (?i), (?s), (?x) are not supported")
    nfa.limit = len(nfa.kind) + MAX_STATES
    return _sequence(nfa, list(parsed), nfa.add(_MATCH, [], tag=tag))


def _sequence(nfa: _NFA, items: Sequence[tuple[Any, Any]], then: int) -> int:
    for op, arg in reversed(items):  # built back to front: each item knows its successor
        then = _item(nfa, op, arg, then)
    return then


def _item(nfa: _NFA, op: Any, arg: Any, then: int) -> int:
    if op in _REFUSED:
        raise PatternError(f"{_REFUSED[op]} (only linear-time patterns are accepted)")
    test = _char_test(op, arg)
    if test is not None:
        return nfa.add(_CHAR, [then], test)
    if op is sre.SUBPATTERN:
        _group, add_flags, del_flags, body = arg
        if del_flags or add_flags & ~_HARMLESS_FLAGS:
            raise PatternError("scoped inline flags other than (?i:…) are not supported")
        return _sequence(nfa, list(body), then)
    if op is sre.BRANCH:
        return nfa.add(_SPLIT, [_sequence(nfa, list(alt), then) for alt in arg[1]])
    if op is sre.MAX_REPEAT or op is sre.MIN_REPEAT:
        low, high, body = arg  # greedy or lazy: the same set of matches
        return _repeat(nfa, low, high, list(body), then)
    if op is sre.AT:
        return _anchor(nfa, arg, then)
    raise PatternError(f"{op} is not supported")


def _char_test(op: Any, arg: Any) -> Predicate | None:
    """The test of an item that matches one character, or None for other items."""
    if op is sre.LITERAL:
        return chr(arg).lower().__eq__
    if op is sre.NOT_LITERAL:
        return chr(arg).lower().__ne__
    if op is sre.ANY:
        return "\n".__ne__
    if op is sre.IN:
        return _char_class(arg)
    return None


def _anchor(nfa: _NFA, arg: Any, then: int) -> int:
    if arg in (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING):
        return nfa.add(_BEGIN, [then])
    if arg in (sre.AT_END, sre.AT_END_STRING):
        return nfa.add(_END, [then])
    raise PatternError("word boundaries (\\b, \\B) are not supported; anchors: ^ $ \\A \\Z")


def _repeat(nfa: _NFA, low: int, high: int, body: list[tuple[Any, Any]], then: int) -> int:
    unbounded = high == sre.MAXREPEAT
    if low > MAX_REPEAT or (not unbounded and high > MAX_REPEAT):
        raise PatternError(f"repeat counts over {MAX_REPEAT} are not supported")
    if unbounded:
        loop = nfa.add(_SPLIT, [])
        nfa.out[loop].extend([_sequence(nfa, body, loop), then])
        start = loop
    else:
        start = then
        for _ in range(high - low):  # x{0,3} is (x(x(x)?)?)?
            start = nfa.add(_SPLIT, [_sequence(nfa, body, start), then])
    for _ in range(low):
        start = _sequence(nfa, body, start)
    return start


def _char_class(items: list[tuple[Any, Any]]) -> Predicate:
    negate = bool(items) and items[0][0] is sre.NEGATE
    tests = [_class_item(op, arg) for op, arg in items if op is not sre.NEGATE]

    def within(char: str) -> bool:
        # The host name is lower-cased; [A-Z] must still match it, as re.IGNORECASE does.
        upper = char.upper()
        found = any(t(char) or t(upper) for t in tests)
        return found is not negate

    return within


def _class_item(op: Any, arg: Any) -> Predicate:
    if op is sre.LITERAL:
        char = chr(arg)
        return lambda c: c == char or c == char.lower()
    if op is sre.RANGE:
        low, high = arg
        return lambda c: low <= ord(c) <= high if len(c) == 1 else False
    if op is sre.CATEGORY:
        test = _CATEGORIES.get(arg)
        if test is not None:
            return test
    raise PatternError(f"{arg if op is sre.CATEGORY else op} in a character class is not supported")


def _word(c: str) -> bool:
    return c.isalnum() or c == "_"


_CATEGORIES: Final[dict[Any, Predicate]] = {
    sre.CATEGORY_DIGIT: str.isdecimal,
    sre.CATEGORY_NOT_DIGIT: lambda c: not c.isdecimal(),
    sre.CATEGORY_WORD: _word,
    sre.CATEGORY_NOT_WORD: lambda c: not _word(c),
    sre.CATEGORY_SPACE: str.isspace,
    sre.CATEGORY_NOT_SPACE: lambda c: not c.isspace(),
}


class _State:
    """A DFA state: the NFA states it stands for, its transitions met so far, and the
    patterns that have matched on reaching it."""

    __slots__ = ("next", "nfa_states", "tags")

    def __init__(self, nfa_states: frozenset[int], tags: frozenset[int]) -> None:
        self.nfa_states = nfa_states
        self.next: dict[str, _State] = {}
        self.tags = tags


class HostPatterns:
    """Several host patterns, matched together in one pass over the host name."""

    def __init__(self, patterns: Iterable[str]) -> None:
        """Raises PatternError for the first pattern that is refused."""
        nfa = _NFA()
        starts = [_compile(nfa, pattern, tag) for tag, pattern in enumerate(patterns)]
        if len(nfa.kind) > MAX_TOTAL_STATES:
            raise PatternError(f"host patterns need over {MAX_TOTAL_STATES} automaton states")
        nfa.limit = len(nfa.kind) + 1
        self._nfa = nfa
        self._start = nfa.add(_SPLIT, starts)
        self._reset()

    def _reset(self) -> None:
        self._states: dict[frozenset[int], _State] = {}
        self._edges = 0
        self._size = 0
        self._initial = self._state(self._closure([self._start], at_start=True))
        #: Unanchored search: a match may start at any later position too.
        self._anywhere = self._closure([self._start], at_start=False)

    def search(self, host: str) -> set[int]:
        """The indexes of the patterns that match somewhere in ``host`` (lower-cased)."""
        state = self._initial
        found = set(state.tags)
        for char in host:
            following = state.next.get(char)
            if following is None:
                following = self._step(state, char)
            state = following
            if state.tags:
                found |= state.tags
        at_end = self._closure(state.nfa_states, at_start=False, at_end=True)
        found.update(self._nfa.tag[s] for s in at_end if self._nfa.kind[s] == _MATCH)
        return found

    def _step(self, state: _State, char: str) -> _State:
        nfa = self._nfa
        moved = []
        for s in state.nfa_states:
            test = nfa.test[s]
            if test is not None and test(char):
                moved.append(nfa.out[s][0])
        full = len(self._states) >= MAX_DFA_STATES or self._size >= MAX_DFA_SIZE
        if full or self._edges >= MAX_DFA_EDGES:
            self._reset()  # ``state`` stays usable: it is only read below
        following = self._state(self._closure(moved, at_start=False) | self._anywhere)
        state.next[char] = following
        self._edges += 1
        return following

    def _state(self, nfa_states: frozenset[int]) -> _State:
        found = self._states.get(nfa_states)
        if found is None:
            kind, tag = self._nfa.kind, self._nfa.tag
            tags = frozenset(tag[s] for s in nfa_states if kind[s] == _MATCH)
            found = self._states[nfa_states] = _State(nfa_states, tags)
            self._size += len(nfa_states)
        return found

    def _closure(
        self, states: Iterable[int], *, at_start: bool, at_end: bool = False
    ) -> frozenset[int]:
        """The states reachable without reading a character; kept: those that read one,
        matches, and ends of input still to be reached."""
        kind, out = self._nfa.kind, self._nfa.out
        stack = list(states)
        seen: set[int] = set()
        kept: set[int] = set()
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            k = kind[s]
            if k == _SPLIT or (k == _BEGIN and at_start) or (k == _END and at_end):
                stack.extend(out[s])
            elif k != _BEGIN:
                kept.add(s)
        return frozenset(kept)
