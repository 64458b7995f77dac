from __future__ import annotations

import socket

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from submitd_common.config import ServiceSettings


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SUBMITD_REWRITER_", extra="forbid")

    listen: str = Field("0.0.0.0:50052", description="gRPC listen address host:port")
    message_id_domain: str = Field(
        default_factory=socket.getfqdn, description="Domain part of the Message-IDs the rewriter adds"
    )
    add_date: bool = Field(True, description="RFC 6409 §8.2: add a Date header when missing")
    add_message_id: bool = Field(True, description="RFC 6409 §8.3: add a Message-ID header when missing")
    max_header_bytes: int = Field(1 << 20, description="Largest header section accepted")
