from __future__ import annotations

import socket
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from submitd_common.config import ServiceSettings

from .outbound.mtasts import MtaStsSettings
from .outbound.table import TableEntry
from .outbound.tlsrpt import TlsReportingSettings


class Settings(ServiceSettings, TlsReportingSettings, MtaStsSettings):
    model_config = SettingsConfigDict(env_prefix="SUBMITD_RELAY_", extra="forbid")

    http_listen: str = Field("0.0.0.0:8080", description="/healthz, /readyz, /metrics and the queue admin API")
    helo_name: str = Field(default_factory=socket.getfqdn, description="Name the relay gives in EHLO and in DSNs")
    next_hop_host: str | None = Field(
        None, description="Smarthost to deliver every message to; unset: direct delivery by MX"
    )
    next_hop_port: int = Field(25, description="Smarthost port")
    next_hop_tls: Literal["none", "opportunistic", "required"] = Field(
        "opportunistic", description="STARTTLS to the smarthost"
    )
    next_hop_verify_tls: bool = Field(True, description="Verify the smarthost's certificate")
    next_hop_ca_file: str | None = Field(None, description="CA bundle for the smarthost's certificate")
    next_hop_username: str | None = Field(None, description="AUTH user at the smarthost")
    next_hop_password: str | None = Field(None, description="AUTH password at the smarthost")
    mx_port: int = Field(25, description="Port of MX hosts (direct delivery)")
    mx_internal_networks: list[str] = Field(
        [], description="Non-public networks (e.g. 10.0.0.0/8) an MX host may be in; by default a domain whose "
        "MX hosts resolve only to loopback, private or other special-purpose addresses is refused 550 5.4.4"
    )
    mx_tls: Literal["none", "opportunistic", "required"] = Field(
        "opportunistic", description="STARTTLS to MX hosts that have no DANE, MTA-STS or TLS_POLICY entry "
        "(unverified, RFC 7435 opportunistic security)"
    )
    mx_ca_file: str | None = Field(
        None, description="CA bundle for MX certificates verified under MTA-STS or a TLS_POLICY 'verify' entry "
        "(default: the system's trust store)"
    )
    dns_dnssec: bool = Field(
        False, description="DNS_NAMESERVERS is a DNSSEC-validating resolver (its AD bit is believed): TLSA records "
        "are looked up and DANE (RFC 7672) applies where they validate. Never point this at a resolver that does "
        "not validate, or across a network you do not trust"
    )
    tls_policy: dict[str, TableEntry | str] = Field(
        default_factory=dict, description="Per-destination TLS policy, as Postfix's smtp_tls_policy_maps: "
        "{\"domain\": \"none|may|encrypt|dane|dane-only|verify\" or {\"mode\": \"verify\", \"ca_file\": ..., "
        "\"match\": [names]}}; \".domain\" matches its subdomains"
    )
    dns_nameservers: list[str] = Field(
        default_factory=list, description="Resolvers for MX lookups (default: /etc/resolv.conf)"
    )
    dns_port: int = Field(53, description="Port of DNS_NAMESERVERS")
    dns_timeout: float = Field(10.0, description="Seconds for one DNS lookup")
    connections: int = Field(20, description="Concurrent deliveries by this relay")
    destination_concurrency: int = Field(
        10, description="Concurrent deliveries (and connections) to one destination: smarthost or domain"
    )
    connect_timeout: float = Field(30.0, description="Seconds to connect to the next hop")
    command_timeout: float = Field(300.0, description="Seconds to wait for a next-hop reply (RFC 5321 §4.5.3.2)")
    fetch_wait: float = Field(
        5.0, description="Seconds one pull request waits for messages (they arrive at once): longer is fewer "
        "idle round trips to NATS, and up to this much more time for a SIGTERM to stop the fetching"
    )
    ack_wait: float = Field(
        30.0, description="JetStream AckWait: a delivery in progress extends it every third of it, so this is "
        "how soon the messages of a relay that died are delivered by another"
    )
    retry_schedule: list[float] = Field(
        default_factory=lambda: [60, 300, 900, 1800, 3600, 7200, 14400],
        description="Seconds before each retry; the last value repeats (RFC 5321 §4.5.4.1)",
    )
    max_lifetime: float = Field(5 * 86400, description="Seconds a message may stay queued before it bounces")
    finished_record_seconds: float = Field(
        7200.0, ge=1800.0, description="How long a finished message's delivery record is kept (what a redelivery "
        "after a lost ack, a stranded entry or `submitctl queue show` reads); each costs nats-server about 300 "
        "bytes of memory meanwhile. A record still in use (a deferred message) is kept for the message's lifetime"
    )
    stranded_check_interval: float = Field(
        60.0, description="Seconds between checks for queue entries the consumer passed but the stream kept "
        "(also on start and after every NATS reconnect); 0 turns the check off"
    )
    max_hops: int = Field(
        50, ge=1, description="A queued message with more Received/Delivered-To fields than this is "
        "returned 554 5.4.6 instead of delivered (a mail loop)"
    )
    delay_warning_after: float = Field(
        4 * 3600, description="Seconds after which a delay DSN goes to senders who asked (NOTIFY=DELAY)"
    )
    bounce_from: str | None = Field(None, description="From of DSNs (default MAILER-DAEMON@HELO_NAME)")
    rewriter_target: str | None = Field(
        None, description="The rewriter (host:port): DSNs are completed and DKIM-signed there like any message "
        "the domain submits; unset: reports go unsigned"
    )
    rewriter_timeout: float = Field(60.0, description="Seconds for one report through the rewriter")
    inline_body_limit: int = Field(256 << 10, description="DSNs larger than this keep their body in the Object Store")
    publish_timeout: float = Field(10.0, description="Seconds to wait for JetStream to store a DSN or retry")
    orphan_sweep_interval: float = Field(
        3600.0, description="Seconds between sweeps for message bodies no queue entry refers to"
    )
    orphan_min_age: float = Field(3600.0, description="Age before an unreferenced body is removed")
    replicas: int = Field(
        1, description="Replicas of the queue stream, the body store and the delivery-record KV bucket (3 in a cluster)"
    )
    queue_max_bytes: int = Field(1 << 30, description="MaxBytes of the queue stream (Discard=New: full means 452)")
    admin_token: str | None = Field(None, description="Bearer token of the queue admin API (or ADMIN_TOKEN_FILE)")
    admin_token_file: str | None = Field(None, description="File holding the bearer token (a mounted Secret)")
    trace_addresses: bool = Field(
        False, description="Keep whole addresses in the next hop's replies on traces (default: only their domains)"
    )
    failpoint: Literal["after-record", "ack-lost"] | None = Field(
        None, description="Fault tests only: stop dead after the record, or lose every ack of a delivered message"
    )
