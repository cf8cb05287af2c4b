"""The admin socket: line-delimited JSON requests from ``policyctl`` (docs/admin.md).

A Unix socket separate from Exim's (mode 0600 by default), so Exim cannot administer. Each
request line is ``{"cmd": "...", ...}``; each answer line is ``{"ok": true, "result": ...}``
or ``{"ok": false, "error": "..."}``. Bad input gets an error answer, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

from .. import __version__
from ..addresses import client_network, normalise_recipient, normalise_sender
from ..config import AdminConfig
from ..dispatch import Dispatcher
from ..metrics import rss_bytes
from ..model import Query, Stage
from ..protocol import ProtocolError, normalise_ip
from ..sockets import bind_error, prepare_directory, remove_stale_socket, set_group
from ..stores import AdminStore, StoreUnavailable
from ..whitelist import MAX_ENTRIES, ListEntry, ListError, Whitelist, normalise_entry
from .explain import explain

logger = logging.getLogger(__name__)

#: One request line at most (an import sends entries in batches well under this).
MAX_LINE: Final = 1 << 20
#: Admin connections served at once; more are accepted and wait for a slot (the admin socket
#: is reachable only by root and the policyd group).
MAX_ADMIN_CONNECTIONS: Final = 4
#: How often the shared whitelist's version is read (one tiny store read each time).
LIST_POLL_INTERVAL: Final = 0.25
#: How socket errors name the setting, e.g. "[admin] socket_group".
ADMIN_SOCKET_KEY: Final = "[admin] socket"
#: Rows one listing returns unless the request asks for fewer.
DEFAULT_LIMIT: Final = 100

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class AdminError(ValueError):
    """A request the admin socket refuses; the message goes back to policyctl."""


def _text(request: dict[str, Any], name: str, required: bool = False) -> str:
    value = request.get(name, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise AdminError(f"{name}: expected a string")
    if required and not value.strip():
        raise AdminError(f"{name}: required")
    return value.strip()


def _number(request: dict[str, Any], name: str, default: float) -> float:
    value = request.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise AdminError(f"{name}: expected a non-negative number")
    return float(value)


class Admin:
    """Command handlers over the dispatcher (policy, whitelist) and the store's
    administrative side."""

    def __init__(
        self, dispatcher: Dispatcher, store: AdminStore, clock: Callable[[], float] = time.time
    ):
        self.dispatcher = dispatcher
        self.store = store
        self.clock = clock
        self.handlers: dict[str, Handler] = {
            "ping": self.ping,
            "whitelist.add": self.whitelist_add,
            "whitelist.remove": self.whitelist_remove,
            "whitelist.list": self.whitelist_list,
            "greylist.show": self.greylist_show,
            "greylist.pass": self.greylist_pass,
            "greylist.flush": self.greylist_flush,
            "ratelimit.show": self.ratelimit_show,
            "ratelimit.reset": self.ratelimit_reset,
            "ratelimit.top": self.ratelimit_top,
            "explain": self.explain,
            "stats": self.stats,
        }

    async def handle(self, request: object) -> dict[str, Any]:
        """One request → one answer; the admin protocol's fail-safe boundary."""
        if not isinstance(request, dict):
            return {"ok": False, "error": "request must be a JSON object"}
        command = request.get("cmd")
        handler = self.handlers.get(command) if isinstance(command, str) else None
        if handler is None:
            return {"ok": False, "error": f"unknown command {command!r}"}
        try:
            return {"ok": True, "result": await handler(request)}
        except (AdminError, ListError, ProtocolError) as exc:
            return {"ok": False, "error": str(exc)}
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("admin command %r failed", command)
            return {"ok": False, "error": f"internal error: {exc.__class__.__name__}: {exc}"}

    async def reload_whitelist(self) -> Whitelist:
        """Rebuild the in-memory whitelist from the store, dropping expired entries."""
        now = self.clock()
        entries = await self.store.list_entries()
        for entry in entries:
            if not entry.live(now):
                await self.store.list_remove(entry.kind, entry.value)
        whitelist = Whitelist([e for e in entries if e.live(now)])
        self.dispatcher.whitelist = whitelist
        return whitelist

    async def watch_lists(self) -> None:
        """Reload the whitelist when another daemon sharing the store changed it (Redis:
        a version key bumped with every change). Runs until cancelled."""
        seen: str | None = None
        for _ in iter(int, 1):  # forever; cancelled at shutdown
            try:
                version = await self.store.list_version()
                if seen is not None and version != seen:
                    await self.reload_whitelist()
                    logger.info("whitelist changed elsewhere; reloaded")
                seen = version
            except StoreUnavailable:
                pass  # the store's own breaker logs the outage; keep the last whitelist
            await asyncio.sleep(LIST_POLL_INTERVAL)

    async def ping(self, _: dict[str, Any]) -> dict[str, Any]:
        return {"version": __version__, "pid": os.getpid()}

    async def whitelist_add(self, request: dict[str, Any]) -> dict[str, Any]:
        items = request.get("entries")
        if items is None:
            items = [request]
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise AdminError("entries: expected a list of objects")
        now = self.clock()
        prepared = []
        for item in items:
            kind = _text(item, "kind", required=True)
            force = item.get("force") is True
            value = normalise_entry(kind, _text(item, "value", required=True), force=force)
            ttl = _number(item, "expires_in", 0.0)
            comment = _text(item, "comment")[:200]
            prepared.append(ListEntry(kind, value, now + ttl if ttl else 0.0, comment, now))
        known = {(e.kind, e.value) for e in self.dispatcher.whitelist.entries}
        new = {(e.kind, e.value) for e in prepared} - known
        if len(known) + len(new) > MAX_ENTRIES:
            raise AdminError(f"whitelist would exceed {MAX_ENTRIES} entries")
        for entry in prepared:
            await self.store.list_add(entry)
        await self.reload_whitelist()
        logger.info(
            "whitelist: added %d entr%s", len(prepared), "y" if len(prepared) == 1 else "ies"
        )
        return {"added": [asdict(e) for e in prepared]}

    async def whitelist_remove(self, request: dict[str, Any]) -> dict[str, Any]:
        kind = _text(request, "kind", required=True)
        value = normalise_entry(kind, _text(request, "value", required=True), force=True)
        removed = await self.store.list_remove(kind, value)
        await self.reload_whitelist()
        if not removed:
            raise AdminError(f"no {kind} entry {value!r}")
        logger.info("whitelist: removed %s %r", kind, value)
        return {"removed": {"kind": kind, "value": value}}

    async def whitelist_list(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        kind = _text(request, "kind")
        whitelist = await self.reload_whitelist()
        return [asdict(e) for e in whitelist.entries if not kind or e.kind == kind]

    def _triplet_parts(self, request: dict[str, Any]) -> list[str | None]:
        config = self.dispatcher.config.greylist
        client, sender, recipient = (_text(request, n) for n in ("client", "sender", "recipient"))
        network: str | None = None
        if client:
            if "/" in client:
                network = normalise_entry("client", client, force=True)  # a filter
            else:
                network = client_network(
                    normalise_ip(client), config.ipv4_prefix, config.ipv6_prefix
                )
        return [
            network,
            normalise_sender(sender) if sender else None,
            normalise_recipient(recipient) if recipient else None,
        ]

    async def greylist_show(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        limit = int(_number(request, "limit", DEFAULT_LIMIT))
        rows = await self.store.greylist_scan(self._triplet_parts(request), limit)
        return [{"key": key, **asdict(t), "expires": expires} for key, t, expires in rows]

    async def greylist_pass(self, request: dict[str, Any]) -> dict[str, Any]:
        parts = self._triplet_parts(request)
        if all(p is None for p in parts) and request.get("all") is not True:
            raise AdminError("name a client, sender or recipient (or all=true to pass all)")
        if all(p is not None for p in parts):
            keys = ["|".join(p for p in parts if p is not None)]
        else:
            keys = [key for key, _, _ in await self.store.greylist_scan(parts, 10_000)]
        passed = await self.store.greylist_pass(keys, self.clock(), self.dispatcher.greylist.timing)
        logger.info("greylist: passed %d triplet(s) by admin request", passed)
        return {"passed": passed, "keys": keys[:DEFAULT_LIMIT]}

    async def greylist_flush(self, request: dict[str, Any]) -> dict[str, Any]:
        parts = self._triplet_parts(request)
        if all(p is None for p in parts) and request.get("all") is not True:
            raise AdminError("name a client, sender or recipient (or all=true to flush all)")
        keys = [key for key, _, _ in await self.store.greylist_scan(parts, 10_000)]
        removed = await self.store.greylist_delete(keys)
        logger.info("greylist: flushed %d triplet(s) by admin request", removed)
        return {"flushed": removed}

    def _rate_parts(self, request: dict[str, Any]) -> list[str | None]:
        rule = _text(request, "rule")
        key = _text(request, "key")
        if rule and rule not in self.dispatcher.ratelimit.rules:
            raise AdminError(f"unknown rate-limit rule {rule!r}")
        return [rule or None, *(key.split("|") if key else [None])]

    def _rate_rows(self, rows: list[tuple[str, float]], now: float) -> list[dict[str, Any]]:
        limiter = self.dispatcher.ratelimit
        out = []
        for key, tat in rows:
            rule = key.split("|", 1)[0]
            limit = limiter.limits.get(rule)
            fill = (max(0.0, tat - now) / (limit.burst * limit.interval)) if limit else None
            out.append(
                {
                    "key": key,
                    "rule": rule,
                    "tat": tat,
                    "fill": None if fill is None else round(min(fill, 1.0), 4),
                }
            )
        return out

    async def ratelimit_show(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        limit = int(_number(request, "limit", DEFAULT_LIMIT))
        rows = await self.store.ratelimit_scan(self._rate_parts(request), limit)
        return self._rate_rows(rows, self.clock())

    async def ratelimit_top(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        limit = int(_number(request, "limit", 10))
        rows = await self.store.ratelimit_scan(self._rate_parts(request), 10_000)
        ranked = sorted(self._rate_rows(rows, self.clock()), key=lambda r: -(r["fill"] or 0))
        return ranked[:limit]

    async def ratelimit_reset(self, request: dict[str, Any]) -> dict[str, Any]:
        parts = self._rate_parts(request)
        if parts[0] is None:
            raise AdminError("rule: required (the rule whose keys to reset)")
        keys = [key for key, _ in await self.store.ratelimit_scan(parts, 10_000)]
        removed = await self.store.ratelimit_delete(keys)
        logger.info("ratelimit: reset %d key(s) by admin request", removed)
        return {"reset": removed}

    async def explain(self, request: dict[str, Any]) -> dict[str, Any]:
        query = Query(
            Stage.RCPT,
            normalise_ip(_text(request, "ip", required=True)),
            helo=_text(request, "helo"),
            host=_text(request, "host"),
            sender=_text(request, "sender"),
            recipient=_text(request, "recipient", required=True),
            auth=_text(request, "auth"),
        )
        return await explain(self.dispatcher, self.store, query, self.clock())

    async def stats(self, _: dict[str, Any]) -> dict[str, Any]:
        dispatcher = self.dispatcher
        figures: dict[str, Any] = {
            "version": __version__,
            "rss_bytes": rss_bytes(),
            "whitelist_entries": len(dispatcher.whitelist),
            "transactions_remembered": len(dispatcher.txns),
            "ratelimit": {name: asdict(t) for name, t in dispatcher.ratelimit.counters.items()},
        }
        figures["store"] = await self.store.stats(dispatcher.config.greylist.auto_whitelist_after)
        return figures


class AdminServer:
    """The Unix listener for the admin protocol."""

    def __init__(self, config: AdminConfig, admin: Admin) -> None:
        self.config = config
        self.admin = admin
        self._server: asyncio.Server | None = None
        self._slots = asyncio.Semaphore(MAX_ADMIN_CONNECTIONS)

    async def start(self) -> None:
        path = Path(self.config.socket)
        prepare_directory(path, self.config.socket_group, ADMIN_SOCKET_KEY)
        # A live admin socket belongs to another daemon: taking it over (and deleting it at
        # our stop) would make the running one unreachable for policyctl.
        remove_stale_socket(path)
        # Created for its owner only, then given its group, then its mode: no window where
        # the socket is more open than asked, nor open to the group of a setgid directory
        # (/run/policyd is setgid Debian-exim, and Exim must not administer).
        old_umask = os.umask(0o777 & ~(self.config.socket_mode & 0o700))
        try:
            self._server = await asyncio.start_unix_server(self._serve, str(path), limit=MAX_LINE)
        except PermissionError as exc:
            raise bind_error(path, exc, ADMIN_SOCKET_KEY) from None
        finally:
            os.umask(old_umask)
        if self.config.socket_group:
            set_group(path, self.config.socket_group, ADMIN_SOCKET_KEY)
        os.chmod(path, self.config.socket_mode)
        logger.info("admin socket on %s", path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.config.socket)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self._slots:
            await self._converse(reader, writer)

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                except ValueError as exc:
                    answer: dict[str, Any] = {"ok": False, "error": f"invalid JSON: {exc}"}
                else:
                    answer = await self.admin.handle(request)
                writer.write(json.dumps(answer, default=str).encode() + b"\n")
                await writer.drain()
        except (ValueError, ConnectionError) as exc:  # over-long line, client gone
            logger.warning("admin connection dropped: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
