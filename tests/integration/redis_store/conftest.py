"""The Redis store against real Redis processes: single servers, replicas with a sentinel,
and a three-master cluster, all private to the test (``tests/support/redis_server.py``).

This directory is a package named ``redis_store``, not ``redis``: pytest would import a
``redis`` test package in place of redis-py, and a conftest outside a package would evict
the ``conftest`` module that tests/integration's modules import by name.

Needs ``redis-server`` and ``redis-cli``; without them every test here FAILS saying so.
"""

from __future__ import annotations

import signal
import sys
from base64 import b64encode
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# tests/ holds the Redis process helper shared with the contract suite.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from support.policyd_process import wait_until
from support.redis_server import (
    RedisServer,
    TLSFiles,
    create_cluster,
    free_port,
    require,
    sentinel_config,
)

from policyd.config import StoreConfig, from_mapping
from policyd.stores import Store, open_store

#: A question that takes longer than this (connect → answer → close) failed the test.
ANSWER_TIMEOUT = 5.0
#: The greylisting delay the daemons here use.
DELAY = 1.0
GREYLISTED = b"defer 451 4.7.1 "
FALLBACK = b"ok fallback store-unavailable"


@dataclass
class RedisLab:
    """Makes Redis processes under ``root``; kills every one of them (by PID) at the end."""

    root: Path
    made: list[RedisServer] = field(default_factory=list)

    def server(
        self,
        name: str = "redis",
        *,
        tcp: bool = False,
        cluster: bool = False,
        options: tuple[str, ...] = (),
        tls: TLSFiles | None = None,
    ) -> RedisServer:
        """With ``tls`` its loopback port speaks TLS only (``port`` is the TLS port)."""
        port = free_port(cluster) if tcp or cluster or tls else 0
        if tls is not None:
            options = (*tls.server_options(port), *options, "--port", "0")
        server = RedisServer(self.root / name, port, options)
        self.made.append(server)
        return server.start()

    def replica(
        self, master: RedisServer, name: str = "replica", *, tls: TLSFiles | None = None
    ) -> RedisServer:
        replica = self.server(
            name, tcp=True, options=("--replicaof", "127.0.0.1", str(master.port)), tls=tls
        )
        wait_until(
            lambda: info(replica, "replication").get("master_link_status") == "up",
            "replica in sync",
            timeout=10.0,
        )
        return replica

    def sentinel(
        self,
        master: RedisServer,
        service: str,
        name: str = "sentinel",
        *,
        tls: TLSFiles | None = None,
    ) -> RedisServer:
        directory, port = self.root / name, free_port()
        sentinel_config(directory, port, service, master, tls=tls)
        sentinel = RedisServer(directory, port, sentinel=True, tls_ca=tls.ca if tls else None)
        self.made.append(sentinel)
        return sentinel.start()

    def cluster(self, masters: int = 3, *, tls: TLSFiles | None = None) -> list[RedisServer]:
        require("redis-cli")
        tls_bus = ("--tls-cluster", "yes") if tls is not None else ()
        nodes = [
            self.server(
                f"node{i}",
                cluster=True,
                options=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(self.root / f"node{i}" / "nodes.conf"),
                    "--cluster-node-timeout",
                    "2000",
                    *tls_bus,
                ),
                tls=tls,
            )
            for i in range(masters)
        ]
        create_cluster(nodes, tls=tls)
        return nodes

    def close(self) -> None:
        for server in self.made:
            server.kill(signal.SIGKILL)


@pytest.fixture
def redis_lab(tmp_path: Path) -> Iterator[RedisLab]:
    require()
    lab = RedisLab(tmp_path / "redis")
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="module")
def module_redis_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisLab]:
    """A lab shared by a module's tests (for set-ups that cost seconds, like a cluster)."""
    require()
    lab = RedisLab(tmp_path_factory.mktemp("redis"))
    try:
        yield lab
    finally:
        lab.close()


StoreOpener = Callable[..., Awaitable[Store]]


@pytest.fixture
async def open_redis_store() -> AsyncIterator[StoreOpener]:
    """``await open_redis_store(url, timeout="100ms", ...)`` → a started store, closed at
    teardown."""
    opened: list[Store] = []

    async def make(url: str, **options: Any) -> Store:
        config = from_mapping({"store": {"url": url, **options}}, "<test>").store
        store = await open_store(config)
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.aclose()


def store_config(url: str, **options: Any) -> StoreConfig:
    return from_mapping({"store": {"url": url, **options}}, "<test>").store


def info(server: RedisServer, section: str) -> dict[str, Any]:
    with server.client() as client:
        return dict(client.info(section))


# --- talking to a daemon --------------------------------------------------------------------


def b64(text: str) -> str:
    return b64encode(text.encode()).decode()


def rcpt(ip: str, recipient: str, sender: str = "alice@example.net") -> bytes:
    """An RCPT question as exim-snippets/rcpt.acl writes it."""
    return (
        f"rcpt v=1 ip={ip} port=25 helo_b64={b64('mx.example.net')} from_b64={b64(sender)} "
        f"rcpt_b64={b64(recipient)} auth_b64= nrcpt=1\n"
    ).encode()


def daemon_policy(url: str, **greylist: Any) -> dict[str, dict[str, Any]]:
    """Sections for daemon_factory: the Redis store and greylisting with a short delay."""
    return {
        "store": {"url": url},
        "greylist": {"delay": f"{DELAY}s", "auto_whitelist_after": 2, **greylist},
    }
