"""Least privilege on NATS: what each service may publish and subscribe to, and nothing more.

The rewriter publishes queue entries and writes new bodies, nothing more (it creates, changes,
purges and reads nothing); the relay consumes the queue, reads and writes bodies, keeps its
delivery records and publishes reports and events, but cannot touch the policy's buckets; the
policy has its three KV buckets (and follows the lockout counters' writes as the server
republishes them), and reads the app passwords (writing only their last-used times); the
internet-facing frontend has no NATS access at all (its messages reach the queue through the
rewriter). ``submitctl`` (the operator's side) writes and revokes app
passwords and does nothing else. Each service answers on its own inbox prefix
(``_INBOX_<service>``), so no service can listen to another's replies.

No service creates or changes a stream or a consumer: a stream's configuration can republish
its writes anywhere in the account or source another stream into it, and a consumer's can aim
deliveries at any subject, so whoever may write one has every stream's content. ``provision``
(submitd_common.provision, run before each service starts with a password only it is given)
creates and updates them, and may neither publish nor read a single message.

The chart carries the same grants (``services.<name>.nats`` in values.yaml; a test keeps the two
equal) and the local stack (``submitd_devkit``) writes them into its nats.conf.
"""

from __future__ import annotations

import json

from submitd_common import jetstream as q
from submitd_common.apppasswords import USED

API = "$JS.API"


def _stream(stream: str, *ops: str) -> list[str]:
    return [f"{API}.STREAM.{op}.{stream}" for op in ops]


def _direct_get(stream: str) -> list[str]:
    # By sequence (``$JS.API.DIRECT.GET.<stream>``) and last-by-subject (``...<stream>.<subject>``).
    return [f"{API}.DIRECT.GET.{stream}", f"{API}.DIRECT.GET.{stream}.>"]


def _kv(bucket: str) -> list[str]:
    stream = f"KV_{bucket}"
    return [f"$KV.{bucket}.>", *_stream(stream, "INFO", "MSG.GET"), *_direct_get(stream)]


_BODIES = f"OBJ_{q.BODY_BUCKET}"
_BODY_STORE = [
    f"$O.{q.BODY_BUCKET}.>",  # chunks and the object's meta record
    *_stream(_BODIES, "INFO", "PURGE", "MSG.GET"),
    *_direct_get(_BODIES),
]
_POLICY_BUCKETS = [q.COUNTERS_BUCKET, q.AUTHFAIL_BUCKET, q.AUTHKNOWN_BUCKET, q.APPPASSWORDS_BUCKET]
_RELAY_BUCKETS = [q.DELIVERY_BUCKET, q.TLSRPT_BUCKET, q.MTA_STS_BUCKET]
_DURABLE = q.RELAY_DURABLE
# App passwords are read without a consumer (submitd_common.apppasswords): a consumer grant would
# let its holder aim deliveries at any subject.
_APP = q.APPPASSWORDS_BUCKET
_APP_READ = [*_stream(f"KV_{_APP}", "INFO", "MSG.GET"), *_direct_get(f"KV_{_APP}")]

PERMISSIONS: dict[str, dict[str, list[str]]] = {
    # The queue's writer: it publishes new entries and writes new bodies (chunks, then the
    # object's record), and may see whether the stream is there; nothing else. No stream is
    # created, changed or purged by it, no body read; an abandoned write's chunks go by the relay.
    "rewriter": {
        "publish": [
            q.SUBMIT_SUBJECT,
            *_stream(q.STREAM, "INFO"),
            *_stream(_BODIES, "INFO"),
            f"$O.{q.BODY_BUCKET}.C.>",
            f"$O.{q.BODY_BUCKET}.M.>",
            q.ABANDONED_SUBJECT,
        ],
        "subscribe": ["_INBOX_rewriter.>"],
    },
    "policy": {
        "publish": [
            *_kv(q.COUNTERS_BUCKET), *_kv(q.AUTHFAIL_BUCKET), *_kv(q.AUTHKNOWN_BUCKET),
            # App passwords: read them, follow their changes, record when each was last used.
            # Never write or purge one.
            *_APP_READ, f"$KV.{_APP}.{USED}.>",
        ],
        # Lockout counters: their writes as stored, republished by the server (the buckets'
        # own subjects also carry compare-and-sets that lost); the budgets of COUNTERS only.
        "subscribe": ["_INBOX_policy.>", f"$KV.{_APP}.>", q.mirror_subject(q.AUTHFAIL_BUCKET),
                      q.mirror_subject(q.COUNTERS_BUCKET, q.BUDGET_KEYS)],
    },
    "relay": {
        "publish": [
            q.SUBMIT_SUBJECT,  # reports (DSNs) and the admin API's retries
            f"{q.EVENTS_PREFIX}.>",
            *_stream(q.STREAM, "INFO", "MSG.GET", "MSG.DELETE"),
            f"{API}.CONSUMER.INFO.{q.STREAM}.{_DURABLE}",
            f"{API}.CONSUMER.MSG.NEXT.{q.STREAM}.{_DURABLE}",
            f"$JS.ACK.{q.STREAM}.{_DURABLE}.>",
            *_BODY_STORE,
            *_kv(q.DELIVERY_BUCKET),
            *_kv(q.TLSRPT_BUCKET),  # TLS-RPT counts, shared by the replicas
            *_kv(q.MTA_STS_BUCKET),  # MTA-STS policies, shared by the replicas
        ],
        "subscribe": ["_INBOX_relay.>", q.ABANDONED_SUBJECT],
    },
    # Not a service: each service's provisioning (submitd_common.provision), run before it starts
    # (the chart's init containers). It makes and changes the streams, buckets and the relay's
    # consumer, and reads their configuration; no message, no publish, no other stream.
    "provision": {
        "publish": [
            *_stream(q.STREAM, "INFO", "CREATE", "UPDATE"),
            *_stream(_BODIES, "INFO", "CREATE", "UPDATE"),
            *[a for b in _POLICY_BUCKETS + _RELAY_BUCKETS for a in _stream(f"KV_{b}", "INFO", "CREATE", "UPDATE")],
            f"{API}.CONSUMER.CREATE.{q.STREAM}.{_DURABLE}",
            f"{API}.CONSUMER.CREATE.{q.STREAM}.{_DURABLE}.>",
            f"{API}.CONSUMER.DURABLE.CREATE.{q.STREAM}.{_DURABLE}",
            f"{API}.CONSUMER.INFO.{q.STREAM}.{_DURABLE}",
        ],
        "subscribe": ["_INBOX_provision.>"],
    },
    # Not a service: the operator's command line (``submitctl app-password``), with a user of its
    # own. It adds and revokes app passwords; the bucket is policy's to create.
    "submitctl": {
        "publish": [f"$KV.{_APP}.>", *_APP_READ],
        "subscribe": ["_INBOX_submitctl.>"],
    },
}


def inbox_prefix(user: str) -> str:
    return f"_INBOX_{user}"


def authorization_block(passwords: dict[str, str], admin_password: str | None = None) -> str:
    """The nats.conf ``authorization`` block: one user per service with its grants, and
    optionally an ``admin`` user with every permission (the local stack's operator and tests)."""
    users = []
    for service, password in passwords.items():
        grants = PERMISSIONS[service]
        users.append(
            f"    {{user: {json.dumps(service)}, password: {json.dumps(password)}, permissions: {{"
            f"publish: {{allow: {json.dumps(grants['publish'])}}}, "
            f"subscribe: {{allow: {json.dumps(grants['subscribe'])}}}}}}}"
        )
    if admin_password is not None:
        users.append(f"    {{user: \"admin\", password: {json.dumps(admin_password)}}}")
    return "authorization {\n  users: [\n" + "\n".join(users) + "\n  ]\n}\n"


if __name__ == "__main__":  # the chart's copy: python -m submitd_common.natsauth > helm/submitd/files/nats-grants.json
    print(json.dumps(PERMISSIONS, indent=2))
