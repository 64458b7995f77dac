"""What the policy service works with on NATS, from its settings: the rate and AUTH-budget
counters, the lockouts, the addresses each login came from, and (with app passwords) the bucket
submitctl writes them to. Made by provisioning (``python -m submitd_policy provision``,
submitd_common.provision), opened by the policy."""

from __future__ import annotations

from submitd_common import jetstream
from submitd_common.jetstream import KvSpec


def counters(settings) -> KvSpec:
    """Windowed counters (rates, the logins' AUTH failure budgets) live two windows; the budgets'
    writes are republished for every replica's mirror (mirror.py)."""
    windows = max(2 * settings.rate_window, 2 * settings.auth_login_budget_seconds, 60)
    return KvSpec(jetstream.COUNTERS_BUCKET, windows, settings.replicas, mirror_keys=jetstream.BUDGET_KEYS)


def lockouts(settings) -> KvSpec:
    return KvSpec(jetstream.AUTHFAIL_BUCKET, settings.auth_lockout_seconds, settings.replicas, mirror_keys=">")


def known_addresses(settings) -> KvSpec:
    return KvSpec(jetstream.AUTHKNOWN_BUCKET, settings.auth_known_address_seconds, settings.replicas)


def app_passwords(settings) -> KvSpec:
    """Kept until revoked (no TTL)."""
    return KvSpec(jetstream.APPPASSWORDS_BUCKET, 0, settings.replicas)


def plan(settings) -> dict:
    buckets = [counters(settings), lockouts(settings), known_addresses(settings)]
    if settings.app_passwords:
        buckets.append(app_passwords(settings))
    return {"buckets": buckets}
