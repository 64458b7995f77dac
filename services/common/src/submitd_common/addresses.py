"""RFC 5321 envelope addresses (with RFC 6531 where SMTPUTF8 is in effect), and the one form
they are compared and queued in.

Two spellings of one mailbox must never be told apart by a rule: ``ceo@example.net``,
``"ceo"@EXAMPLE.net`` and ``<@relay.example:ceo@example.net>`` are the same mailbox (RFC 5321
§4.1.2: a quoted local part means what its content means; §3.3 and Appendix C: a source route
is ignored; domains are case-insensitive). ``Address.canonical`` is the form a message is
queued with; ``address_key`` the form grants and rules are compared in (the local part's case
folded, or not, by the users file's ``local_parts`` setting; IDN labels as A-labels).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
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
_LITERAL = re.compile(rf"\[(?:{_IPV4}|(?i:IPv6):[0-9A-Fa-f:.]+)\]\Z")
_DOT_ATOM_UTF8 = re.compile(rf"{_ATEXT_UTF8}+(?:\.{_ATEXT_UTF8}+)*\Z")
_QUOTED_PAIR = re.compile(r"\\(.)")


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
    def canonical(self) -> "Address":
        """The same mailbox in its one queued form: the local part unquoted where the quotes
        change nothing, the domain lowercased (an IPv6 literal in its compressed form)."""
        return Address(canonical_local(self.local), canonical_domain(self.domain))

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
    (RFC 5321 §4.1.2 and Appendix C). The local part is kept as written (a header field is
    edited where it says it); ``.canonical`` is the form to compare or queue."""
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


def canonical_local(local: str) -> str:
    """A quoted local part whose content is a dot-atom loses its quotes (``"ceo"`` is ``ceo``);
    any other keeps them, with only the escapes it needs (``"a\\b c"`` is ``"ab c"``)."""
    if len(local) < 2 or not (local.startswith('"') and local.endswith('"')):
        return local
    content = _QUOTED_PAIR.sub(r"\1", local[1:-1])
    if _DOT_ATOM_UTF8.match(content):
        return content
    return '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"'


def canonical_domain(domain: str) -> str:
    domain = unicodedata.normalize("NFC", domain.lower())
    if domain.startswith("[ipv6:") and domain.endswith("]"):
        try:
            return f"[IPv6:{ipaddress.IPv6Address(domain[6:-1]).compressed}]"
        except ValueError:
            return f"[IPv6:{domain[6:]}"
    return domain


def domain_key(domain: str) -> str:
    """A domain as compared: lowercased, and each non-ASCII label as its A-label (RFC 5890),
    so ``bücher.example`` and ``xn--bcher-kva.example`` are one domain."""
    domain = canonical_domain(domain)
    if domain.isascii():
        return domain
    return ".".join(label if label.isascii() else "xn--" + label.encode("punycode").decode("ascii")
                    for label in domain.split("."))


def address_key(address: str, *, fold_local: bool = True) -> str:
    """The form an address is compared in (send-as grants, recipient allow and deny lists,
    aliases): canonical (source route dropped, quotes dropped where they change nothing),
    the domain as ``domain_key``, and with ``fold_local`` the local part lowercased. An
    ``@domain`` entry is that domain's key. A text that does not parse as an address is
    compared as written, its domain lowercased."""
    if address.startswith("@") and ":" not in address:
        return "@" + domain_key(address[1:])
    try:
        addr = parse_mailbox(address, utf8=True).canonical
    except AddressError:
        local, at, domain = address.rpartition("@")
        return f"{local}@{domain.lower()}" if at else address
    local = addr.local.lower() if fold_local else addr.local
    return f"{local}@{domain_key(addr.domain)}" if addr.domain else local
