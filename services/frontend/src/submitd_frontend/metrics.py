"""Prometheus metrics of the frontend (low cardinality: no addresses in labels)."""

import re

from prometheus_client import Counter, Gauge, Histogram

SESSIONS_ACTIVE = Gauge("submitd_smtp_sessions_active", "SMTP sessions open now")
SESSIONS = Counter("submitd_smtp_sessions_total", "SMTP sessions accepted")
TLS = Counter("submitd_smtp_tls_total", "TLS sessions by protocol version", ["version"])
TLS_FAILURES = Counter("submitd_smtp_tls_handshake_failures_total", "Implicit-TLS handshakes that failed or timed out")
PROXY_REFUSED = Counter(
    "submitd_smtp_proxy_refused_total", "Connections to a PROXY port closed before any SMTP: untrusted_peer (not in "
    "PROXY_TRUSTED_NETWORKS: nothing read) or invalid_header (a missing or broken PROXY header)", ["reason"],
)
for _reason in ("untrusted_peer", "invalid_header"):
    PROXY_REFUSED.labels(_reason)
AUTH = Counter("submitd_smtp_auth_total", "AUTH attempts by result", ["result"])
REPLIES = Counter("submitd_smtp_replies_total", "Replies sent, by class and enhanced code", ["code_class", "enhanced"])
MESSAGES = Counter("submitd_messages_total", "Messages at end of data, by outcome and reply code", ["outcome", "code"])
SIZE = Histogram(
    "submitd_message_size_bytes", "Size of accepted messages",
    buckets=(1e3, 4e3, 16e3, 64e3, 256e3, 1e6, 4e6, 16e6, 64e6),
)
EOD_LATENCY = Histogram("submitd_end_of_data_seconds", "End of data to the final reply (rewrite and queue)")
BACKEND_LATENCY = Histogram("submitd_backend_call_seconds", "Policy verdicts and rewriter calls", ["backend"])

_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")
_reply_counters: dict[str, Counter] = {}


def count_reply(text: str) -> None:
    """One reply, by class and enhanced code (the label lookup is made once per kind)."""
    last = text.rsplit("\n", 1)[-1]
    enhanced = last[4:].split(" ", 1)[0]
    key = last[:1] + enhanced
    counter = _reply_counters.get(key)
    if counter is None:
        counter = REPLIES.labels(f"{last[:1]}xx", enhanced if _ENHANCED.match(enhanced) else "")
        if len(_reply_counters) < 1000:  # bounded whatever a client provokes
            _reply_counters[key] = counter
    counter.inc()
