from __future__ import annotations

import ipaddress
import json
import socket
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from submitd_common.config import BaseServiceSettings


class Settings(BaseServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SUBMITD_FRONTEND_", extra="forbid")

    hostname: str = Field(default_factory=socket.getfqdn, description="Name in the greeting and EHLO reply")
    submission_listen: str = Field("0.0.0.0:587", description="STARTTLS listener host:port; empty disables it")
    submissions_listen: str = Field("0.0.0.0:465", description="Implicit-TLS listener host:port; empty disables it")
    http_listen: str = Field("0.0.0.0:8080", description="/healthz, /readyz and /metrics")
    tls_cert: str | None = Field(None, description="PEM certificate chain; without it there is no TLS and no AUTH")
    tls_key: str | None = Field(None, description="PEM private key")
    tls_second_cert: str | None = Field(
        None, description="A second certificate chain of the other key type (ECDSA beside RSA, or RSA beside "
        "ECDSA): each client is given the one it can verify"
    )
    tls_second_key: str | None = Field(None, description="The second certificate's private key")
    tls_handshake_timeout: float = Field(
        10.0, description="Seconds for a port-465 client to finish its TLS handshake (it holds a session meanwhile)"
    )
    policy_target: str = Field("127.0.0.1:50051", description="gRPC target of the policy service")
    rewriter_target: str = Field("127.0.0.1:50052", description="gRPC target of the rewriter service")
    max_message_size: int = Field(25 << 20, description="SIZE limit in octets")
    max_recipients: int = Field(100, description="Recipients per message (RFC 5321 §4.5.3.1.8 minimum 100)")
    backend_connect_timeout: float = Field(
        5.0, description="Seconds to wait for a reconnecting policy or rewriter before answering 4xx"
    )
    policy_timeout: float = Field(10.0, description="Seconds to wait for a policy verdict")
    backend_streams: int = Field(
        2, description="Long-lived gRPC streams to policy, and to the rewriter, that all sessions share "
        "(each lands on one replica: more streams spread the load over more replicas)"
    )
    backend_stream_seconds: float = Field(
        60.0, description="A backend stream takes new work this long, then a new one does (so that "
        "policy and rewriter replicas added since get their share); the old one ends when idle"
    )
    rewriter_timeout: float = Field(60.0, description="Seconds to wait for the rewriter")
    command_timeout: float = Field(
        300.0, description="Seconds a whole command line may take to arrive (RFC 5321 §4.5.3.2)"
    )
    data_read_timeout: float = Field(180.0, description="Seconds to wait for the next data block (RFC 5321 §4.5.3.2)")
    min_data_rate: int = Field(
        500, description="Octets per second a client must average in DATA/BDAT after the first 30 seconds"
    )
    data_rate_grace: float = Field(30.0, description="Seconds of DATA/BDAT before MIN_DATA_RATE applies")
    max_errors: int = Field(20, description="Error replies after which the session is closed with 421 4.7.0")
    junk_command_limit: int = Field(
        100, description="NOOP, RSET, HELP, VRFY or EXPN commands without a message queued; then 421 4.7.0"
    )
    max_session_seconds: float = Field(
        3600.0, description="A session's lifetime: past it the next command, or the next block of a message in "
        "DATA or BDAT, gets 421 4.4.2 and the session ends (that message is dropped, never queued)"
    )
    max_sessions: int = Field(1000, description="Concurrent sessions per frontend; more get 421 4.3.2")
    max_connections_per_client: int = Field(20, description="Concurrent sessions per client address; more get 421 4.7.0")
    trace_addresses: bool = Field(
        False, description="Put whole addresses on traces (default: only their domains)"
    )
    drain_delay: float = Field(
        0.0,
        description="After SIGTERM: unready at once, but serving new clients normally for this long before the "
        "drain, while the load balancer (a Service's endpoints, a cloud balancer's health checks) stops sending them",
    )
    proxy_protocol: bool = Field(
        False, description="Expect a PROXY protocol v1/v2 header on every connection to SUBMISSION_LISTEN and "
        "SUBMISSIONS_LISTEN (behind a load balancer); only from PROXY_TRUSTED_NETWORKS"
    )
    proxy_trusted_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="CIDRs of the load balancers whose PROXY header is believed (required with PROXY_PROTOCOL), a JSON "
        "list or comma-separated: a connection to a PROXY port from any other address is closed before anything is "
        "read, logged and counted",
    )
    internal_submission_listen: str = Field(
        "", description="A second STARTTLS listener host:port for clients that reach the frontend directly (webmail, "
        "applications in the cluster): never a PROXY header, the client is the connection's peer; empty disables it"
    )

    @field_validator("proxy_trusted_networks", mode="before")
    @classmethod
    def _network_list(cls, value):
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except ValueError:
                    raise ValueError("PROXY_TRUSTED_NETWORKS: not a JSON list of CIDRs") from None
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("proxy_trusted_networks")
    @classmethod
    def _networks(cls, networks: list[str]) -> list[str]:
        for network in networks:
            try:
                ipaddress.ip_network(network)
            except ValueError as e:
                raise ValueError(f"PROXY_TRUSTED_NETWORKS: {e} (a CIDR such as 10.0.0.0/24, host bits zero)") from None
        return networks

    @model_validator(mode="after")
    def _proxy_needs_its_balancers(self) -> "Settings":
        if self.proxy_protocol and not self.proxy_trusted_networks:
            raise ValueError(
                "SUBMITD_FRONTEND_PROXY_PROTOCOL is on but SUBMITD_FRONTEND_PROXY_TRUSTED_NETWORKS is empty: list the "
                "load balancers' addresses (CIDRs, a JSON list or comma-separated); a PROXY header believed from anyone lets "
                "them choose their client address"
            )
        return self
