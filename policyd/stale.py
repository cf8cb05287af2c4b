"""Questions Exim has already given up on: the ``t=`` key of docs/protocol.md.

A question that waited in the listen backlog (the daemon stopped, swapped out, or busy for
seconds) is still read and answered, but Exim's ``${readsocket}`` timer fired long before:
Exim applied its fail mode and moved on. Deciding such a question would log and count a
verdict that never reached the mail (a ``defer`` for a recipient Exim accepted fail-open).
The daemon cannot see how long a connection waited before ``accept()``, so the fragments
send the moment they asked (``t=$tod_epoch_l``, microseconds since the epoch), and a
question older than Exim's timeout when it is read gets the fallback instead of a decision.

Pure classification (``now`` is passed in) plus a log line that is rate-limited, because
stale questions come in bursts of hundreds when a stopped daemon resumes.
"""

from __future__ import annotations

import enum
from typing import Final

#: Exim's ``${readsocket}`` timeout in the shipped fragments: ``POLICYD_TIMEOUT = 2s`` in
#: exim-snippets/00_policyd (a test checks they agree). Exim's one timer covers connect,
#: write and read; past it Exim has used its FAIL string and nobody reads our answer.
EXIM_TIMEOUT: Final = 2.0
#: ``t=`` is ``$tod_epoch_l``: microseconds since the epoch (Exim spec, "Expansion variables").
MICROSECONDS: Final = 1_000_000
#: A ``t=`` up to this far ahead of our clock counts as "just asked": Exim and the daemon
#: read the same clock on one host, but NTP slews it and a question may be read within
#: microseconds of its asking. Further ahead, the two clocks disagree and age means nothing.
CLOCK_SKEW_ALLOWANCE: Final = 1.0
#: A ``t=`` older than this cannot be a wait in a listen backlog (Exim gave up after
#: EXIM_TIMEOUT and closed): it is a wrong unit (``$tod_epoch`` in seconds reads as 1970)
#: or a broken clock, so it is ignored rather than turning every question into a fallback.
MAX_PLAUSIBLE_AGE: Final = 86_400.0


class Age(enum.Enum):
    """How a question's ``t=`` compares with the daemon's clock when it is read."""

    #: No ``t=``, or asked less than EXIM_TIMEOUT ago: decide it.
    FRESH = "fresh"
    #: Asked more than EXIM_TIMEOUT ago: Exim has given up; answer the fallback.
    STALE = "stale"
    #: Too far in the future or the past to be a real wait: decide it, warn (rate-limited).
    IMPLAUSIBLE = "implausible"


def classify(asked_us: int, now: float, timeout: float = EXIM_TIMEOUT) -> Age:
    """The age class of a question asked at ``asked_us`` (``t=``; 0 = not sent) at ``now``
    (seconds since the epoch)."""
    if not asked_us:
        return Age.FRESH
    age = now - asked_us / MICROSECONDS
    if age > MAX_PLAUSIBLE_AGE or age < -CLOCK_SKEW_ALLOWANCE:
        return Age.IMPLAUSIBLE
    return Age.STALE if age > timeout else Age.FRESH
