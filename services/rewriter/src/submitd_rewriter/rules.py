"""RFC 6409 §8.8 address rewriting: only addresses that match a configured rule change.

    rules:
      - {match: jru@example.net, replace: J.Random.User@example.net}   # one address
      - {match: "@*.sales.example.net", replace: "@example.net"}      # a domain and its subdomains
    headers: true       # also in originator header fields (From, Sender, Reply-To, Resent-From/-Sender)
    recipients: false   # destination addresses too (envelope RCPT, To, Cc, Bcc): off unless asked,
                        # since RFC 6409 §8.8 forbids careless rewriting of forward-pointing addresses
"""

from __future__ import annotations

from dataclasses import dataclass

from submitd_common.files import load_yaml
from submitd_common.users import normalize


@dataclass(frozen=True)
class Rule:
    match: str
    replace: str

    def apply(self, address: str) -> str | None:
        local, _, domain = normalize(address).rpartition("@")
        if not self.match.startswith("@"):
            if normalize(self.match).lower() == f"{local}@{domain}".lower():
                return self.replace
            return None
        pattern = self.match[1:].lower()
        if pattern.startswith("*."):
            hit = domain == pattern[2:] or domain.endswith(pattern[1:])
        else:
            hit = domain == pattern
        return f"{local}{self.replace}" if hit else None


@dataclass(frozen=True)
class RewriteRules:
    rules: tuple[Rule, ...] = ()
    headers: bool = True
    recipients: bool = False

    def rewrite(self, address: str) -> str | None:
        """The new address, or None when no rule matches (the address stays as it is)."""
        if not address or "@" not in address:
            return None
        for rule in self.rules:
            new = rule.apply(address)
            if new is not None:
                return new
        return None


def load_rules(path: str) -> RewriteRules:
    data = load_yaml(path)
    rules = []
    for entry in data.get("rules") or []:
        match, replace = str(entry["match"]), str(entry["replace"])
        if match.startswith("@") != replace.startswith("@"):
            raise ValueError(f"rule {match} -> {replace}: a domain maps to a domain, an address to an address")
        rules.append(Rule(match, replace))
    return RewriteRules(tuple(rules), bool(data.get("headers", True)), bool(data.get("recipients", False)))
