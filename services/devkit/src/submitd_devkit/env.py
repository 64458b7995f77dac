"""A service's environment built from its settings class: the names are the class's fields
(a misspelt or removed one fails here, not as a silently ignored variable), the prefix is the
class's own, and values are written the way pydantic-settings reads them back."""

from __future__ import annotations

import importlib
import json

SERVICES = ("frontend", "policy", "rewriter", "relay")


def settings_class(service: str):
    return importlib.import_module(f"submitd_{service}.settings").Settings


def encode(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(value)
    return str(value)


def settings_env(service: str, values: dict) -> dict[str, str]:
    """``{"listen": "127.0.0.1:1"}`` → ``{"SUBMITD_POLICY_LISTEN": "127.0.0.1:1"}``; keys are
    field names in either case."""
    cls = settings_class(service)
    prefix = cls.model_config["env_prefix"]
    out = {}
    for key, value in values.items():
        field = key.lower()
        if field not in cls.model_fields:
            raise KeyError(f"{cls.__module__}.Settings has no setting {field!r}")
        out[prefix + field.upper()] = encode(value)
    return out
