"""What bench/run.py measures: the targets (floor, policyd, policyd-redis, the peers), how
each is started, and one measured run against one of them.

A ``Contender`` is one server with the questions in its protocol and how they are framed;
``measure`` runs the Exim-like client against it once and adds the server's CPU (and its
store's, for policyd-redis), its RSS and the machine's disk writeback during the run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peers
import servers
from loadgen import LoadResult, Requests, run_load

REDIS_TARGET = "policyd-redis"


class Contender:
    """One thing measured: a server, the questions in its protocol, how they are framed."""

    def __init__(
        self,
        name: str,
        server: servers.Server,
        requests: Requests,
        *,
        terminator: bytes | None = None,
        persistent: bool = False,
        store: servers.Server | None = None,
        settle: bool = False,
    ) -> None:
        self.name = name
        self.server = server
        self.requests = requests
        self.terminator = terminator
        self.persistent = persistent
        #: A server the target needs whose CPU is counted apart (policyd-redis: Redis).
        self.store = store
        #: Keeps its state on disk: let its writes settle after each round (run.SETTLE_S).
        self.settle = settle
        #: Where its next run starts in the workload, so that it keeps seeing new questions.
        self.index = 0

    def check_alive(self) -> None:
        for srv in (self.server, self.store):
            if srv is not None and not srv.alive():
                raise RuntimeError(f"{srv.name} died:\n{srv.log_tail()}")


def disk_written_kib() -> int:
    """Pages the kernel has written back to disk so far, machine-wide (/proc/vmstat
    ``nr_written``), in KiB."""
    with open("/proc/vmstat") as f:
        for line in f:
            key, _, value = line.partition(" ")
            if key == "nr_written":
                return int(value) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    return 0


def measure(
    target: Contender, *, concurrency: int, duration: float, warmup: float, engine: str
) -> tuple[dict[str, object], LoadResult]:
    """One run against one target: the client's figures plus the server's CPU and memory
    (and the CPU of its ``store`` server, a redis-server, when it has one)."""
    server, store = target.server, target.store
    store0 = store.cpu_seconds() if store else 0.0
    cpu0 = server.cpu_seconds()
    written0 = disk_written_kib()
    res = run_load(
        server.socket,
        target.requests,
        concurrency=concurrency,
        duration=duration,
        warmup=warmup,
        engine=engine,
        start_index=target.index,
        target=target.name,
        terminator=target.terminator,
        persistent=target.persistent,
    )
    cpu = server.cpu_seconds() - cpu0
    row = res.to_dict()
    # Whoever caused it: writeback in another target's round is that round's noise.
    row["disk_written_kib"] = disk_written_kib() - written0
    row["cpu_s"] = round(cpu, 3)
    # The CPU delta covers warm-up too, so divide by every question sent.
    row["cpu_us_per_q"] = round(cpu / res.issued * 1e6, 1) if res.issued else None
    row["memory_kib"] = server.memory_kib()
    if store is not None:
        store_cpu = store.cpu_seconds() - store0
        row["store_cpu_s"] = round(store_cpu, 3)
        row["store_cpu_us_per_q"] = round(store_cpu / res.issued * 1e6, 1) if res.issued else None
        row["store_memory_kib"] = store.memory_kib()
    return row, res


def filesystem_of(path: Path) -> str:
    """The type of the file system holding ``path`` (``ext4``, ``tmpfs``…), from the
    longest matching mount point in /proc/mounts; ``?`` when unknown."""
    best, kind = "", "?"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    resolved = str(path.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, fields[2]
    return kind


def git_revision() -> str:
    """``git describe --always --dirty`` of the tree the bench runs from."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=servers.REPO_DIR,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def start_redis_target(
    workdir: Path, requests: Requests, config_extra: str, log_level: str | None, info: dict
) -> tuple[Contender | None, list[servers.Server]]:
    """A private redis-server and a daemon using it (same config as ``policyd`` but the
    store URL); on failure a note in ``info`` and nothing started."""
    if shutil.which(servers.REDIS_SERVER) is None:
        info.update(status="skipped", note=f"skipped: {servers.REDIS_SERVER} not found")
        print(f"{REDIS_TARGET}: {info['note']}", file=sys.stderr)
        return None, []
    started: list[servers.Server] = []
    try:
        redis_srv = servers.start_redis(workdir)
        started.append(redis_srv)
        conf = servers.policyd_config(
            workdir,
            log_level=log_level,
            store_url=f"unix://{redis_srv.socket}",
            name=REDIS_TARGET,
            extra=config_extra,
        )
        started.append(servers.start_policyd(workdir, conf, name=REDIS_TARGET))
    except (RuntimeError, OSError) as exc:
        for srv in reversed(started):
            servers.stop(srv)
        info.update(status="skipped", note=f"failed to start: {str(exc)[-300:]}: skipped")
        print(f"{REDIS_TARGET}: {info['note']}", file=sys.stderr)
        return None, []
    info.update(status="measured", version=redis_srv.extra.get("version"))
    return Contender(REDIS_TARGET, started[1], requests, store=redis_srv), started


def _peer_contenders(name: str, srv: servers.Server, requests: Requests) -> list[Contender]:
    """greylistd as Exim asks it; postgrey connection per question and persistent."""
    t0 = time.monotonic()
    reqs = peers.translate(requests, name)  # type: ignore[arg-type]
    print(f"peers: {name} questions in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    if name == "greylistd":
        return [Contender(name, srv, reqs)]
    term = peers.POSTFIX_TERMINATOR
    return [
        Contender(name, srv, reqs, terminator=term, settle=True),
        Contender(f"{name}-persistent", srv, reqs, terminator=term, persistent=True, settle=True),
    ]


def start_peers(
    workdir: Path, requests: Requests, wanted: list[str], report_peers: dict
) -> tuple[list[Contender], list[servers.Server]]:
    """The peers in ``wanted`` (installed first when root), each skipped with a note in
    ``report_peers`` when it cannot run."""
    notes = peers.ensure_installed(wanted)
    targets: list[Contender] = []
    started: list[servers.Server] = []
    for name in wanted:
        try:
            if name in notes:
                raise RuntimeError(notes[name])
            srv = peers.start_greylistd(workdir) if name == "greylistd" else None
            srv = srv or peers.start_postgrey(workdir)
        except (RuntimeError, OSError) as exc:
            note = notes.get(name) or f"failed to start: {str(exc)[-300:]}: skipped"
            report_peers[name] = {"status": "skipped", "note": note}
            print(f"peers: {name}: {note}", file=sys.stderr)
            continue
        started.append(srv)
        version = srv.extra.get("version")
        for contender in _peer_contenders(name, srv, requests):
            targets.append(contender)
            report_peers[contender.name] = {"status": "measured", "version": version}
        if name == "postgrey":
            report_peers["postgrey-persistent"]["note"] = (
                "same postgrey process, one connection per asker kept open (Postfix)"
            )
    return targets, started


_LINE_NO = re.compile(r":\d+\)$")


def profile(target: Contender, out_base: Path, seconds: float) -> dict:
    """Sample a daemon with py-spy under 16 askers; keep the collapsed stacks beside the
    results (not committed: bench/results/.gitignore), return the functions with the most
    samples (self time, and total time)."""
    spy = shutil.which("py-spy")
    if spy is None:
        return {"error": "py-spy not installed (pip install py-spy)"}
    server = target.server
    suffix = ".pyspy.txt" if server.name == "policyd" else f".{server.name}.pyspy.txt"
    raw = out_base.with_suffix(suffix)
    cmd = [spy, "record", "--pid", str(server.pid), "--duration", str(int(seconds) + 1)]
    cmd += ["--rate", "500", "--format", "raw", "--output", str(raw), "--nonblocking"]
    spy_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    run_load(
        server.socket,
        target.requests,
        concurrency=16,
        duration=seconds,
        warmup=0.0,
        start_index=target.index,
    )
    _, err = spy_proc.communicate(timeout=60)
    if not raw.exists():
        return {"error": err.decode(errors="replace")[-500:]}
    self_samples: dict[str, int] = {}
    total_samples: dict[str, int] = {}
    grand = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        grand += n
        # py-spy names a frame "function (file:line)"; group the lines of one function.
        frames = [_LINE_NO.sub(")", f) for f in stack.split(";")]
        self_samples[frames[-1]] = self_samples.get(frames[-1], 0) + n
        for frame in set(frames):
            total_samples[frame] = total_samples.get(frame, 0) + n

    def top(d: dict[str, int]) -> list[tuple[str, float]]:
        ranked = sorted(d.items(), key=lambda kv: -kv[1])[:25]
        return [(name, round(100 * n / grand, 1)) for name, n in ranked]

    return {
        "target": server.name,
        "samples": grand,
        "raw": str(raw),
        "self_pct": top(self_samples),
        "total_pct": top(total_samples),
    }
