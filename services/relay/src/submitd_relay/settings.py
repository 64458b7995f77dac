from __future__ import annotations

import socket
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from submitd_common.config import ServiceSettings


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SUBMITD_RELAY_", extra="forbid")

    http_listen: str = Field("0.0.0.0:8080", description="/healthz, /readyz and /metrics")
    helo_name: str = Field(default_factory=socket.getfqdn, description="Name the relay gives in EHLO")
    next_hop_host: str = Field(description="Smarthost to deliver every message to")
    next_hop_port: int = Field(25, description="Smarthost port")
    next_hop_tls: Literal["none", "opportunistic", "required"] = Field(
        "opportunistic", description="STARTTLS to the smarthost"
    )
    next_hop_verify_tls: bool = Field(True, description="Verify the smarthost's certificate")
    next_hop_ca_file: str | None = Field(None, description="CA bundle for the smarthost's certificate")
    next_hop_username: str | None = Field(None, description="AUTH user at the smarthost")
    next_hop_password: str | None = Field(None, description="AUTH password at the smarthost")
    connections: int = Field(20, description="Concurrent deliveries (and connections) to the next hop")
    connect_timeout: float = Field(30.0, description="Seconds to connect to the next hop")
    command_timeout: float = Field(300.0, description="Seconds to wait for a next-hop reply (RFC 5321 §4.5.3.2)")
    ack_wait: float = Field(900.0, description="JetStream AckWait: longer than the slowest delivery")
    retry_schedule: list[float] = Field(
        default_factory=lambda: [60, 300, 900, 1800, 3600, 7200, 14400],
        description="Seconds before each retry; the last value repeats (RFC 5321 §4.5.4.1)",
    )
    max_lifetime: float = Field(5 * 86400, description="Seconds a message may stay queued before it bounces")
