from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from submitd_common.config import ServiceSettings
from submitd_common.users import ARGON2_DEFAULTS

from .settings_parts.apppasswords import AppPasswordSettings
from .settings_parts.ldap import LdapSettings
from .settings_parts.oauth import OAuthSettings
from .settings_parts.sql import SqlSettings


class Settings(ServiceSettings, LdapSettings, SqlSettings, OAuthSettings, AppPasswordSettings):
    model_config = SettingsConfigDict(env_prefix="SUBMITD_POLICY_", extra="forbid")

    http_listen: str = Field("0.0.0.0:8080", description="/healthz, /readyz and /metrics")
    listen: str = Field("0.0.0.0:50051", description="gRPC listen address host:port")
    grpc_allowed_callers: list[str] = Field(
        ["frontend"], description="Under mutual TLS, the certificate names (commonName) that may call: only the "
        "frontend, whose client addresses the AUTH lockouts count by (the chart names its own certificates)",
    )
    replicas: int = Field(1, description="Replicas of the rate and AUTH-failure KV buckets (3 in a cluster)")
    users_file: str = Field(description="YAML users file: password hashes, grants, permissions, limits")
    dovecot_passwd_file: str | None = Field(None, description="Dovecot passwd-file with more users (migration)")
    reload_interval: float = Field(2.0, description="Seconds between checks of the users files")
    admin_token: str | None = Field(None, description="Bearer token of the users admin API (or ADMIN_TOKEN_FILE)")
    admin_token_file: str | None = Field(None, description="File holding that token (the relay's admin Secret)")
    directories: list[str] = Field(
        ["file"], description="Where logins come from, in order (file, ldap, sql): the first that knows a login answers"
    )
    directory_cache_seconds: float = Field(
        300, description="A remote directory's answer (rights, password hash, a password an LDAP bind accepted) is "
        "used this long: a changed password, a suspended account or new addresses are seen within it"
    )
    directory_grace_seconds: float = Field(
        3600, description="While a directory is down, logins it answered for keep their last answer this much past "
        "directory_cache_seconds (others get 454 4.7.0)"
    )
    directory_timeout: float = Field(5.0, description="Seconds a directory request may take before it counts as down")
    trusted_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs whose clients may submit without AUTH (RFC 6409 §4.3); empty by default",
    )
    auth_mechanisms: list[str] = Field(
        ["PLAIN", "LOGIN", "OAUTHBEARER", "XOAUTH2"],
        description="SASL mechanisms AUTH may offer, in EHLO's order; token mechanisms only when OAuth is configured. "
        "The frontend advertises exactly what policy accepts",
    )
    allow_auth_without_tls: bool = Field(False, description="Accept AUTH on an unencrypted connection")
    local_domains: list[str] = Field(default_factory=list, description="This site's domains (postmaster)")
    complete_domain: str | None = Field(
        None, description="RFC 6409 §4.2: completes single-label domains (user@sales -> user@sales.<this>)"
    )
    local_subdomains: list[str] = Field(
        default_factory=list,
        description="Single labels the site completes (e.g. sales): a multi-level domain ending in one "
        "(squeaky.sales) is incomplete and refused, never expanded (RFC 6409 §4.2)",
    )
    postmaster_without_auth: bool = Field(
        False, description="RFC 6409 §6.4: unauthenticated clients may send to postmaster (and only there)"
    )
    messages_per_hour: int | None = Field(None, description="Default per-user message rate; none: unlimited")
    recipients_per_hour: int | None = Field(None, description="Default per-user recipient rate; none: unlimited")
    rate_window: int = Field(3600, description="Seconds of a rate window")
    auth_failures_per_client: int = Field(10, description="Failed AUTHs from one address before 421 4.7.0")
    auth_failures_per_login: int = Field(
        5, description="Failed AUTHs for one login from one address before 454 4.7.0 for that login there"
    )
    auth_lockout_seconds: int = Field(900, description="Failures are forgotten this long after the last one")
    auth_login_failure_budget: int = Field(
        50,
        description="Failed AUTHs for one login from all the addresses it has never logged in from, per "
        "auth_login_budget_seconds; once spent, 454 4.7.0 without a hash there (addresses it logged in from go on)",
    )
    auth_login_budget_seconds: int = Field(3600, description="The window of auth_login_failure_budget (sliding)")
    auth_known_address_seconds: int = Field(
        30 * 86400, description="An address a login succeeded from stays known this long after its last success"
    )
    auth_ipv6_prefix: int = Field(
        64, ge=32, le=128, description="IPv6 clients are counted per network of this prefix length (a /64 is one client)"
    )
    auth_failure_delay: float = Field(
        1.0,
        description="Seconds after the credentials arrive that a failed AUTH is answered (a check that takes longer: "
        "the next multiple), whatever the login or its hash: the reply time does not tell which logins exist",
    )
    lockout_mirror_resync_seconds: float = Field(
        300, description="Each replica reads its mirror of the lockout counters whole this often (besides following "
        "every write as it is stored, and after a reconnection to NATS)"
    )
    auth_cache_seconds: float = Field(
        3600, description="How long a verified login/password stays cached (0: no cache); a changed users entry drops it"
    )
    auth_cache_entries: int = Field(100_000, description="Most cached verified logins (least recently used go first)")
    password_hash_concurrency: int = Field(
        2,
        description="Password verifications at once, in threads; memory is bounded by this times the hash's "
        "memory cost (2 x 64 MiB at argon2id's default)",
    )
    password_hash_queue: int = Field(
        64, description="AUTHs that may wait for a hashing thread; past that, 454 4.7.0 at once"
    )
    argon2_time_cost: int = Field(ARGON2_DEFAULTS["time_cost"], description="argon2id passes for new hashes (hash-password)")
    argon2_memory_kib: int = Field(ARGON2_DEFAULTS["memory_kib"], description="argon2id memory for new hashes, KiB")
    argon2_parallelism: int = Field(ARGON2_DEFAULTS["parallelism"], description="argon2id lanes for new hashes")
    error_log_per_minute: int = Field(10, description="RFC 6409 §5.2 error log lines per client per minute")
