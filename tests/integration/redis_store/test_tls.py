"""TLS to every topology: ``rediss+sentinel://`` (the sentinel, the master and its replica
listen over TLS only) and ``rediss+cluster://`` (three masters, TLS on the client port and
the cluster bus). Greylisting works through each, and a store that does not trust the
private CA cannot connect (so TLS, not a plain fallback, carried the answers)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import contract.test_greylist_store as greylist_contract
import pytest
from support.policyd_process import wait_until
from support.redis_server import RedisServer, TLSFiles, make_certificates

from policyd.stores import StoreUnavailable

from .conftest import RedisLab, StoreOpener

pytestmark = pytest.mark.redis

SERVICE = "policyd-tls"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_certificates(tmp_path_factory.mktemp("tls"))


async def greylists(open_redis_store: StoreOpener, url: str, ca: Path) -> None:
    """The contract suite's greylisting scenario (new, early, passed, known) through it."""
    await greylist_contract.test_new_early_passed_known(
        await open_redis_store(url, tls_ca_file=str(ca))
    )


async def test_sentinel_over_tls(
    redis_lab: RedisLab, open_redis_store: StoreOpener, certificates: TLSFiles
) -> None:
    master = redis_lab.server("master", tls=certificates)
    redis_lab.replica(master, tls=certificates)
    sentinel = redis_lab.sentinel(master, SERVICE, tls=certificates)
    with sentinel.client() as client:
        wait_until(
            lambda: len(client.sentinel_slaves(SERVICE)) == 1,
            "replica known to sentinel",
            timeout=10.0,
        )
    url = f"rediss+sentinel://127.0.0.1:{sentinel.port}/{SERVICE}"
    await greylists(open_redis_store, url, certificates.ca)
    with pytest.raises(StoreUnavailable):  # the sentinel is not trusted without the CA
        await open_redis_store(url, timeout="500ms")
    plain = f"redis+sentinel://127.0.0.1:{sentinel.port}/{SERVICE}"
    with pytest.raises(StoreUnavailable):  # nor answered without TLS
        await open_redis_store(plain, timeout="500ms")


@pytest.fixture(scope="module")
def tls_cluster(module_redis_lab: RedisLab, certificates: TLSFiles) -> Iterator[list[RedisServer]]:
    yield module_redis_lab.cluster(3, tls=certificates)


async def test_cluster_over_tls(
    tls_cluster: list[RedisServer], open_redis_store: StoreOpener, certificates: TLSFiles
) -> None:
    url = "rediss+cluster://" + ",".join(node.address for node in tls_cluster)
    await greylists(open_redis_store, url, certificates.ca)
    with pytest.raises(StoreUnavailable):
        await open_redis_store(url, timeout="500ms")
