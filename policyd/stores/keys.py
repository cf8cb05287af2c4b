"""Optional keyed hashing of stored key material, so a dump of the store does not reveal who
mails whom (design.md §4).

Keys are ``|``-separated segments (client network, sender, recipient; rule, key parts).
Each segment is replaced by ``~`` + the first 128 bits of HMAC-SHA256(secret, segment),
base64url without padding (23 characters). Hashing per segment keeps the admin tools
working: ``policyctl greylist show --sender X`` hashes X the same way and matches that
segment. A segment that already has the hashed form is left alone, so keys read back from a
scan can be passed to delete/pass again. Rate-limit keys keep their first segment (the rule
name, which is configuration, not personal data) in clear.

Every MX host sharing a store needs the same secret; changing it starts greylisting afresh.
Runtime whitelists are not hashed: the daemon must read their values back to match them.

``HashedStore`` applies this to any backend, so the embedded store gets it too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from ..checks.greylist import KEY_SEPARATOR, Client, Step, Timing, Triplet
from ..checks.ratelimit import Charge, Decision
from ..config import StoreConfig
from ..whitelist import ListEntry
from .base import AdminStore, Store

#: Marks a hashed segment; cannot start a network, and senders/recipients contain an '@'.
HASH_MARK: Final = "~"
#: Bytes of the HMAC kept: 128 bits, collisions out of reach for any store size.
DIGEST_BYTES: Final = 16
_HASHED_RE: Final = re.compile(r"~[A-Za-z0-9_-]{22}")
#: A secret shorter than this is refused (it could be brute-forced from a dump).
MIN_SECRET_BYTES: Final = 16


class KeyHasher:
    """Hashes key segments with HMAC-SHA256 and the site secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"hash secret must be at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret

    @classmethod
    def from_config(cls, config: StoreConfig) -> KeyHasher | None:
        """The configured hasher, or None when hashing is off. Reads ``hash_secret_file``."""
        if config.hash_secret_file:
            path = Path(config.hash_secret_file)
            try:
                secret = path.read_bytes().strip()
            except OSError as exc:
                raise OSError(
                    f"store.hash_secret_file: cannot read {path}: {exc.strerror}"
                ) from None
        else:
            secret = config.hash_secret.encode()
        if not secret:
            return None
        try:
            return cls(secret)
        except ValueError as exc:
            raise ValueError(f"store.hash_secret: {exc}") from None

    def segment(self, text: str) -> str:
        if _HASHED_RE.fullmatch(text):
            return text
        digest = hmac.new(self._secret, text.encode(), hashlib.sha256).digest()[:DIGEST_BYTES]
        return HASH_MARK + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def key(self, key: str, keep: int = 0) -> str:
        """``key`` with every segment after the first ``keep`` hashed."""
        parts = key.split(KEY_SEPARATOR)
        return KEY_SEPARATOR.join(p if i < keep else self.segment(p) for i, p in enumerate(parts))

    def parts(self, parts: Sequence[str | None], keep: int = 0) -> list[str | None]:
        """Scan segments: literal ones hashed (after ``keep``), wildcards (None) kept."""
        return [p if p is None or i < keep else self.segment(p) for i, p in enumerate(parts)]


#: Rate-limit keys start with the rule name, kept in clear.
RATE_KEEP: Final = 1


class HashedStore:
    """Any store, with key material hashed on the way in (``open_store`` wraps with it)."""

    def __init__(self, inner: Store, hasher: KeyHasher) -> None:
        self.inner = inner
        self.hasher = hasher
        self.admin = HashedAdmin(inner.admin, hasher)

    async def start(self) -> None:
        await self.inner.start()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def greylist_step(
        self, triplet_key: str, client_key: str, now: float, timing: Timing, force_pass: bool
    ) -> Step:
        h = self.hasher
        return await self.inner.greylist_step(
            h.key(triplet_key), h.segment(client_key), now, timing, force_pass
        )

    async def ratelimit_step(self, charges: Sequence[Charge], now: float) -> list[Decision]:
        hashed = [
            Charge(c.rule, self.hasher.key(c.key, RATE_KEEP), c.cost, c.limit, c.dry_run)
            for c in charges
        ]
        decisions = await self.inner.ratelimit_step(hashed, now)
        return [Decision(c, d.outcome) for c, d in zip(charges, decisions, strict=True)]


class HashedAdmin:
    """The administrative side of a HashedStore: the same hashing of key material."""

    def __init__(self, inner: AdminStore, hasher: KeyHasher) -> None:
        self.inner = inner
        self.hasher = hasher

    async def greylist_peek(
        self, triplet_key: str, client_key: str
    ) -> tuple[Triplet | None, Client | None]:
        return await self.inner.greylist_peek(
            self.hasher.key(triplet_key), self.hasher.segment(client_key)
        )

    async def ratelimit_peek(self, keys: Sequence[str]) -> list[float | None]:
        return await self.inner.ratelimit_peek([self.hasher.key(k, RATE_KEEP) for k in keys])

    async def greylist_scan(
        self, parts: Sequence[str | None], limit: int
    ) -> list[tuple[str, Triplet, float]]:
        return await self.inner.greylist_scan(self.hasher.parts(parts), limit)

    async def greylist_pass(self, keys: Sequence[str], now: float, timing: Timing) -> int:
        return await self.inner.greylist_pass([self.hasher.key(k) for k in keys], now, timing)

    async def greylist_delete(self, keys: Sequence[str]) -> int:
        return await self.inner.greylist_delete([self.hasher.key(k) for k in keys])

    async def ratelimit_scan(
        self, parts: Sequence[str | None], limit: int
    ) -> list[tuple[str, float]]:
        return await self.inner.ratelimit_scan(self.hasher.parts(parts, RATE_KEEP), limit)

    async def ratelimit_delete(self, keys: Sequence[str]) -> int:
        return await self.inner.ratelimit_delete([self.hasher.key(k, RATE_KEEP) for k in keys])

    async def list_add(self, entry: ListEntry) -> None:
        await self.inner.list_add(entry)

    async def list_remove(self, kind: str, value: str) -> bool:
        return await self.inner.list_remove(kind, value)

    async def list_entries(self) -> list[ListEntry]:
        return await self.inner.list_entries()

    async def list_version(self) -> str:
        return await self.inner.list_version()

    async def stats(self, auto_whitelist_after: int) -> dict[str, float]:
        return await self.inner.stats(auto_whitelist_after)
