"""Prometheus metrics of the relay (no addresses in labels)."""

import re
import time

from prometheus_client import Counter, Gauge, Histogram

ATTEMPTS = Counter("submitd_delivery_attempts_total", "Delivery attempts by result and next hop", ["result", "next_hop"])
RECIPIENTS = Counter("submitd_delivery_recipients_total", "Recipient outcomes", ["result"])
DELIVERY_LATENCY = Histogram(
    "submitd_delivery_seconds", "From acceptance to delivery",
    buckets=(0.1, 0.5, 1, 5, 30, 60, 300, 900, 3600, 14400, 86400, 432000),
)
QUEUE_DEPTH = Gauge("submitd_queue_messages", "Messages in the queue stream")
QUEUE_BYTES = Gauge("submitd_queue_bytes", "Bytes in the queue stream")
QUEUE_OLDEST = Gauge("submitd_queue_oldest_age_seconds", "Age of the oldest queued message")
CONSUMER_LAG = Gauge("submitd_consumer_pending", "Messages not yet handed to a relay")
IN_FLIGHT = Gauge("submitd_consumer_ack_pending", "Messages handed out and not yet acknowledged")
EVENTS = Counter("submitd_delivery_events_total", "Outcome events published on NATS", ["event"])
ORPHANS = Counter("submitd_orphaned_bodies_removed_total", "Message bodies no queue entry referred to")
DUPLICATES_AVOIDED = Counter(
    "submitd_delivery_duplicates_avoided_total", "Redeliveries of a message already delivered, caught by its record")
POSSIBLE_DUPLICATES = Counter(
    "submitd_delivery_possible_duplicates_total",
    "Redelivered messages with no record, delivered again: a copy may have gone before (an ack lost, a relay killed)")
REPORTS = Counter("submitd_dsn_total", "Delivery status notifications queued", ["action"])
UNSIGNED = Counter("submitd_dsn_unsigned_total", "Reports queued without the rewriter (none configured, or it refused)")
STRANDED = Counter(
    "submitd_queue_stranded_total",
    "Queue entries the consumer had passed but the stream still held, by what was done "
    "(delivered: removed; requeued: queued again for delivery; body_gone, unreadable: removed)",
    ["outcome"],
)
UNACCOUNTED = Gauge("submitd_queue_unaccounted", "Queue entries neither pending nor in flight at the last check")
WITHDRAWALS = Counter(
    "submitd_queue_withdrawals_total",
    "Publishes the frontend answered 451 for and withdrew, by outcome (removed: taken out before delivery; "
    "too_late, delivered_meanwhile, in_flight: it had gone or was going, a possible duplicate; nothing_stored)",
    ["outcome"],
)
UNSENDABLE = Counter(
    "submitd_delivery_unsendable_total",
    "Messages (or reports) never sent because they break SMTP's line rules: bare CR or LF, NUL, a line over 998 octets",
)
TLS_POLICY = Counter(
    "submitd_relay_tls_policy_total",
    "TLS sessions to MX hosts by the policy that applied (tlsa, sts, no-policy-found) and their result "
    "(success, or the RFC 8460 result type of the failure)",
    ["policy", "result"],
)
TLS_REPORTS = Counter(
    "submitd_relay_tls_reports_total",
    "TLS reports (RFC 8460) by what became of each rua: https (POSTed and accepted), mailto (queued), failed "
    "(not reached or refused); no-record: a domain with counts that publishes no TLSRPT record",
    ["result"],
)


_ADDRESS = re.compile(r"[^\s<>()\[\]\"',;:]+@([A-Za-z0-9.\-\[\]:]+)")


def domains_only(text: str) -> str:
    """Addresses in a next hop's reply cut down to their domains, for traces."""
    return _ADDRESS.sub(lambda m: f"…@{m.group(1)}", text)


def count_attempt(qmsg, outcome, result: str, span, *, smarthost: bool, trace_addresses: bool) -> None:
    """One delivery attempt in the metrics and on its span."""
    ATTEMPTS.labels(result, outcome.next_hop if smarthost else "mx").inc()
    for name, count in (("delivered", len(outcome.delivered)), ("deferred", len(outcome.temporary)),
                        ("failed", len(outcome.permanent))):
        if count:
            RECIPIENTS.labels(name).inc(count)
    if outcome.delivered:
        DELIVERY_LATENCY.observe(max(0.0, time.time() - qmsg.received_at_ms / 1000))
    span.set_attribute("submitd.outcome", result)
    replies = {**outcome.temporary, **outcome.permanent}
    if replies:
        texts = sorted(set(replies.values()))[:5]
        span.set_attribute("smtp.reply", texts if trace_addresses else [domains_only(t) for t in texts])
    span.set_attribute("submitd.delivered", len(outcome.delivered))
    span.set_attribute("submitd.deferred", len(outcome.temporary))
    span.set_attribute("submitd.failed", len(outcome.permanent))
