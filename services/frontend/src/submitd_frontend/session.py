"""The submission dialog: what each command may do in each state, and the reply it gets.

No sockets, deadlines or aiosmtpd here. The session reads bytes from a :class:`Connection` and
writes replies to it; it asks policy and hands message content on through
:class:`Backends`. The I/O layer (:mod:`.smtp`) supplies both for a real connection, the tests
in ``services/frontend/tests/test_session.py`` supply them in memory, with input split and
pipelined as a client may send it.

Where each decision lives: line checks, command syntax, parameters and message content in
:mod:`.wire`; the state in :mod:`.state`; the order of commands here and, for the mail
transaction (one check, ``may_start_data``, for DATA and BDAT alike), in :mod:`.transaction`;
whether a user may send, to whom and how often in policy; the reply texts in :mod:`.replies`.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections import deque

from opentelemetry import trace

from submitd.v1 import policy_pb2
from submitd_common.replies import render
from submitd_common.telemetry import inject_context

from . import metrics, replies
from .backends import BackendUnavailable
from .settings import Settings
from .state import Backends, Connection, State
from .transaction import TransactionCommands
from .wire import CommandInput, parse_command

# The session's closing log line names the last this many queue ids (and counts them all).
LOGGED_QUEUE_IDS = 100

log = logging.getLogger("submitd.frontend")
tracer = trace.get_tracer("submitd.frontend")

# Commands that move no mail (Postfix's junk commands, and HELO/EHLO: a client says it twice
# at most, around STARTTLS; a flood of them costs a reply each and moves nothing).
JUNK_COMMANDS = frozenset({"NOOP", "RSET", "HELP", "VRFY", "EXPN", "HELO", "EHLO"})
DURING_BDAT = frozenset({"BDAT", "RSET", "QUIT", "NOOP"})


class Session(TransactionCommands):
    def __init__(self, settings: Settings, connection: Connection, backends: Backends, *, tls: bool,
                 starttls: bool, client_address: str, session_id: str, clock=time.monotonic,
                 tls_info: policy_pb2.TlsInfo | None = None) -> None:
        self.settings = settings
        self.connection = connection
        self.backends = backends
        self.state = State(tls=tls, tls_info=tls_info)
        self.starttls = starttls  # STARTTLS may be offered (a context, and not implicit TLS)
        self.client_address = client_address
        self.session_id = session_id
        self.clock = clock
        self.started = clock()  # the lifetime counts from the greeting (run)
        self.input = CommandInput()
        self.errors = 0
        self.junk = 0  # JUNK_COMMANDS since the last message queued
        # The queue ids of the last LOGGED_QUEUE_IDS messages accepted, and how many were (the
        # session's closing log line): a client may keep one session for a million messages.
        self.accepted: deque[str] = deque(maxlen=LOGGED_QUEUE_IDS)
        self.accepted_count = 0
        self.refused = 0

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        await self.send(replies.greeting(self.settings.hostname))
        self.started = self.clock()
        while not self.state.closing and not self.connection.closed:
            line = await self.next_line()
            if line is None:
                return
            if isinstance(line, str):
                await self.send(line)
            elif self.expired():
                await self.send(replies.SESSION_TOO_LONG)  # a BDAT transfer in progress ends with it
            else:
                await self.command(line)

    def expired(self) -> bool:
        """Past MAX_SESSION_SECONDS since the greeting."""
        return self.clock() - self.started > self.settings.max_session_seconds

    async def end(self) -> None:
        """The connection ended: a BDAT transfer the client never finished is dropped."""
        await self._end_bdat()

    async def next_line(self) -> bytes | str | None:
        """A command line (or AUTH continuation), or the reply refusing it; None at the end."""
        self.connection.expect(content=False)
        while (line := self.input.line()) is None:
            data = await self.connection.read()
            if not data:
                return None
            self.input.feed(data)
        return line

    async def command(self, line: bytes) -> None:
        state = self.state
        command = parse_command(line, extended=state.extended,
                                smtputf8=state.transaction is not None and "SMTPUTF8" in state.transaction.params)
        if isinstance(command, str):
            await self.send(command)
            return
        handler = COMMANDS.get(command.verb)
        if handler is None:
            await self.send(replies.UNRECOGNIZED)
            return
        if state.bdat is not None and command.verb not in DURING_BDAT:
            await self.send(replies.BDAT_ONLY)
            return
        if command.verb in JUNK_COMMANDS:
            # Commands that move no mail forward: a client that only sends these is cut
            # (Postfix's smtpd_junk_command_limit); a queued message starts the count again.
            self.junk += 1
            if self.junk > self.settings.junk_command_limit:
                log.warning("too many commands without mail", extra={"fields": self._who()})
                await self.send(replies.TOO_MUCH_JUNK)
                return
        try:
            await handler(self, command.arg)
        except (ConnectionError, EOFError):
            raise
        except Exception as error:
            if self.connection.closed:
                return  # cut meanwhile (a STARTTLS handshake the drain aborted): no one to tell
            try:
                await self.send(self._failure(error))
            except (ConnectionError, RuntimeError):  # uvloop: "the handler is closed"
                return

    def _failure(self, error: Exception) -> str:
        # Never an exception text on the wire; the client may retry.
        if isinstance(error, BackendUnavailable):
            if error.reply.code == 421:
                self.state.closing = True
            return render(error.reply)
        log.exception("session %s: internal error", self.session_id)
        return replies.INTERNAL_ERROR

    async def send(self, reply: str) -> None:
        """One reply, counted; too many errors, or a 421, close the session after it."""
        await self.connection.write(reply)
        metrics.count_reply(reply)
        if reply[:1] == "5":
            self.errors += 1
            if self.errors >= self.settings.max_errors and not self.state.closing:
                self.state.closing = True
                log.warning("too many errors", extra={"fields": self._who()})
                await self.connection.write(replies.TOO_MANY_ERRORS)
                metrics.count_reply(replies.TOO_MANY_ERRORS)
        if reply[:3] == "421":
            self.state.closing = True
        if self.state.closing:
            self.connection.close()

    async def answer(self, verdict: policy_pb2.Verdict, default: str) -> bool:
        """Policy's reply (or ``default`` when it accepted without one). True if accepted."""
        await self.send(render(verdict.reply) if verdict.reply.code or not verdict.accept else default)
        if not verdict.accept and verdict.disconnect:
            self.state.closing = True
            self.connection.close()
        return verdict.accept

    async def ask(self, **event) -> policy_pb2.Verdict:
        return await self.backends.ask(**event)

    def _who(self) -> dict:
        return {"peer": self.client_address, "session": self.session_id}

    # -- commands without a transaction ---------------------------------------------------------

    async def helo(self, arg: str | None, extended: bool = False) -> None:
        if not arg:
            await self.send(replies.helo_syntax("EHLO" if extended else "HELO"))
            return
        self.backends.note(helo=policy_pb2.Helo(hostname=arg, extended=extended))
        state = self.state
        state.transaction, state.helo, state.extended = None, arg, extended
        if not extended:
            await self.send(replies.helo(self.settings.hostname))
            return
        lines = [self.settings.hostname, "PIPELINING", f"SIZE {self.settings.max_message_size}", "8BITMIME",
                 "ENHANCEDSTATUSCODES", "DSN", "SMTPUTF8", "CHUNKING"]
        if self.starttls and not state.tls:
            lines.append("STARTTLS")
        if state.tls:
            lines.append("REQUIRETLS")  # RFC 8689 §2: only once the session is encrypted
        if state.tls and self.backends.auth_mechanisms:
            lines.append(" ".join(["AUTH", *self.backends.auth_mechanisms]))
        await self.send(replies.ehlo(lines))

    async def ehlo(self, arg: str | None) -> None:
        await self.helo(arg, extended=True)

    async def starttls(self, arg: str | None) -> None:
        if self.state.tls:
            await self.send(replies.TLS_ACTIVE)
        elif arg:
            await self.send(replies.STARTTLS_SYNTAX)
        elif not self.starttls:
            await self.send(replies.TLS_UNAVAILABLE)
        else:
            await self.send(replies.TLS_READY)
            self.input.clear()  # what was pipelined in the clear is never read (RFC 3207 §4.2)
            tls = await self.connection.start_tls()
            if tls is None:
                self.state.closing = True
                return
            # RFC 3207 §4.2: everything learnt before the handshake is forgotten.
            self.state = State(tls=True, tls_info=tls)
            self.backends.note(tls_started=policy_pb2.TlsStarted(tls=tls))

    async def noop(self, arg: str | None) -> None:
        await self.send(replies.OK)

    async def quit(self, arg: str | None) -> None:
        self.state.closing = True
        await self.send(replies.BYE)

    async def vrfy(self, arg: str | None) -> None:
        await self.send(replies.VRFY)

    async def expn(self, arg: str | None) -> None:
        await self.send(replies.EXPN)

    async def help(self, arg: str | None) -> None:
        await self.send(replies.HELP)

    async def rset(self, arg: str | None) -> None:
        self.state.transaction = None
        await self._end_bdat()
        self.backends.note(reset=policy_pb2.Reset())
        await self.send(replies.OK)

    async def auth(self, arg: str | None) -> None:
        state = self.state
        refusal = (
            replies.NEED_EHLO if not state.helo or not state.extended
            else replies.AUTH_NEEDS_TLS if not state.tls
            else replies.ALREADY_AUTHENTICATED if state.user is not None
            else replies.AUTH_IN_TRANSACTION if state.transaction is not None
            else None
        )
        args = (arg or "").split()
        if not refusal and (not args or len(args) > 2):
            refusal = replies.AUTH_SYNTAX
        initial = _base64(args[1]) if not refusal and len(args) == 2 and args[1] != "=" else b""
        if initial is None:
            refusal = replies.BAD_BASE64
        if refusal:
            await self.send(refusal)
            return
        # A span of its own, and policy's side of it as its child: a slow password hash shows here.
        mechanism = args[0].upper()
        with tracer.start_as_current_span("smtp.auth", kind=trace.SpanKind.CLIENT,
                                          attributes={"smtp.auth.mechanism": mechanism}) as span:
            verdict = await self.ask(trace_context=inject_context(), auth_start=policy_pb2.AuthStart(
                mechanism=mechanism, has_initial_response=len(args) == 2, initial_response=initial))
            while verdict.has_challenge:
                await self.send(replies.challenge(base64.b64encode(verdict.challenge).decode()))
                self.input.in_auth = True  # up to AUTH_LINE_LIMIT, refused 500 5.5.6 past it
                try:
                    line = await self.next_line()  # the command checks: one line, one reply
                finally:
                    self.input.in_auth = False
                if line is None:
                    raise EOFError("connection closed during AUTH")
                cancelled = policy_pb2.AuthResponse(cancelled=True)
                if isinstance(line, str):  # refused as a line: its reply, and the AUTH is over
                    await self.send(line)
                    await self.ask(auth_response=cancelled)
                    return
                if line == b"*":  # the client cancelled: policy words the reply
                    verdict = await self.ask(trace_context=inject_context(), auth_response=cancelled)
                    break
                data = _base64(line)
                if data is None:
                    await self.ask(auth_response=cancelled)
                    await self.send(replies.BAD_BASE64)
                    return
                verdict = await self.ask(trace_context=inject_context(), auth_response=policy_pb2.AuthResponse(data=data))
            span.set_attribute("smtp.reply.code", verdict.reply.code)
        metrics.AUTH.labels("success" if verdict.accept else str(verdict.reply.code or "error")).inc()
        if verdict.accept:
            state.user = verdict.authenticated_user
        await self.answer(verdict, replies.AUTH_OK)


def _base64(text: str | bytes) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


COMMANDS = {
    "HELO": Session.helo, "EHLO": Session.ehlo, "STARTTLS": Session.starttls, "AUTH": Session.auth,
    "MAIL": Session.mail, "RCPT": Session.rcpt, "DATA": Session.data, "BDAT": Session.bdat,
    "RSET": Session.rset, "NOOP": Session.noop, "QUIT": Session.quit, "VRFY": Session.vrfy,
    "EXPN": Session.expn, "HELP": Session.help,
}
