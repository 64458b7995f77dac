"""What comes off the wire, checked without sockets or asyncio: message content a block at a
time, and the limits and parameters of commands.

DATA (RFC 5321 §4.1.1.4) and BDAT (RFC 3030) content pass the same checks, made once on whole
blocks of complete lines with C-speed bytes operations, never line by line in Python:

- a NUL octet anywhere (nothing here offers BINARYMIME: a next hop that drops NULs would see a
  message other than the one submitd checked): ``554 5.6.0``;
- a CR or LF that is not part of a CRLF: ``554 5.6.0`` (only CRLF "." CRLF ends DATA here, as
  in a strict RFC 5321 reader; a lenient one would split such a message in two);
- a line over 998 octets plus CRLF (999 with a stuffed dot): ``500 5.5.2``;
- more than the size limit: ``552 5.3.4``.

A refusal found partway does not end the reading: the rest of the message is read and dropped,
so that the client's next command is not taken from the middle of its message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from submitd_common.addresses import AddressError, split_path

from . import replies
from .replies import BARE_CR_LF, NO_CRLF_AT_END, NUL, TOO_BIG

LINE_LIMIT = 1000  # octets including CRLF (RFC 5321 §4.5.3.1.6)
COMMAND_LIMIT = 512  # octets including CRLF (RFC 5321 §4.5.3.1.4)
# An AUTH command and each line of its exchange: 12,288 octets including CRLF (RFC 4954 §4), room
# for a bearer token (OAUTHBEARER, XOAUTH2) in base64.
AUTH_LINE_LIMIT = 12288
_LONGEST = LINE_LIMIT - 2  # a line's octets before its CRLF (after dot-unstuffing)
_WINDOW = (_LONGEST + 1) // 2  # a longer line holds at least one aligned window with no LF

LINE_TOO_LONG = replies.TEXT_LINE_TOO_LONG


def block_problem(block: bytes) -> str | None:
    """The checks on complete lines (``block`` ends with CRLF, or is empty)."""
    if b"\x00" in block:
        return NUL
    crlf = block.count(b"\r\n")
    if len(block) - len(block.translate(None, b"\r\n")) != 2 * crlf:
        # Every CR and every LF is in a CRLF pair exactly when there are twice as many of
        # them as pairs.
        return BARE_CR_LF
    if len(block) > _LONGEST and _has_long_line(block):
        return LINE_TOO_LONG
    return None


def _has_long_line(block: bytes) -> bool:
    find = block.find
    for start in range(0, len(block), _WINDOW):
        if find(b"\n", start, start + _WINDOW) < 0:  # a long line may cross here: measure them
            return max(map(len, block.split(b"\r\n"))) > _LONGEST
    return False


class _Reader:
    def __init__(self, size_limit: int | None) -> None:
        self.limit = size_limit or 0
        self.problem: str | None = None
        self.size = 0  # octets of content passed on
        self.received = 0  # octets read off the wire
        self.carry = b""  # the start of an unfinished line

    def _refuse(self, problem: str) -> None:
        self.problem = self.problem or problem

    def _content(self, block: bytes) -> bytes:
        """``block``: complete lines, unstuffed."""
        if self.problem:
            return b""
        problem = block_problem(block)
        if problem:
            self._refuse(problem)
            return b""
        out = block
        self.size += len(out)
        if self.limit and self.size > self.limit:
            self._refuse(TOO_BIG)
            return b""
        return out

    def _keep(self, carry: bytes) -> bytes:
        """An unfinished line; one already too long is dropped but for its last octet (a CR
        that the next block's LF completes)."""
        if len(carry) > _LONGEST + 2:  # room for a stuffed dot and a CR
            self._refuse(LINE_TOO_LONG)
            return carry[-1:]
        return carry


class DataReader(_Reader):
    """DATA content: ``feed(data)`` returns the dot-unstuffed content to pass on (nothing once a
    problem is found) and, once CRLF "." CRLF has been read, what followed it (pipelined commands),
    else None."""

    def __init__(self, size_limit: int | None) -> None:
        super().__init__(size_limit)
        self.line_start = True  # carry starts a line (false only after an over-long one)

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        self.received += len(data)
        buf = self.carry + data if self.carry else data
        if self.line_start and buf[:3] == b".\r\n":
            self.carry = b""
            return b"", buf[3:]
        # One search finds both a line that starts with a dot and the end marker (most blocks
        # have neither, and are not searched again).
        dot = buf.find(b"\r\n.")
        end = buf.find(b"\r\n.\r\n", dot) if dot >= 0 else -1
        if end >= 0:
            self.carry = b""
            return self._lines(buf[: end + 2], dot < end), buf[end + 5 :]
        last = buf.rfind(b"\r\n")
        if last < 0:
            self.carry = self._keep(buf)
            self.line_start = len(self.carry) == len(buf) and self.line_start
            return b"", None
        self.carry = self._keep(buf[last + 2 :])
        content = self._lines(buf[: last + 2], 0 <= dot < last)
        self.line_start = len(self.carry) == len(buf) - last - 2
        return content, None

    def _lines(self, block: bytes, dots: bool) -> bytes:
        """``block``: complete lines; ``dots``: a line after its first starts with a dot."""
        if not self.line_start:  # the tail of an over-long line: already refused
            self.line_start = True
            return b""
        if dots or block[:1] == b".":
            unstuffed = block.replace(b"\r\n.", b"\r\n")
            if block[:1] == b".":
                unstuffed = unstuffed[1:]
            return self._content(unstuffed)
        return self._content(block)


class ChunkReader(_Reader):
    """BDAT content (no dot-stuffing, no end marker: the client counts octets)."""

    def feed(self, data: bytes) -> bytes:
        self.received += len(data)
        buf = self.carry + data if self.carry else data
        last = buf.rfind(b"\r\n")
        if last < 0:
            self.carry = self._keep(buf)
            return b""
        self.carry = self._keep(buf[last + 2 :])
        return self._content(buf[: last + 2])

    def finish(self) -> None:
        """After the LAST chunk: the message must end with CRLF."""
        if self.carry:
            self._refuse(BARE_CR_LF if b"\r" in self.carry or b"\n" in self.carry else NO_CRLF_AT_END)
            self.carry = b""


# -- commands and their parameters ----------------------------------------------------

class CommandInput:
    """What the client sent that nothing has taken yet: ``feed`` it what the socket gives, take
    command lines with ``line`` and message content with ``take``.

    A line is checked before anything interprets it: over ``limit`` octets with its CRLF (the
    longest line there may be: an AUTH line, RFC 4954 §4) it is dropped up to its LF and answered
    500 5.5.6 when it was an AUTH command or a response inside an AUTH exchange (``in_auth``),
    500 5.5.2 otherwise; each command's own limit is ``parse_command``'s. A bare CR or LF, or a
    NUL, makes it a syntax error (only CRLF ends a line: other servers read such lines
    differently)."""

    def __init__(self, limit: int = AUTH_LINE_LIMIT) -> None:
        self.limit = limit
        self.buffer = bytearray()
        self.discarding = False  # inside a line already over the limit
        self.discarded_auth = False  # ... and that line is an AUTH command
        self.in_auth = False  # the next line is a response inside an AUTH exchange

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def line(self) -> bytes | str | None:
        """The next line without its CRLF, the reply refusing it (a str), or None: more needed."""
        buffer = self.buffer
        end = buffer.find(b"\n")
        if end < 0:
            if len(buffer) > self.limit:
                if not self.discarding:
                    self.discarded_auth = _is_auth(buffer)
                self.discarding = True
                del buffer[:-1]  # keep a CR that the next LF may complete
            return None
        line = bytes(buffer[: end + 1])
        del buffer[: end + 1]
        if self.discarding or end + 1 > self.limit:
            auth = self.in_auth or (self.discarded_auth if self.discarding else _is_auth(line))
            self.discarding = False
            return replies.AUTH_LINE_TOO_LONG if auth else replies.LINE_TOO_LONG
        if line[-2:-1] != b"\r" or b"\r" in line[:-2] or b"\x00" in line:
            return replies.BARE_LINE_END
        return line[:-2]

    def take(self, most: int | None = None) -> bytes:
        """What is buffered (at most ``most`` octets), for message content."""
        if most is None or most >= len(self.buffer):
            data = bytes(self.buffer)
            self.buffer.clear()
        else:
            data = bytes(self.buffer[:most])
            del self.buffer[:most]
        return data

    def clear(self) -> None:
        """STARTTLS: what was pipelined in the clear is never read (RFC 3207 §4.2)."""
        self.buffer.clear()
        self.discarding = False


def _is_auth(line) -> bool:
    return bytes(line[:5]).upper() == b"AUTH "


@dataclass(frozen=True)
class Command:
    verb: str
    arg: str | None


def parse_command(line: bytes, *, extended: bool, smtputf8: bool) -> Command | str:
    """A checked line → the command, or the reply refusing it. ``smtputf8``: the transaction
    was opened with SMTPUTF8 (RCPT may then carry UTF-8)."""
    verb_bytes, _, arg_bytes = line.partition(b" ")
    try:
        verb = verb_bytes.decode("ascii").upper()
        arg = arg_bytes.decode("utf-8").strip() or None
    except UnicodeDecodeError:
        return replies.NOT_UTF8
    if verb == "AUTH":
        if len(line) + 2 > AUTH_LINE_LIMIT:
            return replies.AUTH_LINE_TOO_LONG
    elif len(line) + 2 > (EXTENDED_LIMITS.get(verb, COMMAND_LIMIT) if extended else COMMAND_LIMIT):
        return replies.LINE_TOO_LONG
    if arg and not arg.isascii():
        if verb == "MAIL":
            allowed = any(p.upper() == "SMTPUTF8" for p in arg.split(" ")[1:])
        else:
            allowed = verb == "RCPT" and smtputf8
        if not allowed:
            return replies.NEEDS_SMTPUTF8
    if not verb.isalpha():
        return replies.UNRECOGNIZED
    return Command(verb, arg)


def parse_path(arg: str | None, *, mail: bool, extended: bool) -> tuple[str, dict[str, str]] | str:
    """``FROM:<path> params`` (MAIL) or ``TO:<path> params`` (RCPT) → (address, parameters), or
    the reply refusing it. The checks both share; what only one of them has is the caller's."""
    prefix, syntax = ("FROM:", replies.MAIL_SYNTAX) if mail else ("TO:", replies.RCPT_SYNTAX)
    if not arg or arg[: len(prefix)].upper() != prefix:
        return syntax
    try:
        address, param_text = split_path(arg[len(prefix):])
    except AddressError:
        return replies.BAD_SENDER if mail else replies.BAD_RECIPIENT
    params = parse_params(param_text)
    if params is None or (param_text and not extended) or (not mail and not address):
        repeated = params is None and repeated_keyword(param_text)
        return replies.repeated_parameter("MAIL" if mail else "RCPT", repeated) if repeated else syntax
    unknown = set(params) - (MAIL_PARAMS if mail else RCPT_PARAMS)
    if unknown:
        return replies.unsupported_parameter("MAIL" if mail else "RCPT", sorted(unknown)[0])
    return address, params


def mail_problem(address: str, params: dict[str, str], size_limit: int | None, *, tls: bool) -> str | None:
    """What only MAIL checks: SIZE (RFC 1870), BODY (RFC 6152), SMTPUTF8 (RFC 6531), DSN,
    REQUIRETLS (RFC 8689: no value, and only on a TLS session)."""
    if "SIZE" in params:
        if not SIZE_VALUE.match(params["SIZE"]):
            return replies.MAIL_SYNTAX
        if size_limit and int(params["SIZE"]) > size_limit:
            return replies.TOO_BIG
    if not _one_of(params.get("BODY", "7BIT"), ("7BIT", "8BITMIME")):
        return replies.BAD_BODY
    if "SMTPUTF8" in params and params["SMTPUTF8"]:
        return replies.SMTPUTF8_VALUE
    if not address.isascii() and "SMTPUTF8" not in params:
        return replies.ADDRESS_NEEDS_SMTPUTF8
    if "REQUIRETLS" in params:
        if params["REQUIRETLS"]:
            return replies.REQUIRETLS_VALUE
        if not tls:
            return replies.REQUIRETLS_NEEDS_TLS
    return dsn_problem(params)


def bdat_args(arg: str | None) -> tuple[int, bool] | None:
    """``chunk-size [LAST]`` → (size, last), or None."""
    parts = [part for part in (arg or "").split(" ") if part]
    if not parts or not CHUNK_SIZE.match(parts[0]) or len(parts) > 2 or (len(parts) == 2 and not _one_of(parts[1], ("LAST",))):
        return None
    return int(parts[0]), len(parts) == 2


# Client input is ASCII wherever a number or a keyword is expected: str.isdigit() takes "²" (and
# int() then fails), str.upper() makes "ſUCCESS" into SUCCESS and "8bıtmıme" into 8BITMIME.
SIZE_VALUE = re.compile(r"[0-9]{1,20}\Z")  # RFC 1870 size-value
CHUNK_SIZE = re.compile(r"[0-9]+\Z")  # RFC 3030 chunk-size
ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")  # RFC 5321 §4.1.2


def _one_of(value: str, allowed: tuple[str, ...]) -> bool:
    """``value`` is one of ``allowed`` (upper case ASCII), in any ASCII case."""
    return value.isascii() and value.upper() in allowed


# Extensions lengthen MAIL and RCPT: SIZE 26, BODY 14, SMTPUTF8 10, AUTH= 500, ENVID 100, RET 9,
# REQUIRETLS 11 (RFC 1870, 6152, 6531, 4954, 3461, 8689); ORCPT 500 and NOTIFY 30 (RFC 3461).
EXTENDED_LIMITS = {"MAIL": COMMAND_LIMIT + 670, "RCPT": COMMAND_LIMIT + 530}
MAIL_PARAMS = {"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH", "REQUIRETLS"}
RCPT_PARAMS = {"NOTIFY", "ORCPT"}


# RFC 3461 §4 xtext, whose hex pairs decode to printable US-ASCII only: an ENVID is "printable
# (graphic)" characters (§4.4), an ORCPT address may hold a space. A pair decoding to a control
# character (+0D, +0A, +00) would end up as a raw line break in a DSN.
XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+(?:2[1-9A-F]|[3-6][0-9A-F]|7[0-9A-E]))*\Z")
XTEXT_SPACE = re.compile(r"(?:[!-*,-<>-~]|\+(?:[2-6][0-9A-F]|7[0-9A-E]))*\Z")


def dsn_problem(params: dict[str, str]) -> str | None:
    """RFC 3461 syntax of the DSN parameters present, or None."""
    if "RET" in params and not _one_of(params["RET"], ("FULL", "HDRS")):
        return replies.BAD_RET
    if "ENVID" in params and (len(params["ENVID"]) > 100 or not XTEXT.match(params["ENVID"])):
        return replies.BAD_ENVID
    if "NOTIFY" in params:
        if not params["NOTIFY"].isascii():
            return replies.BAD_NOTIFY
        values = params["NOTIFY"].upper().split(",")
        if not (values == ["NEVER"] or (set(values) <= {"SUCCESS", "FAILURE", "DELAY"} and len(set(values)) == len(values))):
            return replies.BAD_NOTIFY
    if "ORCPT" in params:
        kind, semi, value = params["ORCPT"].partition(";")
        if not semi or not kind or not value or not XTEXT_SPACE.match(value):
            return replies.BAD_ORCPT
    return None


def parse_params(text: str) -> dict[str, str] | None:
    """``KEY[=value]`` separated by spaces (only SP: RFC 5321 §4.1.2), the keys ASCII, each
    once (which of two would count is not for a server to guess)."""
    params: dict[str, str] = {}
    for token in text.split(" "):
        if not token:
            continue
        key, eq, value = token.partition("=")
        if not ESMTP_KEYWORD.match(key) or (eq and not value) or key.upper() in params:
            return None
        params[key.upper()] = value
    return params


def repeated_keyword(text: str) -> str | None:
    """The first parameter keyword ``text`` gives twice (upper case), or None."""
    seen: set[str] = set()
    for token in text.split(" "):
        key = token.partition("=")[0]
        if not ESMTP_KEYWORD.match(key):
            continue
        if key.upper() in seen:
            return key.upper()
        seen.add(key.upper())
    return None
