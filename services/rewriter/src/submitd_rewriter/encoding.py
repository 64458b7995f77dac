"""RFC 6409 §8.4: 8-bit bodies made 7-bit for a next hop without 8BITMIME.

Done before signing (RFC 6376 §5.3): a conversion after it would break the body hash. Only a
single-part text/* message with no transfer encoding or 7bit/8bit is converted (to
quoted-printable, line by line as it streams); anything else is left alone, and the relay
refuses to send an 8-bit message to a next hop that cannot take it.
"""

from __future__ import annotations

import binascii

from .headers import HeaderField



def convertible(fields: list[HeaderField]) -> bool:
    ctype = next((f for f in fields if f.key == "content-type"), None)
    cte = next((f for f in fields if f.key == "content-transfer-encoding"), None)
    if ctype is not None:
        value = ctype.raw.split(b":", 1)[1].strip().lower()
        if not value.startswith(b"text/"):
            return False
    if cte is not None and cte.raw.split(b":", 1)[1].strip().lower() not in (b"7bit", b"8bit"):
        return False
    return True


def mark_quoted_printable(fields: list[HeaderField]) -> list[HeaderField]:
    """The fields with Content-Transfer-Encoding: quoted-printable (and MIME-Version)."""
    cte = HeaderField(b"Content-Transfer-Encoding", b"Content-Transfer-Encoding: quoted-printable\r\n")
    out = [cte if f.key == "content-transfer-encoding" else f for f in fields]
    if not any(f.key == "content-transfer-encoding" for f in fields):
        out.append(cte)
    if not any(f.key == "mime-version" for f in fields):
        out.append(HeaderField(b"MIME-Version", b"MIME-Version: 1.0\r\n"))
    return out


class QuotedPrintable:
    """Streams CRLF text into quoted-printable (RFC 2045 §6.7), lines of at most 76, a block of
    complete lines at a time (binascii, in C: the per-octet Python loop this replaced cost
    about a second per megabyte)."""

    def __init__(self) -> None:
        self.partial = b""

    def update(self, data: bytes) -> bytes:
        data = self.partial + data if self.partial else data
        end = data.rfind(b"\r\n")
        if end < 0:
            self.partial = data
            return b""
        self.partial = data[end + 2 :]
        return binascii.b2a_qp(data[: end + 2], quotetabs=False, istext=True, header=False)

    def finish(self) -> bytes:
        """The last line, if it had no CRLF (it gets none here either)."""
        if not self.partial:
            return b""
        return binascii.b2a_qp(self.partial + b"\r\n", quotetabs=False, istext=True, header=False)[:-2]
