"""Header-section surgery on raw bytes: nothing outside the edited fields changes.

The email package re-folds and re-encodes what it serializes, so the message is never
round-tripped through it; fields are located and edited as byte ranges.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import format_datetime

_FIELD_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")


@dataclass
class HeaderField:
    name: bytes  # as written
    raw: bytes   # the whole field, continuation lines and final CRLF included

    @property
    def key(self) -> str:
        return self.name.decode("ascii", "replace").lower()


def split_header(message: bytes) -> tuple[bytes, bytes] | None:
    """(header section without the blank line, rest starting at the blank line), or None
    when the end of the header section is not in ``message`` yet."""
    if message.startswith(b"\r\n"):
        return b"", message
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return None
    return message[: end + 2], message[end + 2 :]


def parse_fields(header: bytes) -> list[HeaderField]:
    fields: list[HeaderField] = []
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].raw += line
            continue
        m = _FIELD_NAME.match(line)
        fields.append(HeaderField(name=m.group(1) if m else b"", raw=line))
    return fields


def new_message_id(domain: str) -> str:
    # Random only: it says nothing about the sender, the client or the time.
    return f"<{secrets.token_hex(12)}@{domain}>"


def new_date(now: datetime | None = None) -> str:
    return format_datetime((now or datetime.now(timezone.utc)).astimezone())
