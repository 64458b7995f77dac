"""Prometheus metrics of bearer token checks (no logins, no tokens in labels)."""

from prometheus_client import Counter, Histogram

VALIDATIONS = Counter(
    "submitd_policy_oauth_validations_total",
    "Bearer tokens checked, by mode and outcome (valid, refused, unavailable; cached: a token already "
    "checked, within its cache time)",
    ["mode", "outcome"],
)
PROVIDER_REQUESTS = Counter(
    "submitd_policy_oauth_provider_requests_total",
    "Requests to the OpenID Connect provider by kind (discovery, jwks, userinfo, introspection) and HTTP "
    "status (error: no answer)",
    ["request", "status"],
)
PROVIDER_SECONDS = Histogram(
    "submitd_policy_oauth_provider_seconds", "Latency of one request to the provider", ["request"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
KEY_REFRESHES = Counter(
    "submitd_policy_oauth_key_refreshes_total",
    "Reads of the provider's signing keys, by reason (first, schedule, unknown_key) and outcome (ok, failed)",
    ["reason", "outcome"],
)
