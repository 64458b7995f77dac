"""The settlement of a delivery attempt as a table: outcome, record, envelope and age in; what
to record, which reports, who is finished, ack or nak out (no NATS, no SMTP)."""

from __future__ import annotations

import pytest

from submitd.v1 import common_pb2
from submitd_relay.model import Outcome
from submitd_relay.settle import plan

DAY = 86400.0
A, B = "a@example.net", "b@example.net"


def envelope(return_path: str = "s@example.test", notify: str = "") -> common_pb2.Envelope:
    return common_pb2.Envelope(queue_id="Q", return_path=return_path,
                               recipients=[common_pb2.Recipient(address=a, notify=notify) for a in (A, B)])


def outcome(delivered=(), temporary=None, permanent=None, without_dsn=()) -> Outcome:
    return Outcome(delivered=list(delivered), temporary=dict(temporary or {}), permanent=dict(permanent or {}),
                   remote={A: "mx.example.net", B: "mx.example.net"}, without_dsn=set(without_dsn), next_hop="mx")


def settled(o: Outcome, env=None, *, finished=(), notified=False, revision=0, age=60.0):
    return plan(o, list(finished), notified, revision, env or envelope(), age,
                max_lifetime=5 * DAY, delay_warning_after=4 * 3600, backoff=300.0)


def kinds(p) -> list[tuple[str, list[str]]]:
    return [(kind, [s.recipient.address for s in statuses]) for kind, statuses in p.reports]


@pytest.mark.parametrize(
    "case, o, kw, want",
    [
        ("all delivered at the first try: no record before the ack, nothing to report",
         outcome([A, B]), {}, dict(result="delivered", record_first=False, reports=[], ack=True)),
        ("all delivered on a retry: the record exists, so it is written first",
         outcome([A, B]), {"revision": 7, "finished": []}, dict(result="delivered", record_first=True, ack=True)),
        ("one deferred: recorded first, nak with the backoff",
         outcome([A], {B: "451 4.3.0 later"}), {},
         dict(result="partial", record_first=True, reports=[], ack=False, retry_in=300.0, finished=[A])),
        ("one refused: a failure report for it, then the ack",
         outcome([A], permanent={B: "550 5.1.1 no such user"}), {},
         dict(result="partial", reports=[("failed", [B])], ack=True, finished=[A, B], record_again=True)),
        ("refused to a null return path: no report, still finished",
         outcome(permanent={A: "550 5.1.1", B: "550 5.1.1"}), {"env": envelope(return_path="")},
         dict(result="failed", reports=[], null_return_path=True, ack=True)),
        ("NOTIFY=NEVER: no failure report",
         outcome(permanent={A: "550 5.1.1", B: "550 5.1.1"}), {"env": envelope(notify="NEVER")},
         dict(result="failed", reports=[], null_return_path=False, ack=True)),
        ("deferred past the lifetime: expired, both bounced with 4.4.7",
         outcome(temporary={A: "451 4.3.0", B: "451 4.3.0"}), {"age": 6 * DAY},
         dict(result="expired", expired=True, reports=[("failed", [A, B])], ack=True)),
        ("deferred past the delay warning, NOTIFY=DELAY: one delay report, then nak",
         outcome(temporary={A: "451 4.3.0", B: "451 4.3.0"}), {"age": 5 * 3600, "env": envelope(notify="DELAY,FAILURE")},
         dict(result="deferred", reports=[("delayed", [A, B])], delay_notified=True, ack=False)),
        ("the delay report went out before: not again",
         outcome(temporary={A: "451 4.3.0", B: "451 4.3.0"}),
         {"age": 6 * 3600, "notified": True, "env": envelope(notify="DELAY")},
         dict(reports=[], delay_notified=True, ack=False, record_again=False)),
        ("delivered to a next hop without DSN, NOTIFY=SUCCESS: a relayed report, recorded first",
         outcome([A, B], without_dsn=[A, B]), {"env": envelope(notify="SUCCESS")},
         dict(result="delivered", record_first=True, reports=[("relayed", [A, B])], ack=True)),
        ("a retry finishing the last recipient: finished keeps the earlier one, ack",
         outcome([B]), {"finished": [A], "revision": 3}, dict(finished=[A, B], ack=True)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_settlement(case, o, kw, want):
    env = kw.pop("env", None)
    p = settled(o, env, **kw)
    got = {k: (kinds(p) if k == "reports" else getattr(p, k)) for k in want}
    assert got == want, case


def test_an_expired_bounce_says_why_and_keeps_the_last_reply():
    p = settled(outcome(temporary={A: "451 4.3.0 greylisted"}, permanent={B: "550 5.1.1 no"}), age=6 * DAY)
    (kind, statuses), = p.reports
    by = {s.recipient.address: s for s in statuses}
    assert (by[A].status, by[A].reply, by[A].note) == ("4.4.7", "451 4.3.0 greylisted", "given up after 5 days in the queue")
    assert (by[B].status, by[B].reply) == ("", "550 5.1.1 no")
