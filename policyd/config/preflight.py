"""Checks of a valid config against this machine and against Exim, run by ``--check-config``,
at start and at reload, so that all three agree.

``config.load`` refuses what is wrong in the file itself. What only the machine can tell (a
group that does not exist, a database that is not SQLite, a directory that cannot be
written, a socket path too long for ``sun_path``) and what is allowed but harms the mail
(a deadline past Exim's timeout) is found here, in one place, without changing anything:
nothing is created, no file is written. Every problem is one line that starts with the key
and names the file.
"""

from __future__ import annotations

import grp
import os
import re
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..sockets import directory_fix, effective_user
from ..stale import EXIM_TIMEOUT
from ..stores.keys import MIN_SECRET_BYTES, KeyHasher
from ..stores.sqlite import SCHEMA, SCHEMA_VERSION, path_from_url
from .schema import Config

#: The longest RCPT question the shipped fragments send (exim-snippets/rcpt.acl, and
#: outbound.acl's with ``relay=1``) with every field at its limit: IPv6 address in full
#: (39), port (5), host name and HELO of 255 octets, sender, recipient and authenticated id
#: of 254 (the RFC 5321 §4.5.3.1.3 path limit), each base64-encoded (340), ids
#: ``$pid-$tod_epoch_l`` (24), a 5-digit recipient count, ``skipdata=1``, ``t=$tod_epoch_l``
#: (16). tests/unit/test_config_check.py rebuilds it from the fragments.
FRAGMENT_RCPT_REQUEST_BYTES: Final = 1922
#: sockaddr_un.sun_path is 108 bytes on Linux, the path plus its NUL (unix(7)).
SUN_PATH_MAX: Final = 107
#: The first 16 bytes of every SQLite 3 database file (sqlite.org/fileformat.html §1.3).
SQLITE_MAGIC: Final = b"SQLite format 3\x00"

_STORE_URL: Final = "store.url"
#: The tables of the store's schema, each probed by the read-only check.
_TABLES: Final = frozenset(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", SCHEMA))


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding: a line for the operator that starts with the dotted key."""

    text: str
    fatal: bool = True

    def __str__(self) -> str:
        return self.text


class Refused(Exception):
    """A problem found after the preflight (the database at open); ends the start."""


def preflight(config: Config) -> list[Problem]:
    """Everything wrong with ``config`` on this machine: refusals, then warnings."""
    problems = [
        *_socket_problems("server", config.server.socket, config.server.socket_group),
        *_socket_problems("admin", config.admin.socket, config.admin.socket_group),
        *_store_problems(config),
    ]
    return problems + warnings(config)


def warnings(config: Config) -> list[Problem]:
    """Allowed values that are likely to hurt: the daemon starts, the operator is told."""
    found: list[Problem] = []
    deadline = config.server.deadline
    if deadline >= EXIM_TIMEOUT:
        found.append(
            Problem(
                f"server.deadline: {deadline:g}s is not shorter than the {EXIM_TIMEOUT:g}s "
                "readsocket timeout of the shipped Exim fragments (POLICYD_TIMEOUT): Exim "
                "gives up first and the fallback answer is never heard",
                fatal=False,
            )
        )
    grey = config.greylist
    if grey.max_age < grey.delay:
        found.append(
            Problem(
                f"greylist.max_age: {grey.max_age:g}s is shorter than greylist.delay "
                f"({grey.delay:g}s): a sender that passed is forgotten sooner than the delay, "
                "so its next mail is likely greylisted again",
                fatal=False,
            )
        )
    if config.server.max_request_bytes < FRAGMENT_RCPT_REQUEST_BYTES:
        found.append(
            Problem(
                f"server.max_request_bytes: {config.server.max_request_bytes} is below the "
                f"{FRAGMENT_RCPT_REQUEST_BYTES} bytes a full RCPT question of the shipped "
                "fragments can take: long addresses would get the fallback answer",
                fatal=False,
            )
        )
    return found


def _user() -> str:
    """The user the checks are made for: this process's effective user."""
    name = effective_user()
    return repr(name) if name is not None else f"uid {os.geteuid()}"


def _may(path: Path, mode: int) -> bool:
    """Access for the effective user and groups (what the daemon's opens will get)."""
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


def _group_problem(key: str, name: str) -> Problem | None:
    if not name:
        return None
    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        return Problem(f"{key}: there is no group {name!r} on this machine")
    if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        return Problem(
            f"{key}: user {_user()} is not in group {name!r}, so it cannot give the socket "
            "that group: leave socket_group empty and let a setgid directory of that group "
            "(/run/policyd as packaged) or the socket unit give it, or add the user to it"
        )
    return None


def _directory_problem(key: str, path: Path, fix: str = "") -> Problem | None:
    """The directory that will hold ``path`` exists and is writable, or can be created;
    ``fix`` is added to the line when it is not."""
    parent = path.absolute().parent
    missing = parent
    while not missing.exists() and missing != missing.parent:
        missing = missing.parent
    if not missing.is_dir():
        return Problem(f"{key}: cannot create directory {parent}: {missing} is not a directory")
    if not _may(missing, os.W_OK | os.X_OK):
        verb = "write to" if missing == parent else f"create {parent} in"
        return Problem(f"{key}: user {_user()} cannot {verb} directory {missing}{fix}")
    return None


def _socket_problems(section: str, socket: str, group: str) -> list[Problem]:
    found = [p for p in [_group_problem(f"{section}.socket_group", group)] if p]
    if not socket:
        return found
    key = f"{section}.socket"
    path = Path(socket)
    if len(os.fsencode(socket)) > SUN_PATH_MAX:
        found.append(
            Problem(
                f"{key}: {socket!r} is {len(os.fsencode(socket))} bytes, longer than a Unix "
                f"socket path can be ({SUN_PATH_MAX}): choose a shorter one"
            )
        )
        return found
    try:
        mode = path.lstat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        mode = None
    except OSError as exc:
        found.append(Problem(f"{key}: cannot examine {path}: {exc.strerror}"))
        return found
    if mode is not None and not stat.S_ISSOCK(mode):
        found.append(Problem(f"{key}: {path} exists and is not a socket: move it aside"))
    elif problem := _directory_problem(
        key, path, f"; {directory_fix(path.absolute().parent, group)}"
    ):
        found.append(problem)
    return found


def _store_problems(config: Config) -> list[Problem]:
    store = config.store
    found: list[Problem] = []
    if store.url.startswith("sqlite://"):
        found.extend(_database_problems(path_from_url(store.url)))
    if store.hash_secret_file:
        try:
            hasher = KeyHasher.from_config(store)
        except OSError as exc:
            found.append(Problem(str(exc)))
        except ValueError:
            found.append(
                Problem(
                    f"store.hash_secret_file: the secret in {store.hash_secret_file} is "
                    f"shorter than {MIN_SECRET_BYTES} bytes"
                )
            )
        else:
            if hasher is None:
                found.append(
                    Problem(
                        f"store.hash_secret_file: {store.hash_secret_file} is empty: put the "
                        "site secret in it, or remove the key to store keys unhashed"
                    )
                )
    for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        name = getattr(store, key)
        if name and not _may(Path(name), os.R_OK):
            found.append(Problem(f"store.{key}: user {_user()} cannot read {name}"))
    return found


def _database_problems(path: Path) -> list[Problem]:
    """The SQLite file can be opened read-write by this user and is a database of ours."""
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        problem = _directory_problem(_STORE_URL, path)
        return [problem] if problem else []
    except OSError as exc:
        return [Problem(f"{_STORE_URL}: cannot examine {path}: {exc.strerror}")]
    if stat.S_ISDIR(info.st_mode):
        return [Problem(f"{_STORE_URL}: {path} is a directory; name the database file in it")]
    if not stat.S_ISREG(info.st_mode):
        return [Problem(f"{_STORE_URL}: {path} is not a regular file: move it aside")]
    # WAL mode: SQLite creates and writes -wal and -shm files next to the database.
    for item in (path.parent, path, *_wal_files(path)):
        wanted = os.W_OK | os.X_OK if item == path.parent else os.R_OK | os.W_OK
        if not _may(item, wanted):
            return [
                Problem(
                    f"{_STORE_URL}: {item} is not readable and writable by user {_user()}: "
                    "give it to that user (chown), or move it aside"
                )
            ]
    if detail := _not_our_database(path, info.st_size):
        return [Problem(f"{_STORE_URL}: {_not_a_database(path, detail)}")]
    return []


def _wal_files(path: Path) -> list[Path]:
    return [p for p in (Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()]


def _not_our_database(path: Path, size: int) -> str:
    """Why the file is not a usable database ("" when it is), read without writing."""
    if size == 0:
        return ""  # SQLite initialises an empty file
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(SQLITE_MAGIC))
    except OSError as exc:
        return exc.strerror or str(exc)
    if head != SQLITE_MAGIC:
        return "file is not a database"
    wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
    if wal.exists() and wal.stat().st_size > 0:
        # Pages not yet copied back live in the WAL: read through it. Read-only SQLite
        # creates a missing -shm file (owned by whoever checks): then do not look further.
        if not shm.exists():
            return ""
        mode = "mode=ro"
    else:
        mode = "mode=ro&immutable=1"  # no locks, and no -wal/-shm file is created
    uri = f"{path.absolute().as_uri()}?{mode}"
    try:
        db = sqlite3.connect(uri, uri=True)
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            present = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
            for table in sorted(present & _TABLES):  # reads each table's root page
                db.execute(f"SELECT 1 FROM {table} LIMIT 1")  # noqa: S608 fixed names
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    if version not in (0, SCHEMA_VERSION):
        return f"schema version {version}, this policyd knows {SCHEMA_VERSION}"
    return ""


def _not_a_database(path: Path, detail: str) -> str:
    return (
        f"{path} is not a usable policyd database ({detail}): move it aside "
        f"(mv {path} {path}.broken) and start again with a new, empty one"
    )


def database_refusal(url: str, exc: sqlite3.DatabaseError) -> Refused:
    """The one-line refusal for a database that failed to open at start."""
    path = path_from_url(url)
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and (
        "readonly" in text or "unable to open" in text
    ):
        return Refused(
            f"{_STORE_URL}: {path} cannot be opened for writing by user {_user()} ({text}): "
            "give it and its directory to that user, or move it aside"
        )
    return Refused(f"{_STORE_URL}: {_not_a_database(path, text)}")
