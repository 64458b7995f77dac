from __future__ import annotations

import socket
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from submitd_common.config import ServiceSettings


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SUBMITD_REWRITER_", extra="forbid")

    http_listen: str = Field("0.0.0.0:8080", description="/healthz, /readyz and /metrics")
    listen: str = Field("0.0.0.0:50052", description="gRPC listen address host:port")
    grpc_allowed_callers: list[str] = Field(
        ["frontend:SubmitMany", "frontend:Submit", "relay:Rewrite"], description="Under mutual TLS, the certificate "
        "names (commonName) that may call, NAME:Method for one method only: the frontend to queue users' messages, "
        "and the relay for the reports it has signed (and queues itself)",
    )
    message_id_domain: str = Field(
        default_factory=socket.getfqdn, description="Domain part of the Message-IDs the rewriter adds"
    )
    users_file: str | None = Field(None, description="The policy's users file: header From grants, Sender")
    dovecot_passwd_file: str | None = Field(None, description="The policy's Dovecot passwd-file, if any")
    dkim_keys_file: str | None = Field(None, description="YAML list of DKIM keys (domain, selector, key_file)")
    rewrite_rules_file: str | None = Field(None, description="YAML address rewriting rules (RFC 6409 §8.8)")
    publish_timeout: float = Field(10.0, description="Seconds to wait for the queue's acknowledgement of a message")
    reload_interval: float = Field(2.0, description="Seconds between checks of the files above")
    add_date: bool = Field(True, description="RFC 6409 §8.2: add a Date header when missing")
    fix_date: bool = Field(True, description="RFC 6409 §8.2: replace a Date that does not parse")
    add_message_id: bool = Field(True, description="RFC 6409 §8.3: add a Message-ID when missing")
    fix_message_id: bool = Field(True, description="RFC 6409 §8.3: replace a Message-ID of invalid syntax")
    add_sender: bool = Field(True, description="RFC 6409 §8.1: add Sender when the user is not the From")
    check_header_addresses: bool = Field(True, description="RFC 6409 §4.2/§5.1: address headers valid and qualified")
    check_header_from: bool = Field(
        True, description="RFC 6409 §6.3: From, Sender, Resent-From and Resent-Sender owned by the user "
        "(whatever check_header_addresses says)"
    )
    complete_domain: str | None = Field(None, description="Completes single-label domains, as the policy does")
    seven_bit: bool = Field(
        False, description="RFC 6409 §8.4: make 8-bit single-part text 7-bit (quoted-printable) before signing, "
        "for a next hop without 8BITMIME"
    )
    max_header_bytes: int = Field(1 << 20, description="Largest header section accepted")
    max_header_fields: int = Field(
        1000, ge=1, description="A header section with more fields than this is refused 552 5.3.4"
    )
    received_client: Literal["full", "hide"] = Field(
        "full", description="RFC 5321 §4.4 Received field: 'full' names the client's HELO and address; "
        "'hide' leaves the client's address out (its HELO name too when that is an address literal)"
    )
    max_hops: int = Field(
        50, ge=1, description="A message that would leave with more Received/Delivered-To fields than this "
        "is refused 554 5.4.6 (a mail loop), as Postfix's hopcount_limit"
    )
