"""One key=value line per decision, cheap enough for every question.

A line per question through ``logging`` costs a LogRecord, a format and a write-and-flush
each time. When the daemon logs to stderr (journald under systemd), lines are instead
formatted once, collected, and written together every ``FLUSH_INTERVAL`` (20 ms), in exactly
the format the logging handler would have used. With any
other target (syslog, tests' caplog) they go through ``logging`` as usual.

Untrusted fields (sender, recipient, HELO) are written with ``repr``: quotes, backslash
escapes, never a raw CR/LF, so a hostile value cannot forge a log line.

Which decisions are logged at INFO is ``[server] log_decisions``; by default (``changes``)
those that change something: refusals (defers, rejects, errors) except a greylisted
triplet retried too early, and the first pass of a greylisted triplet. The others (passes of
known triplets, whitelists, early retries: most questions, and 27 MB a minute at 2,000
questions/s) are DEBUG (docs/operator-guide.md, "Logs"; bench/logvolume.py).

With ``[store] hash_secret`` the personal fields are written as the store keys them, hashed
with the same secret (policyd/stores/keys.py): client network, normalised sender and
recipient, HELO. A line can then be found for a known address (hash it with ``policyctl``,
or take the key from ``policyctl greylist show``), but the log alone names nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Final, TextIO

from .addresses import client_network, ip_text, normalise_recipient, normalise_sender
from .model import Action, Query, Stage, Verdict

if TYPE_CHECKING:
    from .stores.keys import KeyHasher

logger = logging.getLogger("policyd.decision")

#: Lines are written at most this long after their decision, all pending ones in one write
#: (one write per loop turn cost ~16 % of the throughput at 16 askers; bench/variants.py).
#: Their timestamp is the write's. A crash loses at most this window of log lines.
FLUSH_INTERVAL: Final = 0.02
#: Same shape as daemon.LOG_FORMAT's asctime ("2026-11-25 21:00:00,123").
_TIME_FORMAT: Final = "%Y-%m-%d %H:%M:%S"
#: ``[server] log_decisions``: the decisions written at INFO; the others are DEBUG.
LOG_ALL: Final = "all"
LOG_CHANGES: Final = "changes"
LOG_NONE: Final = "none"
#: Greylist reasons whose decision is the other way round from its action: a retry too
#: early refuses but changes nothing (its triplet's first defer was logged); a first pass
#: accepts and changes the triplet to known.
_GREYLIST_FLIPPED: Final = frozenset({"early-retry", "passed"})
_LEVEL_PREFIX: Final = {
    level: f"{logging.getLevelName(level)} {logger.name}: "
    for level in (logging.DEBUG, logging.INFO)
}


def decision_line(query: Query, verdict: Verdict) -> str:
    # ``_value_`` (the enum member's plain attribute) and ``ip_text()``: ``.value`` is a
    # Python descriptor, and ipaddress's ``str()`` of an IPv6 address is a Python loop.
    # At DATA the count, not the list: each recipient has its own line from RCPT (same
    # txn=), and a list post to thousands must not make a line of hundreds of KiB.
    recipients = (
        f"rcpt={query.recipient!r}" if query.stage is Stage.RCPT else f"nrcpt={query.nrcpt}"
    )
    return (
        f"decision stage={query.stage._value_} client={ip_text(query.client)} "
        f"sender={query.sender!r} "
        f"{recipients} helo={query.helo!r} txn={query.txn or '-'} "
        f"action={verdict.action._value_} check={verdict.check or '-'} "
        f"reason={verdict.reason or '-'}"
    )


class HashedFields:
    """The decision line's personal fields as the store keys them, hashed (hash_secret)."""

    def __init__(self, hasher: KeyHasher, ipv4_prefix: int, ipv6_prefix: int) -> None:
        self.hasher = hasher
        self.ipv4_prefix = ipv4_prefix
        self.ipv6_prefix = ipv6_prefix

    def _hashed(self, text: str) -> str:
        return self.hasher.segment(text) if text else "-"

    def line(self, query: Query, verdict: Verdict) -> str:
        hashed = self._hashed
        if query.stage is Stage.RCPT:
            recipient = hashed(normalise_recipient(query.recipient) if query.recipient else "")
        else:
            recipient = ",".join(hashed(normalise_recipient(r)) for r in query.recipients)
        network = client_network(query.client, self.ipv4_prefix, self.ipv6_prefix)
        return (
            f"decision stage={query.stage._value_} client={hashed(network)} "
            f"sender={hashed(normalise_sender(query.sender) if query.sender else '')} "
            f"rcpt={recipient or '-'} helo={hashed(query.helo.lower())} "
            f"txn={query.txn or '-'} action={verdict.action._value_} "
            f"check={verdict.check or '-'} reason={verdict.reason or '-'}"
        )


class DecisionLog:
    """Writes decision lines; batched to ``stream`` when one is set, else via logging."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._pending: list[str] = []
        #: Level of decisions that change nothing, and of those that do (log_decisions).
        self.levels = (logging.DEBUG, logging.INFO)
        self.hashed: HashedFields | None = None

    def configure(self, mode: str, hashed: HashedFields | None = None) -> None:
        """``mode`` is ``[server] log_decisions``; ``hashed`` set when hash_secret is."""
        changes = logging.DEBUG if mode == LOG_NONE else logging.INFO
        self.levels = (logging.INFO if mode == LOG_ALL else logging.DEBUG, changes)
        self.hashed = hashed

    def record(self, query: Query, verdict: Verdict) -> None:
        changes = verdict.action is not Action.ACCEPT
        if verdict.reason in _GREYLIST_FLIPPED and verdict.check == "greylist":
            changes = not changes
        level = self.levels[changes]
        if not logger.isEnabledFor(level):
            return
        hashed = self.hashed
        line = decision_line(query, verdict) if hashed is None else hashed.line(query, verdict)
        if self.stream is None:
            logger.log(level, "%s", line)
            return
        if not self._pending:
            asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self.flush)
        self._pending.append(_LEVEL_PREFIX[level] + line)

    def flush(self) -> None:
        """Write what is pending (``FLUSH_INTERVAL`` after the first line, and at shutdown)."""
        if not self._pending or self.stream is None:
            return
        lines, self._pending = self._pending, []
        now = time.time()
        stamp = f"{time.strftime(_TIME_FORMAT, time.localtime(now))},{int(now % 1 * 1000):03d}"
        prefix = f"{stamp} "
        # stderr closed or full: never take the daemon down for a log line.
        with contextlib.suppress(OSError, ValueError):
            self.stream.write("".join(f"{prefix}{line}\n" for line in lines))
            self.stream.flush()
