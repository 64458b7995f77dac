"""The site's own TLS policy per destination, as Postfix's ``smtp_tls_policy_maps``: for the
domains an operator knows better about than DNS says.

    TLS_POLICY='{"partner.example": {"mode": "verify", "ca_file": "/etc/submitd/partner-ca.pem"},
                 ".bank.example": "dane-only", "legacy.example": "encrypt", "lab.example": "none"}'

A key is a recipient domain; a key with a leading dot matches its subdomains (not itself).
Modes:
- ``none``: no TLS at all (nor DANE or MTA-STS).
- ``may``: opportunistic STARTTLS, unverified; DANE and MTA-STS are not asked.
- ``encrypt``: TLS required, the certificate not verified.
- ``dane``: DANE where the TLSA records validate, else opportunistic (the default when DNS_DNSSEC is on).
- ``dane-only``: DANE required; a host without validated TLSA records is not used (the message waits).
- ``verify``: TLS required and the certificate verified against ``ca_file`` (default: the MX CA
  store), naming one of ``match`` (default: the MX host's name).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Mode = Literal["none", "may", "encrypt", "dane", "dane-only", "verify"]


class TableEntry(BaseModel, extra="forbid"):
    mode: Mode
    ca_file: str | None = Field(None, description="verify: CA bundle for this destination")
    match: list[str] = Field(default_factory=list, description="verify: names the certificate may carry")


def parse_table(raw: dict[str, "TableEntry | str"]) -> dict[str, TableEntry]:
    table: dict[str, TableEntry] = {}
    for key, value in raw.items():
        entry = value if isinstance(value, TableEntry) else (
            TableEntry(mode=value) if isinstance(value, str) else TableEntry.model_validate(value))
        table[key.lower().rstrip(".")] = entry
    return table


def lookup(table: dict[str, TableEntry], domain: str) -> TableEntry | None:
    domain = domain.lower().rstrip(".")
    if domain in table:
        return table[domain]
    labels = domain.split(".")
    for i in range(1, len(labels)):
        entry = table.get("." + ".".join(labels[i:]))
        if entry is not None:
            return entry
    return None
