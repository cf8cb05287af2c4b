"""Warnings that can repeat at load, rate limited: one line per kind per interval.

A held-open connection, an over-long request or a failing check can happen thousands of
times a second; a line for each filled 46k lines in 40 s under an idle-connection attack.
``LogLimiter`` writes the first line of a kind, counts the next ones for ``interval``
seconds, and adds the count to the next line it writes ("… (1,234 more in the last 10 s)").
A kind is the message's format string, a constant of the code: never data from a client,
so the table of kinds stays as small as the number of call sites.

Counts still waiting when the warnings stop are written by ``flush`` (the daemon's
housekeeping and shutdown call it), so none is lost. Metrics count every event.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

#: One line per kind at most this often (seconds).
INTERVAL: Final = 10.0


@dataclass(slots=True)
class _Window:
    started: float
    logger: logging.Logger
    level: int
    args: tuple[object, ...]
    suppressed: int = 0


class LogLimiter:
    """Rate-limited logging, one window per format string."""

    def __init__(
        self, interval: float = INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self.clock = clock
        self._windows: dict[str, _Window] = {}

    def warning(self, log: logging.Logger, msg: str, *args: object) -> bool:
        return self.log(log, logging.WARNING, msg, *args, stacklevel=3)

    def error(self, log: logging.Logger, msg: str, *args: object) -> bool:
        return self.log(log, logging.ERROR, msg, *args, stacklevel=3)

    def exception(self, log: logging.Logger, msg: str, *args: object) -> bool:
        """ERROR with the current exception's traceback (only on the lines written)."""
        return self.log(log, logging.ERROR, msg, *args, exc_info=True, stacklevel=3)

    def log(
        self,
        log: logging.Logger,
        level: int,
        msg: str,
        *args: object,
        exc_info: bool = False,
        stacklevel: int = 2,
    ) -> bool:
        """Write the line unless one of its kind was written less than ``interval`` ago;
        True when it was written. ``stacklevel`` as in logging: the record names the line
        that called us, not this module."""
        if not log.isEnabledFor(level):
            return False
        now = self.clock()
        window = self._windows.get(msg)
        if window is not None and now - window.started < self.interval:
            window.suppressed += 1
            window.args = args
            return False
        if window is not None and window.suppressed:
            more = _more(window, now)
            log.log(level, msg + _MORE, *args, *more, exc_info=exc_info, stacklevel=stacklevel)
        else:
            log.log(level, msg, *args, exc_info=exc_info, stacklevel=stacklevel)
        self._windows[msg] = _Window(now, log, level, args)
        return True

    def flush(self, *, all_windows: bool = False) -> int:
        """Write the counts of windows that have ended (or of every window, at shutdown);
        the number of lines written."""
        now = self.clock()
        written = 0
        for msg, window in list(self._windows.items()):
            if not all_windows and now - window.started < self.interval:
                continue
            if window.suppressed:
                # The last suppressed line stands for the others; it is one of them.
                window.suppressed -= 1
                if window.suppressed:
                    window.logger.log(window.level, msg + _MORE, *window.args, *_more(window, now))
                else:
                    window.logger.log(window.level, msg, *window.args)
                written += 1
            del self._windows[msg]
        return written


_MORE: Final = " (%s more in the last %.0f s)"


def _more(window: _Window, now: float) -> tuple[str, float]:
    return f"{window.suppressed:,}", max(now - window.started, 0.0)
