"""What a delivery takes (a Body, streamed) and gives (an Outcome for every recipient)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field


class Body:
    """What is delivered: read as a stream (once per transaction), never held whole. The
    queue's bodies are read from JetStream as the next hop takes them (consumer.QueuedBody)."""

    size: int = 0
    eight_bit: bool = False  # BODY=8BITMIME is declared to the next hop (RFC 6152)

    def chunks(self) -> AsyncIterator[bytes]:
        raise NotImplementedError


@dataclass
class Outcome:
    delivered: list[str] = field(default_factory=list)
    temporary: dict[str, str] = field(default_factory=dict)  # recipient -> reply
    permanent: dict[str, str] = field(default_factory=dict)
    remote: dict[str, str] = field(default_factory=dict)  # recipient -> host that answered
    without_dsn: set[str] = field(default_factory=set)  # delivered to a next hop without DSN
    next_hop: str = ""

    def fail_all(self, recipients: list[str], code: int, text: str, host: str = "") -> None:
        target = self.permanent if 500 <= code < 600 else self.temporary
        for r in recipients:
            target[r] = f"{code} {text}".strip()
            if host:
                self.remote[r] = host

    def merge(self, other: "Outcome") -> None:
        self.delivered += other.delivered
        self.temporary |= other.temporary
        self.permanent |= other.permanent
        self.remote |= other.remote
        self.without_dsn |= other.without_dsn
        hops = [h for h in (*self.next_hop.split(","), other.next_hop) if h]
        self.next_hop = ",".join(dict.fromkeys(hops))


class NextHopError(Exception):
    """The connection failed; every recipient not yet accepted is deferred."""
