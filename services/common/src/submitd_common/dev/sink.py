"""A next-hop SMTP server for local runs and tests: it stores what it receives (in memory
and, optionally, in a Maildir) and can be told to answer with failures.

    python -m submitd_common.dev.sink --port 2525 --maildir var/maildir
"""

from __future__ import annotations

import argparse
import asyncio
import mailbox
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from .ports import free_port


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]
    rcpt_options: list[str]


@dataclass
class SinkHandler:
    maildir: Path | None = None
    messages: list[Received] = field(default_factory=list)
    # Replies to give instead of "250" at end of data, consumed one per message.
    data_replies: deque[str] = field(default_factory=deque)
    # Replies per recipient address at RCPT, kept until removed.
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    arrived: threading.Condition = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.arrived = threading.Condition(self.lock)
        self._box = mailbox.Maildir(self.maildir, create=True) if self.maildir else None

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with self.lock:
            reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            if self.data_replies:
                return self.data_replies.popleft()
            msg = Received(
                # aiosmtpd reports the null return path as "<>": record it as the empty path.
                "" if envelope.mail_from == "<>" else envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.original_content,
                list(envelope.mail_options),
                list(envelope.rcpt_options),
            )
            self.messages.append(msg)
            if self._box is not None:
                self._box.add(msg.data)
            self.arrived.notify_all()
        return "250 2.0.0 Ok: stored"

    def reset(self) -> None:
        with self.lock:
            self.messages.clear()
            self.data_replies.clear()
            self.rcpt_replies.clear()

    def wait_for(self, count: int, timeout: float) -> list[Received]:
        """Block until at least ``count`` messages arrived (or the timeout passed)."""
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.messages) >= count, timeout)
            return list(self.messages)


class Sink:
    """A sink on 127.0.0.1 in a thread of its own (for tests)."""

    def __init__(self, port: int = 0, maildir: Path | None = None) -> None:
        self.handler = SinkHandler(maildir=maildir)
        self.port = port or free_port()
        self.controller = Controller(
            self.handler, hostname="127.0.0.1", port=self.port, enable_SMTPUTF8=True, data_size_limit=None
        )

    def start(self) -> "Sink":
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()
        self.controller.loop.close()


async def _serve(port: int, maildir: Path) -> None:
    handler = SinkHandler(maildir=maildir)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="sink.localhost", enable_SMTPUTF8=True, data_size_limit=None), "127.0.0.1", port
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=2525)
    parser.add_argument("--maildir", type=Path, required=True)
    args = parser.parse_args()
    try:
        asyncio.run(_serve(args.port, args.maildir))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
