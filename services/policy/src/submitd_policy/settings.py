from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from submitd_common.config import ServiceSettings


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SUBMITD_POLICY_", extra="forbid")

    listen: str = Field("0.0.0.0:50051", description="gRPC listen address host:port")
    users_file: str = Field(description="YAML users file: password hashes and send-as grants")
    trusted_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs whose clients may submit without AUTH (RFC 6409 §4.3); empty by default",
    )
    allow_auth_without_tls: bool = Field(False, description="Accept AUTH on an unencrypted connection")
    reload_interval: float = Field(2.0, description="Seconds between checks of the users file")
