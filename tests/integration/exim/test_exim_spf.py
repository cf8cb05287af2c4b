"""SPF through real Exim 4.96 and a real policyd whose ``[spf]`` resolver asks a loopback DNS
server (tests/support/dns_server.py) serving this module's zones.

- fail → the RCPT gets ``550 5.7.23``;
- pass → greylisted once, then accepted, and the DATA-stage ``Received-SPF`` and
  ``Authentication-Results`` headers are in the message a loopback ``exim -bdf`` delivered to
  the aiosmtpd sink;
- temperror (the DNS server drops the sender domain's queries) → ``451 4.4.3`` until the
  give-up rule (``temperror_max_defers = 2``), then accepted with a ``temperror`` header;
- greylisting keyed on the SPF-pass domain: a retry from another network of the authorised
  pool passes; a wide-open (``+all``) record keeps network keying;
- a domain whose DNS answers take 5 s does not slow questions about other domains, and its
  own question ends in a temperror within the daemon's deadline, never an Exim timeout.

The module overrides the ``policyd`` fixture with a daemon of its own (SPF on), so the
conftest's ``bh`` and ``mta`` fixtures talk to that daemon. Every test keeps to its own
domains, clients and recipients.
"""

from __future__ import annotations

import json
import smtplib
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest

from .conftest import NO_ANSWER_LOG, BhResult, Exim, Lab, Mta, Policyd, sleep_until

# tests/ holds the DNS server module shared by test packages (it is not a test file).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from support.dns_server import DnsServer
from support.policyd_process import wait_until

from policyd.dns import FAILURE_TTL

pytestmark = pytest.mark.exim

Bh = Callable[..., BhResult]

#: The daemon's timings. The SPF budget is deliberately below what c-ares can take for an
#: unanswered query: c-ares >= 1.32 scales its per-try timeout to the server's observed
#: latency (5 x average, at least 250 ms, doubled with jitter on the retry), so against a
#: loopback server answering in 1 ms a dropped query fails after 0.5-0.75 s whatever
#: ``query_timeout`` says. Below that, the budget is what ends a check that waits on DNS.
SPF_TIMEOUT = 0.45
QUERY_TIMEOUT = 1.2
DEADLINE = 1.0
EXIM_READSOCKET_TIMEOUT = 2.0
GREYLIST_DELAY = 1.0
TEMPERROR_MAX_DEFERS = 2
AUTHSERV_ID = "mx.test.example"
#: Never greylisted by this module's daemon (the latency test wants a plain 250).
WHITELISTED_RCPT = "vip@test.example"
#: How long after the delay a retry may still be refused (clock granularity, slow CI).
SLACK = 3.0
#: The latency test: how many fast domains are asked while the slow one is in flight.
FAST_DOMAINS = 5
SLOW_DNS_DELAY = 5.0
FAST_LIMIT = 1.0

ZONE: dict[str, list[tuple[str, str]]] = {
    # 1. fail: nothing authorised, or a range that does not cover the client.
    "fail-all.example": [("TXT", "v=spf1 -all")],
    "fail-range.example": [("TXT", "v=spf1 ip4:203.0.113.0/24 -all")],
    # 2. pass for the loopback clients of the -bdf test.
    "pass.example": [("TXT", "v=spf1 ip4:127.0.20.0/24 -all")],
    # 3. temperror: served, but its queries are dropped (see the dns fixture).
    "temp.example": [("TXT", "v=spf1 ip4:127.0.30.0/24 -all")],
    # 4. domain keying: a pool of two networks, and a wide-open record.
    "pool.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 ip4:198.51.100.0/24 -all")],
    "open.example": [("TXT", "v=spf1 +all")],
    # SERVFAIL, then fixed (the greylist clock started by SPF deferrals).
    "flaky.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 ip4:198.51.100.0/24 -all")],
    # 5. a slow domain (answers after 5 s) and fast ones.
    "slow.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    **{f"fast{n}.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")] for n in range(FAST_DOMAINS)},
}

SPF_CONFIG = """\
[server]
socket = {socket}
socket_mode = "0666"
deadline = "{deadline}s"
fallback = "accept"

[store]
url = {store}

[greylist]
enabled = true
delay = "{delay}s"
retry_window = "2d"
auto_whitelist_after = 0
ipv4_prefix = 24
learn = false
whitelist_clients = []
whitelist_recipients = {whitelisted_rcpts}
add_header = true

[spf]
enabled = true
nameservers = {nameservers}
timeout = "{timeout}s"
query_timeout = "{query_timeout}s"
skip_clients = []
temperror_max_defers = {max_defers}
temperror_max_time = "1h"
authserv_id = "{authserv_id}"

[metrics]
enabled = false

[admin]
socket = {admin}
"""


class SpfPolicyd(Policyd):
    """A policyd with ``[spf]`` on, asking ``nameserver`` (``host:port``) only."""

    nameserver = ""

    def write_config(self) -> None:
        assert self.nameserver, "set the nameserver first"
        self.config.write_text(
            SPF_CONFIG.format(
                socket=json.dumps(str(self.socket)),
                admin=json.dumps(str(self.directory / "admin.sock")),
                store=json.dumps(f"sqlite://{self.directory / 'state.sqlite3'}"),
                deadline=DEADLINE,
                delay=GREYLIST_DELAY,
                whitelisted_rcpts=json.dumps([WHITELISTED_RCPT]),
                nameservers=json.dumps([self.nameserver]),
                timeout=SPF_TIMEOUT,
                query_timeout=QUERY_TIMEOUT,
                max_defers=TEMPERROR_MAX_DEFERS,
                authserv_id=AUTHSERV_ID,
            )
        )


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    server = DnsServer(ZONE).start()
    server.drop("temp.example")
    server.delay("slow.example", SLOW_DNS_DELAY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def policyd(lab: Lab, dns: DnsServer) -> Iterator[SpfPolicyd]:
    """Overrides the conftest's shared daemon: ``bh`` and ``mta`` use this one."""
    daemon = SpfPolicyd(lab.subdir("policyd-spf"))
    daemon.nameserver = dns.address
    daemon.write_config()
    daemon.start()
    try:
        yield daemon
    finally:
        assert daemon.stop() == 0, daemon.log_text()[-3000:]


def assert_daemon_answered(result: BhResult, daemon: Policyd) -> None:
    """The daemon gave a verdict: the fragments did not have to fail open."""
    assert not [line for line in result.log_lines if NO_ANSWER_LOG in line], (
        result.describe() + "\npolicyd log:\n" + daemon.log_text()[-3000:]
    )


# --------------------------------------------------------------------------------------------
# SMTP to the -bdf Exim with the full replies (Mta.send keeps only the codes).


@dataclass(frozen=True)
class Session:
    rcpt: list[tuple[int, str]]
    data: tuple[int, str] | None

    @property
    def rcpt_codes(self) -> list[int]:
        return [code for code, _ in self.rcpt]


def make_message(test_id: str, sender: str, rcpts: list[str]) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(rcpts)
    message["Subject"] = f"SPF test {test_id}"
    message["Message-ID"] = f"<{test_id}.policyd-spf-test@example.org>"
    message["X-Test-Id"] = test_id
    message.set_content(f"body of {test_id}\n")
    return message


def send(mta: Mta, client: str, message: EmailMessage, sender: str, rcpts: list[str]) -> Session:
    """One SMTP transaction from source address ``client``; DATA only if a RCPT passed."""
    with smtplib.SMTP("127.0.0.1", mta.port, source_address=(client, 0), timeout=10) as smtp:
        smtp.ehlo("client.example.net")
        code, text = smtp.mail(sender)
        assert code == 250, (code, text)
        replies = [smtp.rcpt(rcpt) for rcpt in rcpts]
        rcpt = [(code, text.decode(errors="replace")) for code, text in replies]
        data = None
        if any(code == 250 for code, _ in rcpt):
            code, text = smtp.data(message.as_bytes())
            data = (code, text.decode(errors="replace"))
        else:
            smtp.rset()
        return Session(rcpt, data)


def delivered(mta: Mta, test_id: str) -> EmailMessage:
    """The one message with ``X-Test-Id: test_id`` the sink received."""

    def found() -> list[EmailMessage]:
        return [m for _, _, m in mta.sink.received() if m["X-Test-Id"] == test_id]

    wait_until(lambda: bool(found()), f"delivery of {test_id} to the sink", 20)
    (message,) = found()
    return message


def unfolded(message: EmailMessage, name: str) -> list[str]:
    """Every ``name`` header's value, folding removed."""
    return [" ".join(str(value).split()) for value in message.get_all(name) or []]


# --------------------------------------------------------------------------------------------
# 1. fail


@pytest.mark.parametrize(
    ("domain", "client"),
    [("fail-all.example", "192.0.2.66"), ("fail-range.example", "192.0.2.67")],
)
def test_spf_fail_is_rejected_at_rcpt(bh: Bh, policyd: Policyd, domain: str, client: str) -> None:
    result = bh(client, f"someone@{domain}", ["user-fail@test.example"])
    (rcpt,) = result.rcpt
    assert rcpt.startswith("550 5.7.23 "), result.describe()
    assert f"{domain} does not authorise {client}" in rcpt, rcpt
    assert_daemon_answered(result, policyd)


# --------------------------------------------------------------------------------------------
# 2. pass → delivered with the DATA-stage headers


def test_spf_pass_is_delivered_with_spf_headers(mta: Mta, policyd: Policyd) -> None:
    client, sender, rcpts = "127.0.20.1", "news@pass.example", ["one@sink.example"]
    message = make_message("spf-pass", sender, rcpts)
    first_seen = time.monotonic()
    first = send(mta, client, message, sender, rcpts)
    assert first.rcpt_codes == [451] and first.rcpt[0][1].startswith("4.7.1 "), first

    sleep_until(first_seen + GREYLIST_DELAY)
    deadline = time.monotonic() + SLACK
    while (retry := send(mta, client, message, sender, rcpts)).rcpt_codes != [250]:
        assert retry.rcpt_codes == [451], retry
        assert time.monotonic() < deadline, f"still greylisted after the delay: {retry}"
        time.sleep(0.1)
    assert retry.data is not None and retry.data[0] == 250, retry

    got = delivered(mta, "spf-pass")
    (received_spf,) = unfolded(got, "Received-SPF")
    assert received_spf.startswith("pass "), received_spf
    for part in (
        "client-ip=127.0.20.1;",
        'envelope-from="news@pass.example";',
        f"receiver={AUTHSERV_ID};",
        "identity=mailfrom",
    ):
        assert part in received_spf, received_spf
    (auth_results,) = unfolded(got, "Authentication-Results")
    assert auth_results.startswith(f"{AUTHSERV_ID}; spf=pass "), auth_results
    assert "smtp.mailfrom=pass.example" in auth_results, auth_results
    assert got["X-Greylist"], got  # the greylist header comes at DATA too
    # The trace fields on top, above this host's Received: (RFC 7208 §9.1, RFC 8601);
    # X-Greylist at the end.
    names = [name.lower() for name in got]
    assert names[:3] == ["authentication-results", "received-spf", "received"], names
    assert names.index("x-greylist") > names.index("received"), names


# --------------------------------------------------------------------------------------------
# 3. temperror → 451 4.4.3, then the give-up rule


def test_temperror_defers_then_gives_up_and_delivers_with_header(
    mta: Mta, policyd: Policyd, dns: DnsServer
) -> None:
    client, sender, rcpts = "127.0.30.1", "news@temp.example", ["two@sink.example"]
    message = make_message("spf-temperror", sender, rcpts)
    # DNS is dropping every question for temp.example: deferred while the rule allows.
    first_deferral = time.monotonic()
    for attempt in range(TEMPERROR_MAX_DEFERS):
        started = time.monotonic()
        deferred = send(mta, client, message, sender, rcpts)
        assert deferred.rcpt_codes == [451], (attempt, deferred)
        assert deferred.rcpt[0][1].startswith("4.4.3 "), (attempt, deferred)
        assert "temp.example" in deferred.rcpt[0][1], deferred
        assert time.monotonic() - started < EXIM_READSOCKET_TIMEOUT, attempt
    assert dns.queries("temp.example", "TXT"), "the dropped questions never reached DNS"

    # Given up: SPF accepts, and greylisting keys on the client network, whose clock started
    # at the first deferral: accepted once the delay since then has passed, never 4.4.3 again.
    while (retry := send(mta, client, message, sender, rcpts)).rcpt_codes != [250]:
        assert retry.rcpt[0][1].startswith("4.7.1 "), retry
        assert time.monotonic() < first_deferral + GREYLIST_DELAY + SLACK, retry
        time.sleep(0.1)
    assert retry.data is not None and retry.data[0] == 250, retry

    got = delivered(mta, "spf-temperror")
    (received_spf,) = unfolded(got, "Received-SPF")
    assert received_spf.startswith("temperror "), received_spf
    assert "client-ip=127.0.30.1;" in received_spf, received_spf
    assert "problem=" in received_spf, received_spf
    (auth_results,) = unfolded(got, "Authentication-Results")
    assert "spf=temperror" in auth_results, auth_results


def test_spf_deferrals_start_the_greylist_clock(bh: Bh, policyd: Policyd, dns: DnsServer) -> None:
    """Issue 17: DNS answers SERVFAIL for the sender's domain (two 451 4.4.3), then is
    fixed. The first attempt after that passes SPF, is keyed on the SPF domain (it comes from
    the pool's other network, which greylisting has never seen) and is accepted at once: the
    delay counted from the first deferral has passed. Not greylisted a second time."""
    sender, rcpt = "news@flaky.example", "user-flaky@test.example"
    dns.servfail("flaky.example")
    first_deferral = time.monotonic()
    for attempt in range(TEMPERROR_MAX_DEFERS):
        deferred = bh("192.0.2.40", sender, [rcpt])
        assert deferred.rcpt[0].startswith("451 4.4.3 "), (attempt, deferred.describe())
        assert_daemon_answered(deferred, policyd)
    last_deferral = time.monotonic()
    assert dns.queries("flaky.example", "TXT"), "the SERVFAIL questions never reached DNS"

    dns.heal("flaky.example")
    dns.clear_log()
    # The daemon remembers a DNS failure for FAILURE_TTL: past it, SPF asks again and passes.
    sleep_until(max(last_deferral + FAILURE_TTL, first_deferral + GREYLIST_DELAY) + 0.2)
    accepted = bh("198.51.100.40", sender, [rcpt])
    assert accepted.rcpt_codes == [250], accepted.describe()
    assert_daemon_answered(accepted, policyd)
    assert dns.queries("flaky.example", "TXT"), "SPF did not ask again after the fix"


# --------------------------------------------------------------------------------------------
# 4. greylisting keyed on the SPF-pass domain


def test_retry_from_another_network_of_the_spf_pool_passes(bh: Bh, policyd: Policyd) -> None:
    sender, rcpt = "news@pool.example", "user-pool@test.example"
    first_seen = time.monotonic()
    first = bh("192.0.2.10", sender, [rcpt])
    (rcpt_answer,) = first.rcpt
    assert rcpt_answer.startswith("451 4.7.1 "), first.describe()
    assert_daemon_answered(first, policyd)

    sleep_until(first_seen + GREYLIST_DELAY)
    deadline = time.monotonic() + SLACK
    while (retry := bh("198.51.100.7", sender, [rcpt])).rcpt_codes != [250]:
        assert retry.rcpt[0].startswith("451 4.7.1 "), retry.describe()
        assert time.monotonic() < deadline, "the pool's other network is still greylisted"
        time.sleep(0.1)
    assert_daemon_answered(retry, policyd)


def test_wide_open_record_keeps_network_keying(bh: Bh, policyd: Policyd) -> None:
    sender, rcpt = "news@open.example", "user-open@test.example"
    first_seen = time.monotonic()
    first = bh("192.0.2.11", sender, [rcpt])
    assert first.rcpt[0].startswith("451 4.7.1 "), first.describe()

    sleep_until(first_seen + GREYLIST_DELAY + 0.2)
    # SPF passes (+all), but a retry from another network is a new client: greylisted again.
    other = bh("198.51.100.8", sender, [rcpt])
    assert other.rcpt[0].startswith("451 4.7.1 "), other.describe()
    assert_daemon_answered(other, policyd)
    # The first network itself passes after the delay (the entry was network-keyed).
    same = bh("192.0.2.11", sender, [rcpt])
    assert same.rcpt_codes == [250], same.describe()


# --------------------------------------------------------------------------------------------
# 5. a slow domain does not slow the others


@dataclass(frozen=True)
class Timed:
    result: BhResult
    started: float
    ended: float

    @property
    def elapsed(self) -> float:
        return self.ended - self.started


def test_slow_domain_does_not_slow_other_domains(
    exim: Exim, policyd: Policyd, dns: DnsServer
) -> None:
    client = "192.0.2.50"

    def timed(sender: str) -> Timed:
        started = time.monotonic()
        result = exim.bh(client, sender, [WHITELISTED_RCPT], socket_path=policyd.socket)
        return Timed(result, started, time.monotonic())

    with ThreadPoolExecutor(max_workers=1 + FAST_DOMAINS) as pool:
        slow_future = pool.submit(timed, "news@slow.example")
        # In flight once its question reached the DNS server (which holds the answer 5 s).
        wait_until(lambda: bool(dns.queries("slow.example", "TXT")), "the slow domain's query", 5)
        assert not slow_future.done()
        # Every fast domain needs a real DNS round trip of its own while the slow one waits.
        fast_futures = [pool.submit(timed, f"news@fast{n}.example") for n in range(FAST_DOMAINS)]
        fast = [future.result(timeout=10) for future in fast_futures]
        slow = slow_future.result(timeout=10)

    print(
        f"\nslow domain: {slow.elapsed * 1000:.0f} ms; fast domains asked while it was in "
        "flight: " + ", ".join(f"{one.elapsed * 1000:.0f} ms" for one in fast)
    )
    for n, one in enumerate(fast):
        assert one.result.rcpt_codes == [250], one.result.describe()
        assert_daemon_answered(one.result, policyd)
        assert dns.queries(f"fast{n}.example", "TXT"), f"fast{n}.example was not asked"
        assert one.elapsed < FAST_LIMIT, [f.elapsed for f in fast]
        assert one.ended < slow.ended, "a fast question ended after the slow one: no overlap"
    # The slow one: a temperror from the daemon once the SPF budget ran out, within the
    # daemon's deadline; not Exim's readsocket timeout (the fragments would log a fail-open),
    # and not the deadline fallback (configured "accept": that would have been a 250).
    (rcpt,) = slow.result.rcpt
    assert rcpt.startswith("451 4.4.3 "), slow.result.describe()
    assert "slow.example" in rcpt, rcpt
    assert_daemon_answered(slow.result, policyd)
    assert SPF_TIMEOUT <= slow.elapsed < DEADLINE, slow.elapsed
