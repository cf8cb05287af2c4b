"""The embedded store on a real full and a real read-only file system (a private tmpfs).

A failing write puts the store in failure: every question raises StoreUnavailable (the
dispatcher answers the fallback), one ERROR line is logged, the answered rows stay pending,
and the first write that succeeds again writes them and ends the failure by itself.
Needs root (mount); without it these tests fail saying so."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from policyd.checks.greylist import Status, Timing
from policyd.stores import StoreUnavailable
from policyd.stores.sqlite import FAILED_RETRY_INTERVAL, SQLiteStore
from policyd.whitelist import ListEntry

T = Timing(delay=1, retry_window=1000, max_age=5000, auto_whitelist_after=0)
TMPFS_SIZE = "4m"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("these tests mount a tmpfs and must run as root")
    mount = tmp_path / "fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", mount], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", mount], check=True)


def fill(directory: Path) -> Path:
    """Fill the file system to the last byte (unbuffered writes); returns the filler."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110  # the store offers no event for this
            await asyncio.sleep(0.02)


async def test_disk_full_fails_over_to_the_fallback_and_recovers(
    small_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="policyd.stores.sqlite")
    store = SQLiteStore(small_fs / "s.db", commit_interval=0.01)
    await store.start()
    try:
        await store.admin.list_add(ListEntry("ip", "192.0.2.1", 0.0, "before", 1.0))
        assert (await store.greylist_step("n|s|before", "n", 0.0, T, False)).status is Status.NEW
        await asyncio.sleep(0.1)  # committed
        filler = fill(small_fs)
        # New triplets until a write fails: answered until then, the fallback after.
        failed_at = None
        for i in range(20_000):
            try:
                await store.greylist_step(f"n|s|during{i}|{'x' * 200}", "n", 0.0, T, False)
            except StoreUnavailable as exc:
                failed_at = i
                assert "fail" in str(exc)
                break
            if i % 50 == 0:
                await asyncio.sleep(0.02)
        assert failed_at is not None, "the full disk never failed a write"
        assert store.failure is not None
        for _ in range(20):  # every later question: the fallback
            with pytest.raises(StoreUnavailable):
                await store.greylist_step("n|s|new-while-full", "n", 1.0, T, False)
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        assert "s.db" in errors[0].getMessage()

        filler.unlink()
        await wait_until(lambda: store.failure is None, within=FAILED_RETRY_INTERVAL * 5)
        assert any("succeed again" in r.getMessage() for r in caplog.records)
        # State from before the fault is intact, and the answered rows of the failing
        # window were written by the retry: those triplets pass on their retry.
        assert (await store.greylist_step("n|s|before", "n", 5.0, T, False)).status is (
            Status.PASSED
        )
        during = f"n|s|during{failed_at - 1}|{'x' * 200}"
        assert (await store.greylist_step(during, "n", 5.0, T, False)).status is Status.PASSED
        assert (await store.greylist_step("n|s|after", "n", 5.0, T, False)).status is Status.NEW
        assert [e.value for e in await store.admin.list_entries()] == ["192.0.2.1"]
    finally:
        await store.aclose()


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A small ext4 file system on a loop device, mounted ``errors=remount-ro`` (what a
    disk error does to a real server's file system), and its sysfs error trigger."""
    if os.geteuid() != 0:
        pytest.fail("these tests mount a loop device and must run as root")
    image = tmp_path / "ext4.img"
    with image.open("wb") as out:
        out.truncate(16 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True)
    mount = tmp_path / "ext4"
    mount.mkdir()
    subprocess.run(["mount", "-o", "loop,errors=remount-ro", image, mount], check=True)
    device = subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE", mount], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        yield mount, Path(f"/sys/fs/ext4/{Path(device).name}/trigger_fs_error")
    finally:
        subprocess.run(["umount", "-l", mount], check=True)


async def test_file_system_turned_read_only_fails_over(
    ext4: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """The kernel turns the file system read-only under the running store (an ext4 error
    with errors=remount-ro, triggered through sysfs): writes fail, questions get the
    fallback, one ERROR line, and admin changes say so; reads of what was there still work
    for admin listings."""
    caplog.set_level(logging.WARNING, logger="policyd.stores.sqlite")
    mount, trigger = ext4
    store = SQLiteStore(mount / "s.db", commit_interval=0.01)
    await store.start()
    try:
        await store.greylist_step("n|s|before", "n", 0.0, T, False)
        await asyncio.sleep(0.1)
        trigger.write_text("1")
        await store.greylist_step("n|s|during", "n", 0.0, T, False)  # answered, then written
        await wait_until(lambda: store.failure is not None)
        for _ in range(5):
            with pytest.raises(StoreUnavailable):
                await store.greylist_step("n|s|later", "n", 0.0, T, False)
        with pytest.raises(StoreUnavailable):
            await store.admin.list_add(ListEntry("ip", "192.0.2.1", 0.0, "", 1.0))
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        scanned = await store.admin.greylist_scan([None, None, None], 10)
        assert [key for key, _, _ in scanned] == ["n|s|before"]
    finally:
        await store.aclose()
