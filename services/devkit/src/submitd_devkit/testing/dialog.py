"""The frontend's dialog in memory (``submitd_frontend.session.Session``): a Connection and
Backends that keep what the session writes, asks and queues, for the session tests. No sockets,
no servers: policy here accepts whatever reaches it."""

from __future__ import annotations

from submitd.v1 import common_pb2, policy_pb2
from submitd_frontend import replies


class Memory:
    """The Connection (input given in pieces, replies kept) and the Backends (policy accepts;
    messages kept when finished)."""

    def __init__(self, pieces: list[bytes], after_tls: list[bytes] | None = None) -> None:
        self.pieces = list(pieces)
        self.after_tls = list(after_tls or [])  # what the client sends once the handshake is done
        self.written: list[str] = []
        self.closed = False
        self.events: list[str] = []
        self.senders: list[str] = []  # MAIL FROM addresses policy was asked about
        self.queued: list[bytes] = []
        self.envelopes: list = []  # the envelope of each message queued
        self.queue_available = True
        self.auth_mechanisms = ["PLAIN", "LOGIN"]  # what policy would say it accepts
        self.challenge = False  # AUTH answers with a 334 first
        self.notify: list[str] = []  # RCPT NOTIFY parameters policy was told
        self.now = 0.0  # a clock for the session: one second per read
        self.fed = 0  # octets handed on to the rewriter and the queue

    async def read(self) -> bytes:
        self.now += 1
        return self.pieces.pop(0) if self.pieces else b""

    def expect(self, content: bool) -> None:
        pass

    async def write(self, reply: str) -> None:
        assert not self.closed, f"written after close: {reply}"
        self.written.append(reply)

    async def start_tls(self):
        # What the client sent in the clear and the session has not read yet never reaches it
        # as commands (on a socket it would be taken for handshake bytes); then the client speaks
        # over TLS.
        self.pieces = list(self.after_tls)
        return policy_pb2.TlsInfo(version="TLSv1.3")

    def close(self) -> None:
        self.closed = True

    async def ask(self, **event) -> policy_pb2.Verdict:
        kind = next(k for k in event if k != "trace_context")
        self.events.append(kind)
        if kind == "mail_from":
            self.senders.append(event[kind].address)
        if kind == "rcpt_to":
            self.notify.append(event[kind].parameters.get("NOTIFY", ""))
        if kind == "auth_start" and self.challenge:
            return policy_pb2.Verdict(has_challenge=True, challenge=b"")
        if kind == "auth_response" and event[kind].cancelled:
            return policy_pb2.Verdict(reply=common_pb2.Reply(code=501, enhanced="5.7.0", text="cancelled"))
        return policy_pb2.Verdict(accept=True, authenticated_user="alice@example.test")

    def note(self, **event) -> None:
        self.events.append(next(iter(event)))

    def submission(self, envelope):
        return Kept(self, envelope)


class Kept:
    def __init__(self, memory: Memory, envelope) -> None:
        self.memory, self.envelope, self.content, self.size = memory, envelope, bytearray(), 0

    async def feed(self, content: bytes) -> None:
        self.content += content
        self.size += len(content)
        self.memory.fed += len(content)

    async def abandon(self) -> None:
        self.content = bytearray()

    async def finish(self) -> str:
        self.memory.queued.append(bytes(self.content))
        self.memory.envelopes.append(self.envelope)
        return replies.queued(self.envelope.queue_id)
