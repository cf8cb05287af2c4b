"""The embedded store's file under attack: the disk fills up and is freed again, the file
system turns read-only under the daemon, the database is corrupt at start or in a page.

Expected (issue #16): once a write has failed, every question is answered the configured
fallback (``ok fallback …`` by default) within the deadline until a write succeeds again;
``policyd_store_errors_total`` counts the failures; one ERROR line per state change, never
one per question; what was committed before the fault (whitelists, passed triplets) is
still there afterwards. A database that cannot be opened stops the start with one clear
line naming it and saying to move it aside (Exim then takes its FAIL branch: fail-open),
never a traceback.

The disk cases mount file systems (a small tmpfs; an ext4 image on a loop device): they
need root and FAIL saying so without it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.policyd_process import DaemonFactory, DaemonProcess, admin

from .conftest import (
    LoadFactory,
    log_lines,
    metric_total,
    mounted_tmpfs,
    policy,
    require_root,
)
from .load import (
    FALLBACK_PREFIX,
    GREYLISTED,
    PASSED,
    WHITELISTED,
    Sample,
    ask,
    assert_bounded,
    assert_every_question_answered,
    assert_no_traceback,
    new_triplet,
    running,
)

#: From the moment the disk fails, a write fails within this (the group commit runs every
#: 5 ms, the WAL checkpoint every second).
FAILING_WINDOW = 1.5
FAULT_SECONDS = 3.0
RECOVERY_BUDGET = 5.0
#: SQLite's default page size (the daemon does not change it).
PAGE_SIZE = 4096


def from_store(sample: Sample) -> bool:
    return sample.answer.startswith(GREYLISTED) or sample.answer == PASSED


def sqlite_daemon(daemon_factory: DaemonFactory, database: Path) -> DaemonProcess:
    daemon = daemon_factory(**policy(store={"url": f"sqlite://{database}"}))
    daemon.start()
    return daemon


def assert_fallback_while_failing(load_samples: list[Sample]) -> None:
    decided = [s for s in load_samples if s.answer != WHITELISTED]
    assert decided, "no question while the store was failing"
    wrong = [s for s in decided if not s.answer.startswith(FALLBACK_PREFIX)]
    assert not wrong, f"{len(wrong)} of {len(decided)} not the fallback; first {wrong[0]}"


def assert_one_error_line(daemon: DaemonProcess) -> None:
    errors = log_lines(daemon.stderr(), " ERROR ")
    assert len(errors) == 1, f"{len(errors)} ERROR lines: {errors[:3]}"


def fill(path: Path) -> None:
    """Write ``path`` until the file system is full."""
    chunk = b"\0" * (1 << 20)
    with open(path, "wb") as filler:
        for _ in range(10_000):  # far more MiB than any disk these tests mount
            try:
                filler.write(chunk)
                filler.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return
    raise AssertionError("the disk never filled up")


def test_disk_full_then_freed(
    daemon_factory: DaemonFactory, load_on: LoadFactory, tmp_path: Path
) -> None:
    with mounted_tmpfs(tmp_path / "disk", "32m") as disk:
        database = disk / "state.sqlite3"
        daemon = sqlite_daemon(daemon_factory, database)
        with running(load_on(daemon, wal=disk / "state.sqlite3-wal")) as load:
            load.wait_for(from_store, "by the store", RECOVERY_BUDGET)
            before = new_triplet(80_000, "full", "f1")
            assert ask(daemon.socket, before).answer.startswith(GREYLISTED)
            time.sleep(1.0)
            fill(disk / "filler")
            full = time.monotonic()
            time.sleep(FAULT_SECONDS)
            (disk / "filler").unlink()
            freed = time.monotonic()
            load.wait_for(from_store, "by the store once space is free", RECOVERY_BUDGET)
            assert ask(daemon.socket, new_triplet(80_000, "full", "f2")).answer == PASSED
            after = ask(daemon.socket, new_triplet(80_001, "full", "f3")).answer
            assert after.startswith(GREYLISTED)

        assert_every_question_answered(load.samples)
        assert_bounded(load)
        assert_fallback_while_failing(load.between(full + FAILING_WINDOW, freed))
        assert metric_total(daemon, "policyd_store_errors_total") > 0
        assert_one_error_line(daemon)
        assert_no_traceback(daemon.stderr())
        daemon.kill()


@contextlib.contextmanager
def ext4_image(path: Path) -> Iterator[tuple[Path, str]]:
    """A 16 MiB ext4 file system in a file, loop-mounted with ``errors=remount-ro`` at
    ``path``/mnt; yields the mount point and the loop device's name (for /sys/fs/ext4)."""
    require_root("mounting a loop device")
    image, mount_point = path / "ext4.img", path / "mnt"
    mount_point.mkdir(parents=True)
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    options = "loop,errors=remount-ro"
    subprocess.run(["mount", "-o", options, str(image), str(mount_point)], check=True)
    try:
        source = subprocess.run(
            ["findmnt", "-no", "SOURCE", str(mount_point)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        yield mount_point, os.path.basename(source)
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=False)


def test_file_system_turns_read_only(
    daemon_factory: DaemonFactory, load_on: LoadFactory, tmp_path: Path
) -> None:
    """The kernel remounts the file system read-only after an I/O error (ext4
    ``errors=remount-ro``, triggered through /sys/fs/ext4/DEV/trigger_fs_error): a remount
    by hand is refused while the daemon holds the database open for writing."""
    with ext4_image(tmp_path) as (mount_point, device):
        daemon = sqlite_daemon(daemon_factory, mount_point / "state.sqlite3")
        admin_socket = str(daemon.directory / "admin.sock")
        with running(load_on(daemon)) as load:
            load.wait_for(from_store, "by the store", RECOVERY_BUDGET)
            admin(
                admin_socket, {"cmd": "whitelist.add", "kind": "client", "value": "203.0.113.0/24"}
            )
            trigger = Path("/sys/fs/ext4") / device / "trigger_fs_error"
            trigger.write_text("policyd fault test\n")
            broken = time.monotonic()
            time.sleep(FAULT_SECONDS)

        assert_every_question_answered(load.samples)
        assert_bounded(load)
        assert_fallback_while_failing(load.between(broken + FAILING_WINDOW))
        assert metric_total(daemon, "policyd_store_errors_total") > 0
        # Whitelists keep working from memory while the store is read-only.
        assert (
            ask(
                daemon.socket, new_triplet(1, "ro").replace(b"ip=10.0.1.2", b"ip=203.0.113.5")
            ).answer
            == b"ok whitelist-client"
        )
        assert_one_error_line(daemon)
        assert_no_traceback(daemon.stderr())
        daemon.kill()


def corrupt_header(database: Path) -> None:
    """A file that starts like a database and then holds noise."""
    database.write_bytes(b"SQLite format 3\0" + os.urandom(PAGE_SIZE * 2))


def truncated(database: Path) -> None:
    database.write_bytes(database.read_bytes()[: PAGE_SIZE + 100])


def corrupt_pages(database: Path) -> None:
    """Noise in every page but the header and the schema's: the tables' b-trees."""
    pages = database.stat().st_size // PAGE_SIZE
    assert pages > 4, "too few pages to damage"
    with open(database, "r+b") as f:
        for page in range(2, pages):
            f.seek(page * PAGE_SIZE + 8)
            f.write(os.urandom(64))


def fill_some_state(daemon: DaemonProcess, load_on: LoadFactory) -> None:
    with running(load_on(daemon, tag="old")):
        time.sleep(2.0)


@pytest.mark.parametrize(
    "damage", [corrupt_header, truncated, corrupt_pages], ids=["header", "truncated", "pages"]
)
def test_corrupt_at_start_is_one_clear_line(
    daemon_factory: DaemonFactory, load_on: LoadFactory, damage: Callable[[Path], None]
) -> None:
    daemon = daemon_factory(**policy())
    daemon.start()
    fill_some_state(daemon, load_on)
    assert daemon.stop() == 0
    database = daemon.directory / "state.sqlite3"
    damage(database)
    daemon.launch()
    assert daemon.wait() != 0
    log = daemon.log_since_start()
    assert_no_traceback(log)
    named = log_lines(log, str(database), "move it aside")
    assert len(named) == 1, log


def test_corrupt_pages_under_a_running_daemon(
    daemon_factory: DaemonFactory, load_on: LoadFactory
) -> None:
    """Pages of the tables overwritten in the file while the daemon runs on it: whatever it
    meets, each question is answered in time with a decision or the fallback."""
    daemon = daemon_factory(**policy())
    daemon.start()
    database = daemon.directory / "state.sqlite3"
    with running(load_on(daemon)) as load:
        time.sleep(2.0)
        corrupt_pages(database)
        time.sleep(FAULT_SECONDS)

    assert_every_question_answered(load.samples)
    assert_bounded(load)
    log = daemon.stderr()
    assert_no_traceback(log)
    errors = log_lines(log, " ERROR ")
    assert len(errors) <= 2, f"{len(errors)} ERROR lines (one per state change): {errors[:3]}"
    daemon.kill()
