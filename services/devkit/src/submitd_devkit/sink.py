"""A next-hop SMTP server for local runs and tests: it stores what it receives (in memory
and, optionally, in a Maildir) and can be told to answer with failures, to drop the
connection, or to stall at the end of data. Its extensions can be chosen (DSN on, REQUIRETLS on,
8BITMIME or SMTPUTF8 off) to act as the kinds of next hop a relay meets.

    python -m submitd_devkit.sink --port 2525 --maildir var/maildir
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


# Special entries of SinkHandler.data_replies:
DROP = "DROP"  # close the connection instead of answering
STALL = "STALL"  # never answer and keep nothing: as if the transfer had not completed
STALL_STORED = "STALL-STORED"  # keep the message, but never answer (RFC 1047's duplicate window)
STALL_LIMIT = 120.0


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
    # Extensions: DSN advertised (and its MAIL parameters accepted), 8BITMIME withdrawn,
    # REQUIRETLS (RFC 8689) advertised after STARTTLS and its MAIL parameter then accepted.
    dsn: bool = False
    requiretls: bool = False
    eightbitmime: bool = True
    stalled: int = 0  # transactions now stalled at the end of data
    data_delay: float = 0.0  # seconds to take before answering at the end of data
    ehlos: int = 0
    concurrent: int = 0
    max_concurrent: int = 0  # most transactions at the end of data at one time
    transports: set = field(default_factory=set)  # connections to close when the sink stops

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        with self.lock:
            self.ehlos += 1
            self.transports.add(server.transport)
        out = [r for r in responses if self.eightbitmime or r != "250-8BITMIME"]
        if self.dsn:
            out.insert(-1, "250-DSN")
        if self.requiretls and session.ssl is not None:
            out.insert(-1, "250-REQUIRETLS")
        return out

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.mail_options.extend(getattr(server, "dsn_params", []))
        envelope.mail_options.extend(getattr(server, "requiretls_params", []))
        return "250 OK"

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
        envelope.rcpt_options.extend(getattr(server, "dsn_rcpt_params", []))
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_delay:
            with self.lock:
                self.concurrent += 1
                self.max_concurrent = max(self.max_concurrent, self.concurrent)
            try:
                await asyncio.sleep(self.data_delay)
            finally:
                with self.lock:
                    self.concurrent -= 1
        with self.lock:
            special = self.data_replies.popleft() if self.data_replies else None
            if special == DROP:
                server.transport.close()
                return "421 4.4.2 dropped"
            if special in (STALL, STALL_STORED):
                if special == STALL_STORED:
                    self._store(envelope)
                self.stalled += 1
                self.arrived.notify_all()
            elif special:
                return special
            else:
                self._store(envelope)
                return "250 2.0.0 Ok: stored"
        try:
            # Until the client goes away (aiosmtpd cancels this handler then).
            await asyncio.sleep(STALL_LIMIT)
        finally:
            with self.lock:
                self.stalled -= 1
        return "451 4.3.0 stalled"

    def _store(self, envelope) -> None:
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

    def reset(self) -> None:
        with self.lock:
            self.messages.clear()
            self.data_replies.clear()
            self.rcpt_replies.clear()
            self.data_delay = 0.0
            self.ehlos = self.max_concurrent = 0

    def wait_until(self, predicate, timeout: float) -> bool:
        """Block until ``predicate(handler)`` holds (checked whenever something arrives or stalls)."""
        with self.arrived:
            return self.arrived.wait_for(lambda: predicate(self), timeout)

    def wait_for(self, count: int, timeout: float) -> list[Received]:
        """Block until at least ``count`` messages arrived (or the timeout passed)."""
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.messages) >= count, timeout)
            return list(self.messages)


class _DsnSMTP(SMTP):
    """Takes RFC 3461's MAIL parameters (RET, ENVID), which aiosmtpd would refuse with 555."""

    def _take_dsn(self, arg: str | None, names: tuple[str, ...]) -> tuple[str | None, list[str]]:
        """Split RFC 3461 parameters off a MAIL/RCPT argument (aiosmtpd would refuse them)."""
        if not arg or not getattr(self.event_handler, "dsn", False):
            return arg, []
        words = arg.split()
        taken = [w for w in words if w.upper().startswith(names)]
        return " ".join(w for w in words if w not in taken), taken

    def _take_requiretls(self, arg: str | None) -> tuple[str | None, list[str]]:
        """REQUIRETLS (no value) off a MAIL argument, when the sink offers it: after STARTTLS."""
        if not arg or not getattr(self.event_handler, "requiretls", False) or self.session.ssl is None:
            return arg, []
        words = arg.split()
        taken = [w for w in words if w.upper() == "REQUIRETLS"]
        return " ".join(w for w in words if w not in taken), taken

    async def smtp_MAIL(self, arg):
        arg, self.dsn_params = self._take_dsn(arg, ("RET=", "ENVID="))
        arg, self.requiretls_params = self._take_requiretls(arg)
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg):
        arg, self.dsn_rcpt_params = self._take_dsn(arg, ("NOTIFY=", "ORCPT="))
        await super().smtp_RCPT(arg)


class _Controller(Controller):
    def factory(self):
        return _DsnSMTP(self.handler, **self.SMTP_kwargs)


class Sink:
    """A sink on 127.0.0.1 in a thread of its own (for tests)."""

    def __init__(
        self, port: int = 0, maildir: Path | None = None, *, dsn: bool = False, eightbitmime: bool = True,
        smtputf8: bool = True, tls_context=None, login: tuple[str, str] | None = None, host: str = "127.0.0.1",
        requiretls: bool = False,
    ) -> None:
        """``tls_context`` offers STARTTLS; ``login`` (user, password) requires AUTH; ``host``
        another local address (a container bridge's, for the image test); ``requiretls`` offers
        REQUIRETLS once STARTTLS is done (without it the MAIL parameter is refused 555)."""
        self.handler = SinkHandler(maildir=maildir, dsn=dsn, eightbitmime=eightbitmime, requiretls=requiretls)
        self.port = port or free_port()
        auth = {}
        if login:
            def authenticator(server, session, envelope, mechanism, data):
                from aiosmtpd.smtp import AuthResult

                ok = (data.login.decode(), data.password.decode()) == login
                return AuthResult(success=ok)

            auth = {"authenticator": authenticator, "auth_required": True, "auth_require_tls": tls_context is not None}
        self.controller = _Controller(
            self.handler, hostname=host, port=self.port, enable_SMTPUTF8=smtputf8, data_size_limit=None,
            tls_context=tls_context, **auth,
        )

    def start(self) -> "Sink":
        self.controller.start()
        return self

    def stop(self) -> None:
        # Clients (a relay's pooled connections) may still be connected: close their
        # connections in the sink's loop before it stops, so none is left open behind it.
        loop = self.controller.loop
        done = threading.Event()

        def close_all() -> None:
            for transport in list(self.handler.transports):
                if transport is not None and not transport.is_closing():
                    transport.close()
            loop.call_soon(done.set)

        loop.call_soon_threadsafe(close_all)
        done.wait(2)
        self.controller.stop()
        self.controller.loop.close()


async def _serve(port: int, maildir: Path, unknown: list[str]) -> None:
    handler = SinkHandler(maildir=maildir)
    for address in unknown:
        handler.rcpt_replies[address] = f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _DsnSMTP(handler, hostname="sink.localhost", enable_SMTPUTF8=True, data_size_limit=None), "127.0.0.1", port
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=2525)
    parser.add_argument("--maildir", type=Path, required=True)
    parser.add_argument("--unknown", action="append", default=[], help="refuse this recipient with 550 5.1.1")
    args = parser.parse_args()
    try:
        asyncio.run(_serve(args.port, args.maildir, args.unknown))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
