"""A read-only view of a store for ``policyctl explain``: the question path's two operations
answered from the stored state with the same pure steps, and nothing written.

The real backends read the state, run ``checks.greylist.step`` or ``checks.ratelimit.
decide_all``, and write the result (one atomic operation). This view reads the same state
through the admin interface's peeks and runs the same step, so the dispatcher run over it
decides exactly as the next real question would, without recording an attempt, starting a
clock or charging a limit. It does not see its own would-be writes: one question steps each
key at most once, so it never needs them.

What was read is kept (``greylist_reads``) so explain can show the stored state behind its
finding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..checks.greylist import Client, Step, Timing, Triplet, step
from ..checks.ratelimit import Charge, Decision, decide_all
from .base import AdminStore


@dataclass(frozen=True, slots=True)
class GreylistRead:
    """One greylist step run by the view: the keys, the state read, and the step taken."""

    triplet_key: str
    client_key: str
    triplet: Triplet | None
    client: Client | None
    step: Step


class ReadOnlyStore:
    """A ``QuestionStore`` over ``inner``'s reads; every write goes nowhere."""

    def __init__(self, inner: AdminStore) -> None:
        self.inner = inner
        self.greylist_reads: list[GreylistRead] = []

    async def start(self) -> None:
        """Nothing to open: ``inner`` is the running daemon's store."""

    async def aclose(self) -> None:
        """Nothing to close: ``inner`` belongs to the daemon."""

    async def greylist_step(
        self, triplet_key: str, client_key: str, now: float, timing: Timing, force_pass: bool
    ) -> Step:
        triplet, client = await self.inner.greylist_peek(triplet_key, client_key)
        taken = step(triplet, client, now, timing, force_pass=force_pass)
        self.greylist_reads.append(GreylistRead(triplet_key, client_key, triplet, client, taken))
        return taken

    async def ratelimit_step(self, charges: Sequence[Charge], now: float) -> list[Decision]:
        if not charges:
            return []
        states = await self.inner.ratelimit_peek([c.key for c in charges])
        decisions, _ = decide_all(states, charges, now)
        return decisions
