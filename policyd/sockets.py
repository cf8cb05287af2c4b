"""The daemon's Unix socket files (Exim's and the admin socket) and the file descriptors the
listeners need: their directory and group, with start-up errors an admin can act on, and one
refusal to steal a live socket for both.

Under systemd, ``RuntimeDirectory=policyd`` creates ``/run/policyd`` before the daemon
starts. Without it the daemon creates a missing socket directory itself when it may (mode
SOCKET_DIR_MODE, group the socket's group), and otherwise stops with one line naming the
path and the command that fixes it, instead of a bare ``Permission denied``.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import resource
import socket
import stat
from pathlib import Path
from typing import Final

logger = logging.getLogger(__name__)

#: A socket directory the daemon creates: its user may write, the socket's group (Exim's,
#: through ``[server] socket_group``) may enter, nobody else may look inside.
SOCKET_DIR_MODE: Final = 0o750


class SocketSetupError(Exception):
    """A socket cannot be set up; the message names the path and the fix. policyd exits 2."""


def effective_user() -> str | None:
    """This process's effective user's name; None for a uid without a passwd entry
    (containers)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return None


def _user() -> str:
    return effective_user() or str(os.geteuid())


def _primary_group() -> str:
    try:
        return grp.getgrgid(os.getegid()).gr_name
    except KeyError:
        return str(os.getegid())


def prepare_directory(socket: Path, group: str, key: str) -> None:
    """Make sure the socket's directory exists, creating it when this process may."""
    directory = socket.parent
    if directory.is_dir():
        return
    try:
        directory.mkdir(parents=True, mode=SOCKET_DIR_MODE)
    except FileExistsError:  # created meanwhile (a second daemon, the admin socket's)
        return
    except PermissionError:
        raise SocketSetupError(
            f"cannot create the directory {directory} of {key} {socket}: user {_user()} may "
            f"not write to {directory.parent}; {directory_fix(directory, group)}"
        ) from None
    os.chmod(directory, SOCKET_DIR_MODE)  # mkdir's mode is filtered by the umask
    if group:
        set_group(directory, group, key)


def directory_fix(directory: Path, group: str) -> str:
    """The command that makes a socket directory this process may not create."""
    return (
        f"as root run 'install -d -m {SOCKET_DIR_MODE:04o} -o {_user()} -g "
        f"{group or _primary_group()} {directory}' (again after a reboot when it is under "
        "/run; systemd's RuntimeDirectory= does it)"
    )


def bind_error(socket: Path, exc: PermissionError, key: str) -> SocketSetupError:
    """The actionable form of a PermissionError from binding ``socket``."""
    directory = socket.parent
    return SocketSetupError(
        f"cannot create {key} {socket}: user {_user()} may not write to {directory} "
        f"({exc.strerror}); as root run 'chown {_user()} {directory}', or point {key} "
        "at a directory that user owns"
    )


def set_group(path: Path, group: str, key: str) -> None:
    """Give ``path`` to ``group``; a group this process cannot use is an actionable error."""
    setting = f"{key}_group" if key.endswith("socket") else key
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise SocketSetupError(
            f"cannot give {path} to group {group!r}: no such group; create it or change {setting}"
        ) from None
    try:
        os.chown(path, -1, gid)
    except PermissionError:
        owner = _user()
        raise SocketSetupError(
            f"cannot give {path} to group {group!r} ({setting}): user {owner} is not a member; "
            f"as root run 'usermod -aG {group} {owner}' and start policyd again, or change "
            f"{setting}"
        ) from None


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
