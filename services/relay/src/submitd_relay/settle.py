"""What to do once a delivery attempt is over, decided without I/O.

``plan()`` takes the attempt's outcome, the message's delivery record as it stands, its envelope
and age, and the settings, and says: the attempt's result, whether the record must be written
before anything else, which reports (DSNs) to queue, whether the message failed (bounced or
expired), who is finished afterwards, and whether the message is acked or naked with which
delay. The consumer carries the plan out in that order (``Relay._settle``); the table of cases
is tested without NATS or SMTP (services/relay/tests/test_settle.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from submitd.v1 import queue_pb2

from . import dsn
from .model import Outcome


@dataclass(frozen=True)
class Plan:
    result: str  # delivered | deferred | failed | partial | expired
    expired: bool
    record_first: bool  # write the record before anything else (a crash then sends to nobody twice)
    reports: list[tuple[str, list[dsn.RecipientStatus]]]  # (failed | delayed | relayed, statuses), in order
    null_return_path: bool  # reports were due, but the return path is null: none is sent
    failed: list[dsn.RecipientStatus]  # bounced now (permanent failures, or all of an expired message)
    delay_notified: bool  # the record says a delay report went out (now or before)
    finished: list[str] = field(default_factory=list)  # finished after this attempt, in envelope order
    record_again: bool = False  # the record changed after the reports: written once more
    ack: bool = False  # every recipient is finished: ack (and remove the body); else nak
    retry_in: float = 0.0  # with a nak: seconds before the next attempt


def plan(outcome: Outcome, finished: list[str], delay_notified: bool, revision: int,
         envelope: queue_pb2.Envelope, age: float, *, max_lifetime: float, delay_warning_after: float,
         backoff: float) -> Plan:
    """``finished`` and ``delay_notified``: the record before this attempt (``revision`` 0 when
    there was none); ``backoff``: the delay before the next attempt if one is needed."""
    expired = bool(outcome.temporary) and age > max_lifetime
    kinds = [k for k, v in (("delivered", outcome.delivered), ("deferred", outcome.temporary),
                            ("failed", outcome.permanent)) if v]
    result = "expired" if expired else kinds[0] if len(kinds) == 1 else "partial"
    by_address = {r.address: r for r in envelope.recipients}

    def status(address: str, action: str, reply: str, **extra) -> dsn.RecipientStatus:
        return dsn.RecipientStatus(by_address[address], action, reply, outcome.remote.get(address, ""), **extra)

    relayed = [status(a, "relayed", f"250 2.0.0 relayed to {outcome.remote.get(a, '')}")
               for a in outcome.delivered if a in outcome.without_dsn and dsn.wants(by_address[a], "SUCCESS")]
    # A message delivered in full at its first try with no report to send needs no record
    # before its ack: its ack is its record (a crash before it sends again either way).
    record_first = bool(revision) or result != "delivered" or bool(relayed)
    failed = [status(a, "failed", reply) for a, reply in outcome.permanent.items()]
    if expired:
        days = max_lifetime / 86400
        failed += [status(a, "failed", reply, status="4.4.7", note=f"given up after {days:g} days in the queue")
                   for a, reply in outcome.temporary.items()]
    delayed = []
    if not expired and not delay_notified and age >= delay_warning_after:
        delayed = [status(a, "delayed", reply) for a, reply in outcome.temporary.items()
                   if dsn.wants(by_address[a], "DELAY")]
    failures = [f for f in failed if dsn.wants(f.recipient, "FAILURE")]
    due = [(kind, statuses) for kind, statuses in (("failed", failures), ("delayed", delayed), ("relayed", relayed))
           if statuses]
    now_finished = list(finished)
    for address in [*outcome.delivered, *(f.recipient.address for f in failed)]:
        if address not in now_finished:
            now_finished.append(address)
    remaining = [r for r in envelope.recipients if r.address not in now_finished]
    return Plan(
        result=result,
        expired=expired,
        record_first=record_first,
        reports=due if envelope.return_path else [],
        null_return_path=bool(due) and not envelope.return_path,
        failed=failed,
        delay_notified=delay_notified or bool(delayed),
        finished=now_finished,
        record_again=bool(failed or delayed or relayed),
        ack=not remaining,
        retry_in=0.0 if not remaining else backoff,
    )
