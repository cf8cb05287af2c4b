"""The stores' interfaces: what the question path, the admin side and the composition root
need from a backend, and the one error a backend raises when it cannot answer now."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..checks.greylist import Client, GreylistStore, Timing, Triplet
from ..checks.ratelimit import RateLimitStore
from ..whitelist import ListStore


class StoreUnavailable(Exception):
    """The store cannot answer now (down, timing out, circuit open); use the fallback."""


class QuestionStore(GreylistStore, RateLimitStore, Protocol):
    """What answering a question needs: the dispatcher sees nothing else."""


class AdminStore(ListStore, Protocol):
    """What ``policyctl`` and the daemon's housekeeping need: read state without changing
    it, list, pass and delete, and the backend's figures. Never on the question path.

    A scan names key segments (split on ``|``): a string matches that segment exactly, None
    matches anything; each backend turns that into its own pattern syntax and escaping."""

    async def stats(self, auto_whitelist_after: int) -> dict[str, float]:
        """Figures for metrics and ``policyctl stats`` (what the backend can count cheaply)."""

    async def greylist_peek(
        self, triplet_key: str, client_key: str
    ) -> tuple[Triplet | None, Client | None]: ...

    async def ratelimit_peek(self, keys: Sequence[str]) -> list[float | None]: ...

    async def greylist_scan(
        self, parts: Sequence[str | None], limit: int
    ) -> list[tuple[str, Triplet, float]]: ...

    async def greylist_pass(self, keys: Sequence[str], now: float, timing: Timing) -> int: ...

    async def greylist_delete(self, keys: Sequence[str]) -> int: ...

    async def ratelimit_scan(
        self, parts: Sequence[str | None], limit: int
    ) -> list[tuple[str, float]]: ...

    async def ratelimit_delete(self, keys: Sequence[str]) -> int: ...


class Store(QuestionStore, Protocol):
    """One backend as the composition root holds it: the question path, its lifecycle, and
    its administrative side as a separate object."""

    @property
    def admin(self) -> AdminStore:
        """The administrative side, sharing the backend's connections."""

    async def start(self) -> None:
        """Open connections and prove the store answers (READY waits for this)."""

    async def aclose(self) -> None:
        """Flush and close; the store must not be used afterwards."""
