"""``policyctl explain``: the answer the next real question would get, and each check's
finding, from the dispatcher itself run over a read-only view of the store.

There is one decision path: ``Dispatcher.read_only`` gives a dispatcher with the live policy,
whitelist and SPF caches over ``stores.readonly.ReadOnlyStore`` (reads and the pure steps,
no writes), and the findings are what it recorded in its ``Trace``. Nothing is changed: no
greylist attempt recorded, no SPF-deferral clock started, no rate limit charged, no SPF
temperror counted towards its give-up rule, no metric or decision line.

The question is treated as the first recipient of a new transaction (no earlier recipient
of the same message to follow, nothing counted yet for it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..checks.greylist import GreylistResult
from ..checks.ratelimit import Decision
from ..dispatch import Dispatcher
from ..model import Query, Verdict
from ..protocol import format_answer
from ..stores import AdminStore
from ..stores.readonly import GreylistRead, ReadOnlyStore

if TYPE_CHECKING:  # SPF needs aiodns and pyspf: imported only when [spf] is enabled
    from ..checks.spf import SpfOutcome


def _verdict_fields(verdict: Verdict) -> dict[str, Any]:
    return {
        "action": verdict.action.value,
        "reason": verdict.reason,
        "answer": format_answer(verdict).decode("ascii"),
    }


async def explain(
    dispatcher: Dispatcher, store: AdminStore, query: Query, now: float
) -> dict[str, Any]:
    """The decision for ``query`` and the findings of the checks the dispatcher asked, in
    the order it asked them (a check after a final verdict is not asked, nor listed)."""
    reads = ReadOnlyStore(store)
    view = dispatcher.read_only(reads)
    verdict = await view.decide(query, now)
    trace = view.trace
    assert trace is not None  # read_only() always gives one
    checks: list[dict[str, Any]] = []
    if trace.spf is not None:
        checks.append(_spf_finding(trace.spf))
    if trace.greylist is not None:
        checks.append(_greylist_finding(trace.greylist, reads.greylist_reads))
    checks.extend(_ratelimit_finding(d) for d in trace.ratelimit)
    return {"decision": _verdict_fields(verdict), "checks": checks}


def _spf_finding(spf: SpfOutcome) -> dict[str, Any]:
    return {
        "check": "spf",
        "result": spf.result.value if spf.result is not None else None,
        "identity": spf.identity.value if spf.identity is not None else None,
        "domain": spf.domain,
        "skipped": spf.skipped,
        "greylist_domain": spf.greylist_domain,
        **_verdict_fields(spf.verdict),
    }


def _greylist_finding(result: GreylistResult, reads: list[GreylistRead]) -> dict[str, Any]:
    """A skip or whitelist (with the runtime entry that matched), or the state machine's
    step over the stored triplet (the view's last read: greylisting steps once per
    question, and the SPF-deferral clock that may also step ends the question first)."""
    finding: dict[str, Any] = {"check": "greylist", **_verdict_fields(result.verdict)}
    if result.entry is not None:
        entry = result.entry
        finding["entry"] = {"kind": entry.kind, "value": entry.value, "comment": entry.comment}
    if result.status is None:
        return finding
    read = reads[-1]
    finding["key"] = read.triplet_key
    finding["status"] = read.step.status.value
    finding["retry_in"] = round(read.step.retry_in, 3)
    if read.triplet is not None:
        finding["first_seen"] = read.triplet.first_seen
        finding["attempts"] = read.triplet.attempts
        finding["passed"] = read.triplet.passed
    if read.client is not None:
        finding["client_passes"] = read.client.passes
    return finding


def _ratelimit_finding(decision: Decision) -> dict[str, Any]:
    return {
        "check": "ratelimit",
        "rule": decision.charge.rule,
        "key": decision.charge.key,
        "cost": decision.charge.cost,
        "allowed": decision.outcome.allowed,
        "dry_run": decision.charge.dry_run,
        "fill": round(decision.outcome.fill, 4),
        "retry_after": decision.outcome.retry_after,
    }
