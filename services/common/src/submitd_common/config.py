"""Settings: environment variables with one prefix per service, plus an optional YAML file.

A service declares ``class Settings(ServiceSettings)`` with ``env_prefix="SUBMITD_<SVC>_"``
(``BaseServiceSettings`` for one without NATS: the frontend). The YAML file named by
``<PREFIX>CONFIG_FILE`` supplies values the environment does not.
"""

from __future__ import annotations

import os

from pydantic import Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, YamlConfigSettingsSource


class BaseServiceSettings(BaseSettings):
    log_level: str = Field("INFO", description="Python logging level")
    drain_seconds: float = Field(20.0, description="How long a shutdown may wait for work in flight")
    grpc_tls_cert: str | None = Field(None, description="PEM certificate for service-to-service gRPC (mTLS)")
    grpc_tls_key: str | None = Field(None, description="PEM key for service-to-service gRPC")
    grpc_tls_ca: str | None = Field(None, description="CA that signs every service's gRPC certificate")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        prefix = settings_cls.model_config.get("env_prefix", "")
        path = os.environ.get(f"{prefix}CONFIG_FILE")
        if path:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)


class ServiceSettings(BaseServiceSettings):
    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS server URL(s), comma separated")
    nats_credentials: str | None = Field(None, description="Path to a NATS .creds file")
    nats_user: str | None = Field(None, description="NATS user name (user/password authentication)")
    nats_password: str | None = Field(None, description="NATS password")
    nats_inbox_prefix: str | None = Field(
        None, description="Prefix of this service's reply subjects (default _INBOX; the chart sets _INBOX_<service>, "
        "the only replies its NATS grants each user)"
    )

    def nats_options(self) -> dict:
        options: dict = {"servers": [u.strip() for u in self.nats_url.split(",") if u.strip()]}
        if self.nats_credentials:
            options["user_credentials"] = self.nats_credentials
        if self.nats_user:
            options["user"] = self.nats_user
            options["password"] = self.nats_password or ""
        if self.nats_inbox_prefix:
            options["inbox_prefix"] = self.nats_inbox_prefix
        return options
