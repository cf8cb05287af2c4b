"""Composition root: read config, open the store, serve, handle signals, tear down.

SIGTERM/SIGINT: stop accepting, drain open questions, exit 0 (a second signal cuts the drain
short). SIGHUP: re-read the config file; an invalid one is refused and the old one kept.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import logging.handlers
import math
import signal
import sqlite3
import sys
from dataclasses import dataclass, field
from typing import Final

from . import __version__, systemd
from .admin.server import Admin, AdminServer
from .config import Config, ConfigError, ServerConfig, load
from .config import files as configfile
from .config.preflight import Problem, Refused, database_refusal, preflight
from .dispatch import Dispatcher
from .metrics import Metrics
from .server import PolicyServer
from .sockets import SocketSetupError
from .stores import StoreUnavailable, open_store

logger = logging.getLogger("policyd")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SYSLOG_FORMAT = "policyd[%(process)d]: %(levelname)s %(name)s: %(message)s"
#: Settings that only take effect at start; a reload that changes them says so.
RESTART_ONLY = ("server", "store", "metrics", "admin")
#: Seconds between housekeeping rounds (whitelist expiry, store-statistics gauges).
STATS_INTERVAL = 30.0
#: Exit status of a refused configuration (``--check-config`` and a start alike);
#: docs/configuration.md lists what is refused.
EXIT_REFUSED = 2


def setup_logging(config: ServerConfig) -> None:
    """stderr (journald adds its own timestamps) or syslog; one line per record."""
    handler: logging.Handler
    if config.log_target == "syslog":
        handler = logging.handlers.SysLogHandler(
            address="/dev/log",
            facility=logging.handlers.SysLogHandler.facility_names[config.syslog_facility],
        )
        handler.setFormatter(logging.Formatter(SYSLOG_FORMAT))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(handlers=[handler], level=config.log_level.upper(), force=True)


@dataclass
class Daemon:
    """One running daemon: its config path, current config, and stop signal."""

    config_path: str | None
    config: Config
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    dispatcher: Dispatcher | None = None
    server: PolicyServer | None = None
    metrics_port: int | None = None
    #: READY=1 was sent: RELOADING/READY pairs are only meaningful after that.
    ready: bool = False

    def reload(self) -> None:
        """SIGHUP: apply a new policy if the file is valid; keep the old one otherwise."""
        if self.ready:
            systemd.notify("RELOADING=1")
        try:
            new = load(self.config_path)
        except ConfigError as exc:
            problems = [Problem(str(exc))]
        else:
            problems = preflight(new)
        refused = [str(p) for p in problems if p.fatal]
        if refused:
            logger.error("reload refused, keeping the running config: %s", "; ".join(refused))
            if self.ready:
                systemd.notify("READY=1")
            return
        for problem in problems:
            logger.warning("%s", problem)
        for section in RESTART_ONLY:
            if getattr(new, section) != getattr(self.config, section):
                logger.warning("reload: [%s] changes take effect only after a restart", section)
        logging.getLogger().setLevel(new.server.log_level.upper())
        self.config = new
        if self.dispatcher is not None:
            self.dispatcher.reconfigure(new)
        logger.info("reloaded configuration from %s", new.source)
        if self.ready:
            systemd.notify("READY=1")

    def on_stop_signal(self) -> None:
        if self.stop_requested.is_set():
            logger.warning("second stop signal: exiting without draining")
            raise SystemExit(1)
        logger.info("stop requested; draining")
        self.stop_requested.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # Handlers first: a SIGTERM or SIGHUP during start-up must not kill the process.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_stop_signal)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        # Startup runs under the config's store and server settings; reload keeps them.
        async with contextlib.AsyncExitStack() as stack:
            try:
                store = await open_store(self.config.store)
            except sqlite3.DatabaseError as exc:  # passed the preflight, fails to open
                raise database_refusal(self.config.store.url, exc) from None
            stack.push_async_callback(store.aclose)
            metrics = Metrics(self.config.metrics.enabled)
            stack.callback(metrics.close)
            self.dispatcher = Dispatcher(self.config, store, metrics=metrics)
            if self.config.server.log_target == "stderr":
                self.dispatcher.decisions.stream = sys.stderr
            stack.callback(self.dispatcher.decisions.flush)
            stack.push_async_callback(self.dispatcher.aclose)
            admin = Admin(self.dispatcher, store.admin)
            await admin.reload_whitelist()
            if self.config.admin.socket:
                # Before the query socket: a refusal (another daemon's live admin socket)
                # then leaves nothing of ours behind.
                admin_server = AdminServer(self.config.admin, admin)
                await admin_server.start()
                stack.push_async_callback(admin_server.stop)
            server = PolicyServer(
                self.config.server,
                self.dispatcher.answer,
                self.dispatcher.fallback,
            )
            self.server = server
            await server.start(systemd.listen_sockets())
            metrics.open_connections.set_function(lambda: len(server.open_connections))
            self.metrics_port = metrics.serve(self.config.metrics.listen)
            background = (
                _start_watchdog(loop),
                loop.create_task(self._housekeeping(admin)),
                loop.create_task(admin.watch_lists()),
            )
            for task in background:
                if task is not None:
                    stack.callback(task.cancel)
            systemd.notify(f"READY=1\nSTATUS=policyd {__version__} serving")
            self.ready = True
            logger.info(
                "policyd %s ready (store %s)", __version__, self.config.store.url.split("://", 1)[0]
            )
            await self.stop_requested.wait()
            systemd.notify("STOPPING=1")
            await server.stop(self.config.server.drain_timeout)
        logger.info("policyd stopped")
        return 0

    async def _housekeeping(self, admin: Admin) -> None:
        """Off the hot path: drop expired whitelist entries, refresh the store gauges."""
        metrics = admin.dispatcher.metrics
        counted_unretried = 0.0
        for _ in iter(int, 1):  # forever; cancelled at shutdown
            # Counts of repeated warnings whose interval ended (policyd/lograte.py).
            admin.dispatcher.warnings.flush()
            if self.server is not None:
                self.server.warnings.flush()
            try:
                await admin.reload_whitelist()
                figures = await admin.store.stats(self.config.greylist.auto_whitelist_after)
            except Exception:  # housekeeping trouble must never stop the daemon
                logger.exception("housekeeping failed; will retry")
            else:
                # NaN ("unknown", shown as no data) where the store cannot count cheaply
                # (Redis: it would take a scan of the keyspace), never a misleading 0.
                metrics.auto_whitelisted.set(figures.get("auto_whitelisted", math.nan))
                expired = figures.get("expired_triplets", 0)
                unretried = figures.get("expired_unretried", 0)
                if expired:
                    metrics.never_retried.set(unretried / expired)
                if unretried > counted_unretried:  # the store counts; the metric follows
                    metrics.greylist_unretried.inc(unretried - counted_unretried)
                    counted_unretried = unretried
            await asyncio.sleep(STATS_INTERVAL)


def _start_watchdog(loop: asyncio.AbstractEventLoop) -> asyncio.Task[None] | None:
    """Ping systemd's watchdog at half its interval while the loop is alive."""
    interval = systemd.watchdog_interval()
    if interval is None:
        return None

    async def ping_forever() -> None:
        for _ in iter(int, 1):  # forever; cancelled at shutdown
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    return loop.create_task(ping_forever())


#: policyd's exit statuses, shown by --help and policyd(8).
EXIT_STATUS: Final = (
    (0, "stopped after SIGTERM or SIGINT, or --check-config found the configuration valid"),
    (1, "could not start or run: store unreachable, log target, socket in use"),
    (
        2,
        "invalid configuration, or a socket or its directory that cannot be set up "
        "(the message names the path and the fix)",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="policyd",
        description="Policy daemon for Exim: greylisting, rate limits and SPF, asked by "
        "Exim through ${readsocket} once per recipient and once per message.",
        epilog="exit status: " + "; ".join(f"{code} {text}" for code, text in EXIT_STATUS),
    )
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        help=f"TOML config file (default: ${configfile.ENV_VAR}, else {configfile.SYSTEM_CONFIG} "
        "when it exists, else the built-in defaults)",
    )
    parser.add_argument(
        "--check-config", action="store_true", help="validate the config and exit (0 = valid)"
    )
    parser.add_argument(
        "--version", action="version", version=f"policyd {__version__}", help="print the version"
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run_loop(daemon: Daemon) -> int:
    """Run on uvloop when it is installed, else on the standard loop."""
    try:
        import uvloop  # optional extra, imported only when running
    except ImportError:
        return asyncio.run(daemon.run())
    status: int = uvloop.run(daemon.run())
    return status


def refuse(problems: list[Problem]) -> int:
    """One line per refusal on stderr (before logging is set up, and whatever the log
    target: this is where an operator starting the daemon by hand looks)."""
    for problem in problems:
        if problem.fatal:
            print(f"policyd: invalid configuration: {problem}", file=sys.stderr)
    return EXIT_REFUSED


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    choice = configfile.find(args.config)
    try:
        config = load(choice.path)
    except ConfigError as exc:
        where = "" if args.config else f" [{choice.describe()}]"
        return refuse([Problem(f"{exc}{where}")])
    # The same checks for --check-config and for a start: they refuse the same files.
    problems = preflight(config)
    if any(p.fatal for p in problems):
        return refuse(problems)
    if args.check_config:
        for problem in problems:
            print(f"policyd: warning: {problem}", file=sys.stderr)
        print(f"policyd: configuration {config.source} is valid")
        return 0
    try:
        setup_logging(config.server)
    except OSError as exc:
        print(f"policyd: cannot open log target: {exc}", file=sys.stderr)
        return 1
    for problem in problems:
        logger.warning("%s", problem)
    try:
        logger.info("configuration: %s", choice.describe())
        return run_loop(Daemon(choice.path, config))
    except Refused as exc:
        return refuse([Problem(str(exc))])
    except SocketSetupError as exc:  # the admin's to fix, like an invalid configuration
        logger.error("cannot start: %s", exc)
        return EXIT_REFUSED
    except (OSError, StoreUnavailable) as exc:
        logger.error("cannot start: %s", exc)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        with contextlib.suppress(Exception):
            logging.shutdown()
