"""Prometheus metrics of the policy service (no logins or addresses in labels)."""

from prometheus_client import Counter, Gauge, Histogram

AUTH_CACHE = Counter("submitd_policy_auth_cache_total", "AUTH credential cache look-ups", ["result"])
PASSWORD_VERIFICATIONS = Counter(
    "submitd_policy_password_verifications_total",
    "Password hash verifications by result (busy: refused because the hashing queue was full)",
    ["result"],
)
DECISIONS = Counter("submitd_policy_decisions_total", "Session steps decided, by kind and outcome", ["event", "outcome"])
SESSIONS = Gauge("submitd_policy_sessions", "SMTP sessions policy holds state for (they start at their first question)")
STREAMS = Gauge("submitd_policy_streams", "Session streams open from frontends")
STREAMS_OPENED = Counter("submitd_policy_streams_opened_total", "Session streams opened by frontends")
PASSWORD_HASH_PENDING = Gauge("submitd_policy_password_hash_pending", "Verifications running or waiting")
PASSWORD_HASH_SECONDS = Histogram(
    "submitd_policy_password_hash_seconds", "Wall time of one verification (waiting for a thread included)",
    buckets=(0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

for _result in ("hit", "miss"):
    AUTH_CACHE.labels(_result)
for _result in ("match", "mismatch", "busy"):
    PASSWORD_VERIFICATIONS.labels(_result)

DIRECTORY_REQUESTS = Counter(
    "submitd_policy_directory_requests_total",
    "Requests to a directory by operation (lookup, check_password) and outcome "
    "(found, unknown, match, mismatch, unavailable)",
    ["directory", "operation", "outcome"],
)
DIRECTORY_SECONDS = Histogram(
    "submitd_policy_directory_seconds", "Latency of one directory request", ["directory", "operation"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
DIRECTORY_CACHE = Counter(
    "submitd_policy_directory_cache_total",
    "Login look-ups by where the answer came from: fresh (cached within the TTL), stale (cached, served "
    "within the grace while a directory was down), miss (asked the directories)",
    ["result"],
)
for _result in ("fresh", "stale", "miss"):
    DIRECTORY_CACHE.labels(_result)
