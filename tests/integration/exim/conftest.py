"""Real Exim 4.96 against a real policyd, through the shipped ACL fragments.

Fixtures build a lab directory that the Exim user (Debian-exim) can reach, install
``exim-snippets/test.conf`` and the fragments it includes, run policyd in a subprocess on a
Unix socket inside the lab, and drive Exim two ways: ``exim -bh`` (the real ACLs, the message
discarded, ~20 ms a session) and a loopback ``exim -bdf`` that delivers to an aiosmtpd sink.

Needs root and ``/usr/sbin/exim4`` (exim4-daemon-heavy); without them every test here FAILS
with a message saying so (CI installs Exim, a silent skip would hide a broken job).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as email_policy
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from support.policyd_process import wait_until

EXIM = Path("/usr/sbin/exim4")
EXIM_USER = "Debian-exim"
REPO = Path(__file__).resolve().parents[3]
SNIPPETS_DIR = REPO / "exim-snippets"
#: What test.conf includes, plus test.conf itself: copied verbatim into the lab.
SNIPPET_FILES = ("00_policyd", "rcpt.acl", "data.acl", "outbound.acl", "test.conf")
#: SMTP reply lines in ``exim -bh`` output (the rest is banners and debug text).
REPLY_RE = re.compile(r"^[0-9]{3}[ -]")
FINAL_REPLY_RE = re.compile(r"^[0-9]{3} ")
ENHANCED_CODE_RE = re.compile(r"^[245]\.[0-9]{1,3}\.[0-9]{1,3} ")

#: The greylisting delay of the test daemon; short so the module stays fast.
GREYLIST_DELAY = 2.0
#: Clients the test daemon whitelists (TEST-NET-1 .250); nothing else, not even loopback.
WHITELISTED_CLIENT = "192.0.2.250"
#: Recipients the test daemon never greylists (a local part, one address).
WHITELISTED_RECIPIENTS = ["abuse@", "vip@test.example"]
#: How long a daemon or an Exim listener may take to come up.
START_TIMEOUT = 15.0
#: Written by the fragments when the daemon gave no usable answer (see rcpt.acl).
NO_ANSWER_LOG = "policyd: no usable answer"
TEMP_LOCAL_PROBLEM = "Temporary local problem"
#: Exim's panic when an ACL message's code does not start with the verb's digit (-bh: stderr).
WRONG_DIGIT_PANIC = "configured error code starts with incorrect digit"


def _fail_without_exim() -> None:
    if not EXIM.exists():
        pytest.fail(
            f"{EXIM} is missing: install exim4-daemon-heavy (.ci/run does) to run the Exim tests",
            pytrace=False,
        )
    if os.geteuid() != 0:
        pytest.fail(
            "the Exim tests must run as root (exim -C with -D macros, -bh as Debian-exim)",
            pytrace=False,
        )


@pytest.fixture(scope="session", autouse=True)
def _exim_required() -> None:
    _fail_without_exim()


@pytest.fixture(autouse=True)
def _no_exim_panic(request: pytest.FixtureRequest) -> Iterator[None]:
    """Exim's panic log must stay empty (``-bd`` runs; ``-bh`` is checked in ``Exim.bh``)."""
    yield
    if "lab" in request.fixturenames:
        paniclog = request.getfixturevalue("lab").path / "log" / "paniclog"
        if paniclog.exists() and paniclog.stat().st_size:
            text = paniclog.read_text(errors="replace")
            paniclog.unlink()
            pytest.fail(f"Exim wrote to its panic log:\n{text}", pytrace=False)


Text = str | bytes


def _b(value: Text) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------
# The lab: spool, logs, mailbox, the config and the fragments, reachable by Debian-exim.


@dataclass(frozen=True)
class Lab:
    """The lab directory and the well-known paths inside it."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "test.conf"

    @property
    def snippets(self) -> Path:
        return self.path / "snippets"

    @property
    def mainlog(self) -> Path:
        return self.path / "log" / "mainlog"

    @property
    def inbox(self) -> Path:
        return self.path / "mail" / "inbox"

    def subdir(self, name: str) -> Path:
        """A fresh root-owned 0755 directory (Debian-exim can reach a socket in it)."""
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.path))
        path.chmod(0o755)
        return path


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    # Not under pytest's tmp_path: its 0700 parents keep Debian-exim out.
    path = Path(tempfile.mkdtemp(prefix="policyd-exim-"))
    try:
        path.chmod(0o755)
        for name in ("spool", "log", "mail"):
            (path / name).mkdir()
            shutil.chown(path / name, EXIM_USER, EXIM_USER)
        (path / "snippets").mkdir(mode=0o755)
        # Copies, root-owned 0644: Exim refuses a -C file that is not root-owned or is
        # group/world writable, and the delivery re-exec (as Debian-exim) re-reads the
        # config and its includes, which a checkout under a private home could hide.
        for name in SNIPPET_FILES:
            target = path / ("test.conf" if name == "test.conf" else f"snippets/{name}")
            shutil.copyfile(SNIPPETS_DIR / name, target)
            os.chown(target, 0, 0)
            target.chmod(0o644)
        yield Lab(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# policyd in a subprocess.

DAEMON_CONFIG = """\
[server]
socket = {socket}
socket_mode = "0666"
deadline = "1s"
fallback = "{fallback}"
# Every decision at INFO: the tests read accepted questions' lines as evidence too.
log_decisions = "all"

[store]
url = {store}

[greylist]
enabled = true
delay = "{delay}s"
retry_window = "2d"
max_age = "35d"
auto_whitelist_after = 0
ipv4_prefix = 24
ipv6_prefix = 64
learn = false
skip_authenticated = true
whitelist_clients = ["{whitelisted}/32"]
whitelist_recipients = {whitelisted_rcpts}
add_header = true

# Nothing shared between daemons (several run at once) and nothing in the checkout.
[metrics]
enabled = false

[admin]
socket = {admin}
"""


@dataclass
class Policyd:
    """One policyd process with its own directory (config, socket, SQLite file, log)."""

    directory: Path
    process: subprocess.Popen[bytes] | None = None
    notify: socket.socket | None = None
    said_ready: bool = False
    #: ``[server] fallback``: "accept" or "defer"
    fallback: str = "accept"

    @property
    def socket(self) -> Path:
        return self.directory / "policyd.sock"

    @property
    def config(self) -> Path:
        return self.directory / "policyd.toml"

    @property
    def log(self) -> Path:
        return self.directory / "policyd.log"

    def write_config(self) -> None:
        self.config.write_text(
            DAEMON_CONFIG.format(
                socket=json.dumps(str(self.socket)),
                admin=json.dumps(str(self.directory / "admin.sock")),
                store=json.dumps(f"sqlite://{self.directory / 'state.sqlite3'}"),
                fallback=self.fallback,
                delay=int(GREYLIST_DELAY),
                whitelisted=WHITELISTED_CLIENT,
                whitelisted_rcpts=json.dumps(WHITELISTED_RECIPIENTS),
            )
        )

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        """Start and wait until ready: the socket accepts and the daemon said READY=1.

        READY=1 (sd_notify, the daemon's own readiness signal) comes after the signal
        handlers are installed; a socket that accepts alone does not promise that.
        """
        assert self.process is None, "already running"
        notify_path = self.directory / "notify.sock"
        notify_path.unlink(missing_ok=True)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(notify_path))
        self.notify.setblocking(False)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "WATCHDOG_"))}
        env["NOTIFY_SOCKET"] = str(notify_path)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "policyd", "--config", str(self.config)],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._ready, f"policyd to be ready on {self.socket}", START_TIMEOUT)

    def _ready(self) -> bool:
        assert self.process is not None and self.notify is not None
        if self.process.poll() is not None:
            pytest.fail(
                f"policyd exited with {self.process.returncode} during start-up:\n"
                + self.log_text(),
                pytrace=False,
            )
        with contextlib.suppress(BlockingIOError):
            while not self.said_ready:
                self.said_ready = b"READY=1" in self.notify.recv(4096).split(b"\n")
        if not self.said_ready:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
        return True

    def stop(self) -> int:
        """SIGTERM by PID, wait; returns the exit status (the contract says 0)."""
        assert self.process is not None, "not running"
        process, self.process = self.process, None
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail("policyd ignored SIGTERM for 10 s:\n" + self.log_text(), pytrace=False)
        finally:
            if self.notify is not None:
                self.notify.close()
            self.notify, self.said_ready = None, False
        return code


@contextlib.contextmanager
def _policyd_instances(lab: Lab) -> Iterator[Callable[[str], Policyd]]:
    started: list[Policyd] = []

    def make(name: str) -> Policyd:
        daemon = Policyd(lab.subdir(f"policyd-{name}"))
        daemon.write_config()
        started.append(daemon)
        daemon.start()
        return daemon

    try:
        yield make
    finally:
        failed = [
            f"policyd {d.directory.name} exited with {code} on SIGTERM:\n{d.log_text()[-2000:]}"
            for d in started
            if d.process is not None and (code := d.stop()) != 0
        ]
        if failed:
            pytest.fail("\n".join(failed), pytrace=False)


@pytest.fixture(scope="session")
def policyd(lab: Lab) -> Iterator[Policyd]:
    """The daemon most tests share; each test keeps to its own clients/senders/recipients."""
    with _policyd_instances(lab) as make:
        yield make("shared")


@pytest.fixture
def policyd_factory(lab: Lab) -> Iterator[Callable[[str], Policyd]]:
    """Start a private daemon (own socket and state); stopped at the end of the test."""
    with _policyd_instances(lab) as make:
        yield make


# --------------------------------------------------------------------------------------------
# A scripted stand-in for policyd, to pin down what the fragments send and how they read
# every kind of answer (including ones the real daemon should never give).

#: ``StubPolicy`` answer that closes the connection without writing anything.
NO_ANSWER = None


@dataclass
class StubPolicy:
    """Records every request; answers from a script (see ``script``)."""

    socket: Path
    requests: list[bytes] = field(default_factory=list)
    answers: list[bytes | None] = field(default_factory=lambda: [b"ok"])
    lock: threading.Lock = field(default_factory=threading.Lock)

    def script(self, *answers: Text | None) -> None:
        """Answer the next requests in this order; the last answer repeats."""
        with self.lock:
            self.answers = [None if a is None else _b(a) for a in answers]
            self.requests.clear()

    def _next(self, request: bytes) -> bytes | None:
        with self.lock:
            self.requests.append(request)
            return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


@pytest.fixture
def stub(lab: Lab) -> Iterator[StubPolicy]:
    policy = StubPolicy(lab.subdir("stub") / "stub.sock")

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.settimeout(5)
            request = b""
            # Exim half-closes after its one write; stop at a newline as well.
            while not request.endswith(b"\n") and (chunk := self.request.recv(4096)):
                request += chunk
            answer = policy._next(request)
            if answer is not None:
                self.request.sendall(answer)

    server = socketserver.ThreadingUnixStreamServer(str(policy.socket), Handler)
    policy.socket.chmod(0o666)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield policy
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# --------------------------------------------------------------------------------------------
# exim -bh: one simulated SMTP session through the real ACLs.


@dataclass(frozen=True)
class BhResult:
    """What one ``exim -bh`` session answered and logged."""

    replies: list[str]  # every reply line (multi-line replies included)
    log: str  # Exim's stderr: "LOG:" lines and ">>>" tracing
    nrcpt: int  # RCPT commands sent (to locate their replies)
    sent_data: bool

    @property
    def finals(self) -> list[str]:
        """One reply per command, starting with the banner; a multi-line reply is joined
        ("451-4.7.1 Greylisted: ..." + "451 4.7.1 after 2 seconds" -> "451 4.7.1 Greylisted:
        ... after 2 seconds")."""
        joined: list[str] = []
        texts: list[str] = []
        for line in self.replies:
            text = line[4:]
            if texts and (code := ENHANCED_CODE_RE.match(texts[0])):
                text = text.removeprefix(code.group())
            texts.append(text)
            if FINAL_REPLY_RE.match(line):
                joined.append(f"{line[:3]} {' '.join(texts)}")
                texts = []
        return joined

    @property
    def rcpt(self) -> list[str]:
        return self.finals[3 : 3 + self.nrcpt]

    @property
    def rcpt_codes(self) -> list[int]:
        return [int(line[:3]) for line in self.rcpt]

    @property
    def data(self) -> str:
        """The answer to the end of the message, or to DATA itself when that was refused."""
        assert self.sent_data, "no DATA in this session"
        after = self.finals[3 + self.nrcpt :]
        return after[1] if after[0].startswith("354") else after[0]

    @property
    def log_lines(self) -> list[str]:
        return [line for line in self.log.splitlines() if line.startswith("LOG:")]

    def describe(self) -> str:
        return (
            "replies:\n  " + "\n  ".join(self.replies) + "\nlog:\n  " + "\n  ".join(self.log_lines)
        )


def smtp_dialogue(
    sender: Text,
    rcpts: Iterable[Text],
    *,
    helo: Text = "client.example.net",
    body: Text | None = None,
    extra: Iterable[Text] = (),
) -> tuple[bytes, int]:
    """EHLO, MAIL, RCPT..., optionally DATA with ``body`` (header lines, blank line, body)."""
    sender_b = _b(sender)
    utf8 = b" SMTPUTF8" if any(c > 0x7F for c in sender_b) else b""
    rcpts_b = [_b(r) for r in rcpts]
    lines = [b"EHLO " + _b(helo), b"MAIL FROM:<" + sender_b + b">" + utf8]
    lines += [b"RCPT TO:<" + r + b">" for r in rcpts_b]
    if body is not None:
        text = _b(body).replace(b"\r\n", b"\n").removesuffix(b"\n")
        lines += [b"DATA", text.replace(b"\n", b"\r\n"), b"."]
    lines += [_b(x) for x in extra]
    lines.append(b"QUIT")
    return b"\r\n".join(lines) + b"\r\n", len(rcpts_b)


@dataclass(frozen=True)
class Exim:
    """Runs /usr/sbin/exim4 with the lab's test.conf and macros."""

    lab: Lab

    def command(self, *args: str, **macros: str) -> list[str]:
        defines = {"LAB": str(self.lab.path), "SNIPPETS": str(self.lab.snippets), **macros}
        return [
            str(EXIM),
            "-C",
            str(self.lab.config),
            *(f"-D{name}={value}" for name, value in defines.items()),
            *args,
        ]

    def bh(
        self,
        client: str,
        sender: Text,
        rcpts: Iterable[Text],
        *,
        socket_path: Path | str,
        helo: Text = "client.example.net",
        body: Text | None = None,
        options: Iterable[str] = (),
        **macros: str,
    ) -> BhResult:
        """One SMTP session as if from ``client`` (IPv4 or IPv6); the message is discarded.
        ``options`` go on Exim's command line (e.g. ``-oMs NAME`` sets the host name)."""
        dialogue, nrcpt = smtp_dialogue(sender, rcpts, helo=helo, body=body)
        done = subprocess.run(
            self.command("-bh", client, *options, POLICYD_SOCKET=str(socket_path), **macros),
            input=dialogue,
            capture_output=True,
            timeout=30,
            check=False,
        )
        stdout = done.stdout.decode("utf-8", "replace").replace("\r", "")
        stderr = done.stderr.decode("utf-8", "replace")
        replies = [line for line in stdout.splitlines() if REPLY_RE.match(line)]
        assert replies, f"exim -bh gave no SMTP replies (exit {done.returncode}):\n{stderr}"
        assert WRONG_DIGIT_PANIC not in stderr, stderr
        return BhResult(replies, stderr, nrcpt, body is not None)


@pytest.fixture(scope="session")
def exim(lab: Lab) -> Exim:
    return Exim(lab)


@pytest.fixture
def bh(exim: Exim, policyd: Policyd) -> Callable[..., BhResult]:
    """``exim -bh`` against the shared daemon: ``bh(client, sender, rcpts, body=..., ...)``."""

    def run(client: str, sender: Text, rcpts: Iterable[Text], **kwargs: Any) -> BhResult:
        kwargs.setdefault("socket_path", policyd.socket)
        return exim.bh(client, sender, rcpts, **kwargs)

    return run


def retry_until(
    attempt: Callable[[], BhResult], accepted: Callable[[BhResult], bool], timeout: float
) -> BhResult:
    """Repeat ``attempt`` (a retrying MTA) until ``accepted``; return the last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = attempt()
        if accepted(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


def sleep_until(moment: float) -> None:
    """Sleep until ``time.monotonic()`` reaches ``moment``."""
    time.sleep(max(0.0, moment - time.monotonic()))


# --------------------------------------------------------------------------------------------
# A loopback MTA: exim -bdf on a free port, delivering to an aiosmtpd sink on another one.


@dataclass
class Sink:
    """Collects every message delivered to it (thread-safe; aiosmtpd runs in a thread)."""

    messages: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.messages.append(
                (envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
            )
        return "250 2.0.0 stored"

    def received(self) -> list[tuple[str, list[str], EmailMessage]]:
        parser = BytesParser(policy=email_policy)
        with self.lock:
            return [(s, r, parser.parsebytes(c)) for s, r, c in self.messages]


@dataclass
class Mta:
    """A running ``exim -bdf`` on ``port`` and the sink it delivers to."""

    exim: Exim
    port: int
    sink: Sink
    process: subprocess.Popen[bytes]

    def send(
        self, client: str, message: EmailMessage, sender: str, rcpts: list[str]
    ) -> dict[str, int]:
        """Send one message from source address ``client``; returns refused recipients."""
        with smtplib.SMTP("127.0.0.1", self.port, source_address=(client, 0), timeout=10) as s:
            s.ehlo("client.example.net")
            try:
                refused = s.sendmail(sender, rcpts, message.as_bytes())
            except smtplib.SMTPRecipientsRefused as exc:
                refused = exc.recipients
            return {rcpt: code for rcpt, (code, _text) in refused.items()}

    def queue_count(self) -> int:
        done = subprocess.run(
            self.exim.command("-bpc"), capture_output=True, text=True, timeout=10, check=True
        )
        return int(done.stdout.strip() or 0)


@pytest.fixture
def mta(exim: Exim, lab: Lab, policyd: Policyd) -> Iterator[Mta]:
    sink = Sink()
    controller = Controller(sink, hostname="127.0.0.1", port=free_port())
    controller.start()
    port = free_port()
    stderr = lab.path / "exim-bd.stderr"
    try:
        with open(stderr, "wb") as errors:
            process = subprocess.Popen(
                exim.command(
                    "-bdf",
                    "-oX",
                    str(port),
                    "-oP",
                    str(lab.path / "exim-bd.pid"),
                    POLICYD_SOCKET=str(policyd.socket),
                    SINK_PORT=str(controller.port),
                ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
            )

        def listening() -> bool:
            if process.poll() is not None:
                error = stderr.read_text(errors="replace")
                pytest.fail(f"exim -bdf exited with {process.returncode}: {error}", pytrace=False)
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        try:
            wait_until(listening, f"exim -bdf to listen on port {port}", START_TIMEOUT)
            yield Mta(exim, port, sink, process)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    finally:
        controller.stop()
