"""RFC 5321 envelope addresses (with RFC 6531 where SMTPUTF8 is in effect)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_ATEXT_UTF8 = r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x7f])"
_QTEXT = r'(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])'
_QTEXT_UTF8 = r'(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e]|[^\x00-\x7f])'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ULABEL = r"(?:[A-Za-z0-9]|[^\x00-\x7f])(?:(?:[A-Za-z0-9-]|[^\x00-\x7f]){0,61}(?:[A-Za-z0-9]|[^\x00-\x7f]))?"
_IPV4 = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?:\.(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}"

_LOCAL = re.compile(rf"(?:{_ATEXT}+(?:\.{_ATEXT}+)*|\"{_QTEXT}*\")\Z")
_LOCAL_UTF8 = re.compile(rf"(?:{_ATEXT_UTF8}+(?:\.{_ATEXT_UTF8}+)*|\"{_QTEXT_UTF8}*\")\Z")
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")
_DOMAIN_UTF8 = re.compile(rf"{_ULABEL}(?:\.{_ULABEL})*\Z")
_LITERAL = re.compile(rf"\[(?:{_IPV4}|IPv6:[0-9A-Fa-f:.]+)\]\Z")


class AddressError(ValueError):
    pass


@dataclass(frozen=True)
class Address:
    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def is_literal(self) -> bool:
        return self.domain.startswith("[")

    @property
    def fully_qualified(self) -> bool:
        """RFC 6409 §4.2: a domain with at least two labels, or an address literal."""
        return self.is_literal or ("." in self.domain.strip(".") and not self.domain.endswith("."))


def split_path(arg: str) -> tuple[str, str]:
    """Split "<path> params" (or a bare path) into the path and the parameter text."""
    arg = arg.lstrip()
    if arg.startswith("<"):
        end = _closing_bracket(arg)
        if end < 0:
            raise AddressError("missing closing >")
        return arg[1:end], arg[end + 1 :].strip()
    path, _, rest = arg.partition(" ")
    return path, rest.strip()


def _closing_bracket(arg: str) -> int:
    quoted = escaped = False
    for i, ch in enumerate(arg):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
    return -1


def parse_mailbox(path: str, *, utf8: bool = False) -> Address:
    """Parse the inside of "<...>". A source route ("@a,@b:") is accepted and dropped
    (RFC 5321 §4.1.2 and Appendix C)."""
    if ":" in path and path.startswith("@"):
        path = path.split(":", 1)[1]
    if len(path) > 254:
        raise AddressError("address too long")
    local, at, domain = path.rpartition("@")
    if not at or not local or not domain:
        raise AddressError("expected local-part@domain")
    if len(local.encode("utf-8", "surrogateescape")) > 64:
        raise AddressError("local part longer than 64 octets")
    if not (_LOCAL_UTF8 if utf8 else _LOCAL).match(local):
        raise AddressError("invalid local part")
    if domain.startswith("["):
        if not _LITERAL.match(domain):
            raise AddressError("invalid address literal")
    elif not (_DOMAIN_UTF8 if utf8 else _DOMAIN).match(domain) or len(domain) > 253:
        raise AddressError("invalid domain")
    return Address(local, domain.lower())
