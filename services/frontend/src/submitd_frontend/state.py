"""The dialog's state, and what it needs of the layers around it (the I/O layer's connection,
the submission layer's backends), as protocols: no I/O here."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from opentelemetry import trace

from submitd.v1 import common_pb2, policy_pb2

from .wire import ChunkReader


class Connection(Protocol):
    """The I/O layer's side: one client connection."""

    closed: bool  # closing or gone: nothing more will reach the client

    async def read(self) -> bytes: ...  # what came next; b"" once the client closed
    def expect(self, content: bool) -> None: ...  # the deadlines of a command line, or of content
    async def write(self, reply: str) -> None: ...
    async def start_tls(self) -> policy_pb2.TlsInfo | None: ...  # None: the handshake failed
    def close(self) -> None: ...


class Submission(Protocol):
    envelope: common_pb2.Envelope
    size: int

    async def feed(self, content: bytes) -> None: ...
    async def abandon(self) -> None: ...
    async def finish(self) -> str: ...


class Backends(Protocol):
    """The submission layer's side: policy's verdicts and the message's way to the queue."""

    queue_available: bool
    auth_mechanisms: list[str]  # what policy accepts, advertised after TLS

    async def ask(self, **event) -> policy_pb2.Verdict: ...
    def note(self, **event) -> None: ...  # heard with the session's next question
    def submission(self, envelope: common_pb2.Envelope) -> Submission: ...


class Phase(enum.Enum):
    CONNECTED = "connected"  # before HELO/EHLO
    GREETED = "greeted"
    TRANSACTION = "transaction"  # a sender accepted
    DATA = "data"  # content being read, until its reply is written
    CLOSING = "closing"


@dataclass
class Transaction:
    mail_from: str
    params: dict[str, str]
    recipients: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    data_decided: bool = False  # policy had nothing left to decide at DATA (said with the last RCPT)


@dataclass
class Bdat:
    """A BDAT transfer in progress (RFC 3030)."""

    reader: ChunkReader
    submission: Submission
    span: trace.Span
    problem: str | None = None  # a refusal known before the content (no MAIL, policy, ...)


@dataclass
class State:
    helo: str | None = None
    extended: bool = False
    tls: bool = False
    tls_info: policy_pb2.TlsInfo | None = None  # version and cipher, for the Received field
    user: str | None = None  # authenticated as
    transaction: Transaction | None = None
    bdat: Bdat | None = None
    in_data: bool = False
    closing: bool = False

    @property
    def phase(self) -> Phase:
        if self.closing:
            return Phase.CLOSING
        if self.in_data:
            return Phase.DATA
        if self.transaction is not None:
            return Phase.TRANSACTION
        return Phase.GREETED if self.helo else Phase.CONNECTED
