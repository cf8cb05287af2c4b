"""One key=value line per decision, cheap enough for every question.

A line per question through ``logging`` costs a LogRecord, a format and a write-and-flush
each time. When the daemon logs to stderr (journald under systemd), lines are instead
formatted once, collected, and written together every ``FLUSH_INTERVAL`` (20 ms), in exactly
the format the logging handler would have used. With any
other target (syslog, tests' caplog) they go through ``logging`` as usual.

Untrusted fields (sender, recipient, HELO) are written with ``repr``: quotes, backslash
escapes, never a raw CR/LF, so a hostile value cannot forge a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Final, TextIO

from .addresses import ip_text
from .model import Query, Stage, Verdict

logger = logging.getLogger("policyd.decision")

#: Lines are written at most this long after their decision, all pending ones in one write
#: (one write per loop turn cost ~16 % of the throughput at 16 askers; bench/variants.py).
#: Their timestamp is the write's. A crash loses at most this window of log lines.
FLUSH_INTERVAL: Final = 0.02
#: Same shape as daemon.LOG_FORMAT's asctime ("2026-11-25 21:00:00,123").
_TIME_FORMAT: Final = "%Y-%m-%d %H:%M:%S"


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


class DecisionLog:
    """Writes decision lines; batched to ``stream`` when one is set, else via logging."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._pending: list[str] = []

    def record(self, query: Query, verdict: Verdict) -> None:
        if not logger.isEnabledFor(logging.INFO):
            return
        line = decision_line(query, verdict)
        if self.stream is None:
            logger.info("%s", line)
            return
        if not self._pending:
            asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self.flush)
        self._pending.append(line)

    def flush(self) -> None:
        """Write what is pending (``FLUSH_INTERVAL`` after the first line, and at shutdown)."""
        if not self._pending or self.stream is None:
            return
        lines, self._pending = self._pending, []
        now = time.time()
        stamp = f"{time.strftime(_TIME_FORMAT, time.localtime(now))},{int(now % 1 * 1000):03d}"
        prefix = f"{stamp} INFO {logger.name}: "
        # stderr closed or full: never take the daemon down for a log line.
        with contextlib.suppress(OSError, ValueError):
            self.stream.write("".join(f"{prefix}{line}\n" for line in lines))
            self.stream.flush()
