"""Frozen value types shared by every layer: the question Exim asks and the verdict we give."""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Stage(enum.Enum):
    """The ACL that asks (design.md §1): once per recipient at RCPT, once per message at DATA."""

    RCPT = "rcpt"
    DATA = "data"


class Action(enum.Enum):
    """First word of the answer; the Exim snippets match on it."""

    ACCEPT = "ok"
    DEFER = "defer"
    REJECT = "reject"
    ERROR = "error"


@dataclass(slots=True)
class Query:
    """One question from Exim, decoded and normalised (client address in canonical form).

    Treated as immutable, but not ``frozen``: a frozen dataclass's ``__init__`` sets every
    field through ``object.__setattr__`` (~4x the cost), and one is built per question."""

    stage: Stage
    client: IPAddress
    helo: str = ""
    #: client host name as Exim verified it (forward-confirmed), '' when unknown
    host: str = ""
    sender: str = ""
    recipient: str = ""
    recipients: tuple[str, ...] = ()
    auth: str = ""
    #: asked from the outbound fragment: the client is a relay host or authenticated
    relay: bool = False
    txn: str = ""
    conn: str = ""
    nrcpt: int = 0
    size: int = 0
    body_size: int = 0
    lines: int = 0
    msgid: str = ""
    port: int = 0
    #: when Exim asked (``t=``, microseconds since the epoch); 0 when not sent
    asked: int = 0
    #: ``skipdata=1``: the fragment asks at DATA only if an RCPT answer did not say
    #: ``skipdata``, and adds the header lines the RCPT answers carried (docs/protocol.md)
    skip_data: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one check (or the whole dispatcher) decided.

    ``check`` and ``reason`` name the decision for logs and metrics; ``headers`` are complete
    header lines (``Name: value``) for the DATA ACL to add; ``skip_data`` (RCPT answers only)
    tells the fragment that no DATA question is needed for this recipient.
    """

    action: Action
    code: int = 0
    ecode: str = ""
    text: str = ""
    check: str = ""
    reason: str = ""
    headers: tuple[str, ...] = field(default=())
    skip_data: bool = False

    @property
    def is_final(self) -> bool:
        """A defer or reject ends the evaluation; later checks are not asked."""
        return self.action in (Action.DEFER, Action.REJECT)


ACCEPT = Verdict(Action.ACCEPT)
