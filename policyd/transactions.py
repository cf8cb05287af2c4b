"""What the daemon remembers about one SMTP transaction (or connection) between questions.

Exim asks the same daemon for every recipient and then once at DATA, tagging each question
with the transaction id the snippet made at the first RCPT. Memory is bounded by a named
entry limit and an age limit: the oldest transactions are forgotten first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from .model import Action, Verdict

if TYPE_CHECKING:
    from .checks.spf import SpfOutcome

#: Transactions (and, in a second map, connections) remembered at once. An entry is ~430
#: bytes measured, so each map holds ~2 MiB at most. Exim's smtp_accept_max defaults to 20
#: concurrent connections: 5,000 open transactions is far beyond any small host's load, and
#: forgetting the oldest one only means a per-message limit may count it again.
MAX_TRANSACTIONS: Final = 5_000
#: An SMTP transaction outliving this is forgotten (RFC 5321 §4.5.3.2 timeouts sum to ~1 h).
MAX_TRANSACTION_AGE: Final = 3600.0


@dataclass(slots=True)
class Transaction:
    """Per-message facts gathered at RCPT and used again later in the same message."""

    started: float
    #: The greylist outcome of the first greylisted recipient (multi_recipient = "first").
    greylist: Action | None = None
    #: Longest delay imposed on a recipient of this message by greylisting, in seconds.
    delayed: float = 0.0
    #: Rate rules that count messages/connections and were already charged here, so a
    #: message asked about at every RCPT and again at DATA is counted once.
    rate_charged: frozenset[str] = frozenset()
    #: A per-message/connection refusal, repeated for the rest of the transaction.
    rate_refused: Verdict | None = None
    #: The SPF outcome, evaluated at the first RCPT; its headers are given at DATA.
    spf: SpfOutcome | None = None


class TransactionMemory:
    """A bounded map of transaction id → Transaction, oldest evicted first."""

    def __init__(
        self, max_entries: int = MAX_TRANSACTIONS, max_age: float = MAX_TRANSACTION_AGE
    ) -> None:
        self.max_entries = max_entries
        self.max_age = max_age
        self._entries: OrderedDict[str, Transaction] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, txn: str, now: float) -> Transaction | None:
        """The transaction if known and young enough; '' (no id) is never remembered."""
        if not txn:
            return None
        entry = self._entries.get(txn)
        if entry is not None and now - entry.started > self.max_age:
            del self._entries[txn]
            return None
        return entry

    def setdefault(self, txn: str, now: float) -> Transaction:
        """The transaction, created if new; a throwaway one when there is no id."""
        entry = self.get(txn, now)
        if entry is not None:
            return entry
        entry = Transaction(started=now)
        if txn:
            self._entries[txn] = entry
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return entry
