"""What the relay writes to a next hop is checked there, whoever produced it.

The frontend refuses bare CR, bare LF and NUL in what a client sends, and the rewriter's and the
relay's own reports are built from client-supplied values (ENVID, ORCPT, addresses, header
fields): one mistake upstream would let a line break through to the next hop, where a lenient
reader might take ``\\n.\\n`` for the end of the data and the rest for new commands (SMTP
smuggling), under the site's DKIM signature. So the last writer checks again: a message with a
bare CR or LF, a NUL, or a line over 998 octets (RFC 5322 §2.1.1) is never sent; nor is an
envelope value with a control character.
"""

from __future__ import annotations

import re

from submitd.v1 import common_pb2

MAX_LINE = 998  # octets, without the CRLF
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Unsendable(Exception):
    """What would go to the next hop breaks SMTP's line rules: a permanent local error."""


def check_envelope(envelope: common_pb2.Envelope) -> None:
    values = [envelope.return_path, envelope.dsn_envid, envelope.dsn_ret]
    for r in envelope.recipients:
        values += [r.address, r.orcpt, r.notify]
    for value in values:
        if _CONTROL.search(value):
            raise Unsendable("a control character in the envelope")


class LineCheck:
    """Feeds the message as it is sent, a chunk at a time; raises Unsendable at the first
    chunk that breaks a rule, before it is written. C-speed counting, no loop per line."""

    def __init__(self) -> None:
        self.pending_cr = False  # the last chunk ended with a CR: its LF must come next
        self.line = 0  # octets of the line in progress

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        if b"\0" in chunk:
            raise Unsendable("a NUL octet in the message")
        data = b"\r" + chunk if self.pending_cr else chunk
        crlf, trailing = data.count(b"\r\n"), data.endswith(b"\r")
        if data.count(b"\n") != crlf or data.count(b"\r") - trailing != crlf:
            raise Unsendable("a bare CR or LF in the message")
        lines = (data[:-1] if trailing else data).split(b"\r\n")
        lines[0] = b"x" * self.line + lines[0]  # only its length counts
        if max(map(len, lines)) > MAX_LINE:
            raise Unsendable(f"a line over {MAX_LINE} octets in the message")
        self.line = len(lines[-1])
        self.pending_cr = trailing

    def finish(self) -> None:
        if self.pending_cr:
            raise Unsendable("a bare CR in the message")
