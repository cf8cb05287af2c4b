"""Unix sockets and file descriptors the listeners need: shared by the query and admin
sockets, so both refuse to steal a live socket the same way."""

from __future__ import annotations

import contextlib
import logging
import resource
import socket
import stat
from pathlib import Path

logger = logging.getLogger(__name__)


def remove_stale_socket(path: Path) -> None:
    """Make way to bind a Unix socket at ``path`` (query and admin sockets alike).

    Another daemon answering there is a configuration error, not a file to steal: OSError
    naming the path. A stale socket file from a crash is removed; any other file is left
    for bind() to refuse."""
    try:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            return
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    finally:
        probe.close()
    raise OSError(f"{path}: another process is already listening there")


def raise_file_limit(wanted: int) -> None:
    """Raise the soft limit on open files towards ``wanted`` (at most the hard limit).

    A shell's soft limit is often 1024, below max_connections × HARD_CONNECTION_FACTOR:
    accept() would then fail with EMFILE and asyncio stops accepting for a second
    (the systemd unit sets LimitNOFILE itself)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        logger.warning(
            "open files limited to %d, below the %d that max_connections needs", target, wanted
        )
