"""``policyctl explain``: the decision each check would take for a question now, and why,
computed from the stored state with the same pure cores, without changing anything.

The question is treated as the first recipient of a new transaction (no earlier recipient
of the same message to follow, nothing counted yet for it).
"""

from __future__ import annotations

from typing import Any

from .checks.greylist import step
from .checks.ratelimit import decide_all, verdict_for
from .dispatch import Dispatcher, spf_pass_domain
from .model import ACCEPT, Query, Verdict
from .protocol import format_answer


def _verdict_fields(verdict: Verdict) -> dict[str, Any]:
    return {
        "action": verdict.action.value,
        "reason": verdict.reason,
        "answer": format_answer(verdict).decode("ascii"),
    }


async def explain(dispatcher: Dispatcher, query: Query, now: float) -> dict[str, Any]:
    """Per-check findings and the answer the next real question would get."""
    store = dispatcher.raw_store.admin
    checks: list[dict[str, Any]] = []
    final: Verdict | None = None

    spf = await dispatcher.spf.check(query, now) if dispatcher.spf is not None else None
    if spf is not None:
        checks.append(
            {
                "check": "spf",
                "result": spf.result.value if spf.result is not None else None,
                "identity": spf.identity.value if spf.identity is not None else None,
                "domain": spf.domain,
                "skipped": spf.skipped,
                "greylist_domain": spf.greylist_domain,
                **_verdict_fields(spf.verdict),
            }
        )
        if spf.verdict.is_final:
            final = spf.verdict

    grey = dispatcher.greylist
    skip = grey.skip_reason(query)
    entry = dispatcher.whitelist.match(query, now, spf_pass_domain(spf)) if not skip else None
    if skip:
        checks.append({"check": "greylist", "action": "ok", "reason": skip})
    elif entry is not None:
        checks.append(
            {
                "check": "greylist",
                "action": "ok",
                "reason": f"whitelist-{entry.kind}",
                "entry": {"kind": entry.kind, "value": entry.value, "comment": entry.comment},
            }
        )
    else:
        spf_domain = spf.greylist_domain if spf is not None else None
        triplet_key, client_key = grey.keys(query, spf_domain)
        triplet, client = await store.greylist_peek(triplet_key, client_key)
        extra = spf.extra_greylist_delay if spf is not None else 0.0
        result = step(triplet, client, now, grey.timing_for(extra))
        verdict = grey.verdict(result.status, result.retry_in)
        finding: dict[str, Any] = {
            "check": "greylist",
            "key": triplet_key,
            "status": result.status.value,
            "retry_in": round(result.retry_in, 3),
            **_verdict_fields(verdict),
        }
        if triplet is not None:
            finding["first_seen"] = triplet.first_seen
            finding["attempts"] = triplet.attempts
            finding["passed"] = triplet.passed
        if client is not None:
            finding["client_passes"] = client.passes
        checks.append(finding)
        if verdict.is_final and final is None:
            final = verdict

    limiter = dispatcher.ratelimit
    charges = limiter.charges(query, set())
    if charges and final is None:
        tats = await store.ratelimit_peek([c.key for c in charges])
        decisions, _ = decide_all(tats, charges, now)
        for decision in decisions:
            checks.append(
                {
                    "check": "ratelimit",
                    "rule": decision.charge.rule,
                    "key": decision.charge.key,
                    "cost": decision.charge.cost,
                    "allowed": decision.outcome.allowed,
                    "dry_run": decision.charge.dry_run,
                    "fill": round(decision.outcome.fill, 4),
                    "retry_after": decision.outcome.retry_after,
                }
            )
        limited = verdict_for(decisions, limiter.rules)
        if final is None and limited is not None:
            final = limited
    if final is None:
        final = next(
            (
                Verdict(ACCEPT.action, check="greylist", reason=c["reason"])
                for c in checks
                if c["check"] == "greylist"
            ),
            ACCEPT,
        )
    return {"decision": _verdict_fields(final), "checks": checks}
