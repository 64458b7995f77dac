"""The SMTP dialog of a Message Submission Agent on top of aiosmtpd's connection handling.

aiosmtpd supplies the protocol object, STARTTLS (with the RFC 3207 reset of what the client
pipelined before the handshake) and PROXY header parsing. The command loop is ours, so that
every line is checked before anything interprets it (length, bare CR or LF, NUL, 8-bit bytes),
errors are counted, and every reply carries an enhanced status code. The commands that carry
submission policy (EHLO, AUTH, MAIL, RCPT, DATA, BDAT, RSET) are events on the session's policy
stream.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import ssl
import time
import uuid
from dataclasses import dataclass

from aiosmtpd.proxy_protocol import get_proxy
from aiosmtpd.smtp import SMTP
from opentelemetry import trace

from submitd.v1 import common_pb2, policy_pb2
from submitd_common.addresses import AddressError, split_path
from submitd_common.ids import new_queue_id
from submitd_common.replies import render
from submitd_common.telemetry import inject_context

from . import metrics
from .aiosmtpd_adapter import abandon_implicit_tls, aiosmtpd_state, start_implicit_tls, unread
from .backends import QUEUE_DOWN, BackendUnavailable, QueueWriter, Rewriter
from .policy_client import PolicySession, PolicyStreams
from .settings import Settings
from .submission import Submission
from .wire import (
    COMMAND_LIMIT, EXTENDED_LIMITS, MAIL_PARAMS, RCPT_PARAMS, ChunkReader, DataReader, dsn_problem, parse_params,
)

log = logging.getLogger("submitd.frontend")
tracer = trace.get_tracer("submitd.frontend")

DATA_DECIDED = policy_pb2.Verdict(accept=True)
# Commands that move no mail (Postfix's junk commands, and HELO/EHLO: a client says it twice
# at most, around STARTTLS; a flood of them costs a reply each and moves nothing).
JUNK_COMMANDS = frozenset({"NOOP", "RSET", "HELP", "VRFY", "EXPN", "HELO", "EHLO"})
READ_SIZE = 64 << 10  # octets of message content taken off the socket at a time


@dataclass
class Bdat:
    """A BDAT transaction in progress (RFC 3030)."""

    reader: ChunkReader
    submission: Submission
    span: trace.Span
    problem: str | None = None  # a refusal known before the content (no MAIL, policy, ...)


@dataclass
class Backends:
    settings: Settings
    policy: PolicyStreams
    rewriter: Rewriter
    queue: QueueWriter


class Sessions:
    """The live sessions of this frontend: for limits and for draining."""

    def __init__(self) -> None:
        self.active: set["SubmissionSMTP"] = set()
        self.per_client: dict[str, int] = {}
        self.draining = False

    def add(self, session: "SubmissionSMTP", client: str) -> None:
        self.active.add(session)
        self.per_client[client] = self.per_client.get(client, 0) + 1

    def remove(self, session: "SubmissionSMTP", client: str) -> None:
        if session not in self.active:
            return
        self.active.discard(session)
        left = self.per_client.get(client, 1) - 1
        if left:
            self.per_client[client] = left
        else:
            self.per_client.pop(client, None)


CLOSE_GRACE = 5.0  # seconds a closing session's last replies may take to reach the client


class SubmissionSMTP(SMTP):
    # The reader's buffer limit: room for the longest extended MAIL line, so that a line
    # over the limit is answered 500 5.5.2 rather than breaking the reader.
    line_length_limit = 2048

    def __init__(self, backends: Backends, sessions: Sessions, *, implicit_tls: bool, tls_context: ssl.SSLContext | None):
        s = backends.settings
        aiosmtpd_state(
            self,
            hostname=s.hostname,
            ident="ESMTP submitd",
            tls_context=None if implicit_tls else tls_context,
            data_size_limit=s.max_message_size,
            # aiosmtpd's idle timer is only a backstop; the command loop keeps the deadlines.
            timeout=s.command_timeout + s.data_read_timeout,
        )
        self.settings = s
        self.backends = backends
        self.sessions = sessions
        self.implicit_tls = implicit_tls
        self.implicit_context = tls_context if implicit_tls else None
        self.handshaking = False  # implicit TLS not yet up: nothing may be written in the clear
        self._abort_handle: asyncio.TimerHandle | None = None  # close_transport's deadline
        self.policy: PolicySession | None = None
        self.in_data = False
        self.session_id = uuid.uuid4().hex[:16]
        self.user: str | None = None
        self.client_address = ""
        self.errors = 0
        self.accepted: list[str] = []  # queue ids of this session's messages
        self.refused = 0
        self.junk = 0  # JUNK_COMMANDS since the last message queued
        self._closing = False
        self._bdat: Bdat | None = None

    # -- connection ---------------------------------------------------------------

    @property
    def tls_active(self) -> bool:
        return self.implicit_tls or self._tls_protocol is not None

    def _tls_info(self) -> policy_pb2.TlsInfo:
        obj = self.transport.get_extra_info("ssl_object") if self.transport else None
        if obj is None:
            return policy_pb2.TlsInfo()
        return policy_pb2.TlsInfo(version=obj.version() or "", cipher=(obj.cipher() or ("",))[0])

    async def _handle_client(self) -> None:
        assert self.session is not None
        peer = self.session.peer or ("", 0)
        sockname = self.transport.get_extra_info("sockname") if self.transport else None
        self.client_address = str(peer[0])
        with tracer.start_as_current_span(
            "smtp.session",
            kind=trace.SpanKind.SERVER,
            attributes={
                "network.peer.address": self.client_address,
                "network.peer.port": int(peer[1]) if len(peer) > 1 else 0,
                "server.port": sockname[1] if sockname else 0,
                "submitd.session_id": self.session_id,
                "smtp.implicit_tls": self.implicit_tls,
            },
        ) as span:
            proxy_address = ""
            if self.settings.proxy_protocol:
                try:
                    proxy = await asyncio.wait_for(get_proxy(self._reader), 10)
                except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError):
                    proxy = None
                if proxy is None or not proxy.valid or proxy.src_addr is None:
                    log.warning("invalid or missing PROXY header", extra={"fields": {"peer": self.client_address}})
                    self.close_transport()
                    return
                proxy_address = str(proxy.src_addr)
                self.client_address = proxy_address
                span.set_attribute("client.address", proxy_address)
            self.sessions.add(self, self.client_address)
            metrics.SESSIONS.inc()
            metrics.SESSIONS_ACTIVE.inc()
            try:
                refusal = self._admission()
                if refusal:
                    if self.implicit_tls:  # a TLS client cannot read a reply in the clear
                        log.info("refused before TLS", extra={"fields": {"peer": self.client_address, "reply": refusal}})
                        self.transport.abort()
                        return
                    await self.push(refusal)
                    self.close_transport()
                    return
                if self.implicit_tls and not await self._implicit_tls():
                    return
                # Policy hears of the connection with the session's first question: a client
                # that connects and leaves, or never gets that far, costs policy nothing.
                self.policy = self.backends.policy.session(self.session_id)
                self.policy.note(
                    connect=policy_pb2.Connect(
                        session_id=self.session_id,
                        peer_address=str(peer[0]),
                        peer_port=int(peer[1]) if len(peer) > 1 else 0,
                        local_port=sockname[1] if sockname else 0,
                        implicit_tls=self.implicit_tls,
                        tls=self._tls_info(),
                        proxy_address=proxy_address,
                    )
                )
                await self.push(f"220 {self.hostname} ESMTP submitd")
                await self._command_loop()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                metrics.SESSIONS_ACTIVE.dec()
                if self._bdat is not None:  # a BDAT transaction the client never finished
                    await self._end_bdat()
                self.sessions.remove(self, self.client_address)
                log.info(
                    "session closed",
                    extra={"fields": {
                        "session": self.session_id, "peer": self.client_address, "user": self.user,
                        "tls": self.tls_active, "queued": self.accepted, "refused": self.refused,
                        "errors": self.errors,
                    }},
                )
                if self.policy is not None:
                    self.policy.close()
                if self.transport is not None:
                    self.close_transport()

    async def _implicit_tls(self) -> bool:
        """The TLS handshake of port 465, within TLS_HANDSHAKE_TIMEOUT; False if it failed."""
        self.handshaking = True
        try:
            await start_implicit_tls(self, self.implicit_context, self.settings.tls_handshake_timeout)
        except (ConnectionError, OSError, asyncio.TimeoutError, ssl.SSLError) as e:
            log.info("TLS handshake failed", extra={"fields": {"peer": self.client_address, "error": repr(e)}})
            metrics.TLS_FAILURES.inc()
            # asyncio never calls connection_lost for a handshake that failed: nothing of this
            # session (its idle timer, its TLS layer) may outlive it.
            abandon_implicit_tls(self)
            return False
        finally:
            self.handshaking = False
        metrics.TLS.labels(self._tls_info().version or "unknown").inc()
        return True

    def _admission(self) -> str | None:
        if self.sessions.draining:
            return "421 4.3.2 Service shutting down, try again later"
        if len(self.sessions.active) > self.settings.max_sessions:
            return "421 4.3.2 Too many sessions, try again later"
        if self.sessions.per_client.get(self.client_address, 0) > self.settings.max_connections_per_client:
            return "421 4.7.0 Too many connections from your address"
        return None

    async def _read_line(self) -> bytes | None:
        """A command line or an AUTH continuation, within COMMAND_TIMEOUT, without its CRLF; None
        when the line was refused (its one reply is sent here)."""
        # A deadline for the whole line, not an idle timer: a client dripping one byte at a
        # time cannot hold the session (see _timeout_cb).
        self._reset_timeout(self.settings.command_timeout)
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            await self._discard_line()
            await self.push("500 5.5.2 Line too long")
            return None
        if not line.endswith(b"\r\n") or b"\r" in line[:-2] or b"\x00" in line:
            # A bare LF or CR ends nothing here: other servers read such lines differently.
            await self.push("500 5.5.2 Syntax error: bare CR or LF, or NUL, in command")
            return None
        return line[:-2]

    async def _command_loop(self) -> None:
        started = time.monotonic()
        while self.transport is not None and not self._closing:
            line = await self._read_line()
            if line is None:
                continue
            if time.monotonic() - started > self.settings.max_session_seconds and self._bdat is None:
                await self.push("421 4.4.2 Session time limit reached, closing connection")
                continue
            verb_bytes, _, arg_bytes = line.partition(b" ")
            try:
                verb = verb_bytes.decode("ascii").upper()
                arg = arg_bytes.decode("utf-8").strip() or None
            except UnicodeDecodeError:
                await self.push("500 5.5.2 Syntax error: invalid characters in command")
                continue
            limit = EXTENDED_LIMITS.get(verb, COMMAND_LIMIT) if self.session.extended_smtp else COMMAND_LIMIT
            if len(line) + 2 > limit:
                await self.push("500 5.5.2 Line too long")
                continue
            if arg and not arg.isascii() and not self._utf8_allowed(verb, arg):
                await self.push("553 5.6.7 Non-ASCII characters require SMTPUTF8")
                continue
            method = self._smtp_methods.get(verb)
            if method is None or not verb.isalpha():
                await self.push("500 5.5.1 Command unrecognized")
                continue
            if self._bdat is not None and verb not in ("BDAT", "RSET", "QUIT", "NOOP"):
                await self.push("503 5.5.1 Only BDAT, RSET, NOOP or QUIT during a BDAT transfer")
                continue
            if verb in JUNK_COMMANDS:
                # Commands that move no mail forward: a client that only sends these is cut
                # (Postfix's smtpd_junk_command_limit); a queued message starts the count again.
                self.junk += 1
                if self.junk > self.settings.junk_command_limit:
                    log.warning("too many commands without mail", extra={"fields": {
                        "peer": self.client_address, "session": self.session_id}})
                    await self.push("421 4.7.0 Too many commands without mail, closing connection")
                    continue
            try:
                await method(arg)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
                raise
            except Exception as error:
                if self.transport is None or self.transport.is_closing():
                    return  # cut meanwhile (a STARTTLS handshake the drain aborted): no one to tell
                try:
                    await self.push(await self.handle_exception(error))
                except (ConnectionError, RuntimeError):  # uvloop: "the handler is closed"
                    return

    def _timeout_cb(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            try:
                self._writer.write(b"421 4.4.2 Timeout, closing connection\r\n")
            except Exception:
                pass
        log.info("session timed out", extra={"fields": {"peer": self.client_address, "session": self.session_id}})
        self.close_transport()

    def close_transport(self) -> None:
        """Close after what is written has gone; a client that does not read its replies
        (so that they never go), or a TLS client that never sends its close_notify (asyncio
        waits 30 s for it: a drain with such a session took 30 s instead of a moment), is cut
        CLOSE_GRACE seconds later."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # closed already (a TLS transport must not be asked again)
        transport.close()
        # Always (a STARTTLS handshake still running when the drain closed the session held it
        # too); cancelled when the connection ends, so a closed session is not kept alive by it.
        self._abort_handle = self.loop.call_later(CLOSE_GRACE, transport.abort)

    def connection_lost(self, error: Exception | None) -> None:
        if self._abort_handle is not None:
            self._abort_handle.cancel()
            self._abort_handle = None
        super().connection_lost(error)

    def _utf8_allowed(self, verb: str, arg: str) -> bool:
        if verb == "MAIL":
            return any(p.upper() == "SMTPUTF8" for p in arg.split()[1:])
        return verb == "RCPT" and bool(self.envelope.smtp_utf8)

    async def _discard_line(self) -> None:
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as e:
                await self._reader.readexactly(e.consumed)

    async def handle_exception(self, error: Exception) -> str:
        # Never an exception text on the wire; the client may retry.
        if isinstance(error, BackendUnavailable):
            if error.reply.code == 421:
                self._closing = True
            return render(error.reply)
        log.exception("session %s: internal error", self.session_id)
        return "451 4.3.0 Internal error, try again later"

    async def push(self, status) -> None:
        await super().push(status)
        text = status if isinstance(status, str) else status.decode("utf-8", "replace")
        metrics.count_reply(text)
        code = text[:1]
        if code == "5":
            self.errors += 1
            if self.errors >= self.settings.max_errors and not self._closing:
                self._closing = True
                log.warning("too many errors", extra={"fields": {"peer": self.client_address, "session": self.session_id}})
                await super().push("421 4.7.0 Too many errors, closing connection")
        if status.startswith("421" if isinstance(status, str) else b"421"):
            self._closing = True
        if self._closing and self.transport is not None:
            self.close_transport()

    async def ask(self, **event) -> policy_pb2.Verdict:
        assert self.policy is not None
        with metrics.BACKEND_LATENCY.labels("policy").time():
            return await self.policy.ask(**event)

    def note(self, **event) -> None:
        """A step policy hears of with the session's next question (it decides nothing now)."""
        assert self.policy is not None
        self.policy.note(**event)

    def _address_attribute(self, address: str) -> str:
        # Full addresses on traces only where the operator wants them; the domain otherwise.
        return address if self.settings.trace_addresses else address.rpartition("@")[2]

    async def refuse_or(self, verdict: policy_pb2.Verdict, default: str) -> bool:
        """Send the verdict's reply (or ``default`` when accepted without one). True if accepted."""
        if verdict.accept:
            await self.push(render(verdict.reply) if verdict.reply.code else default)
            return True
        await self.push(render(verdict.reply))
        if verdict.disconnect and self.transport is not None:
            self.close_transport()
        return False

    # -- commands -------------------------------------------------------------------

    async def smtp_HELO(self, hostname: str):
        await self._greet(hostname, extended=False)

    async def smtp_EHLO(self, hostname: str):
        await self._greet(hostname, extended=True)

    async def _greet(self, hostname: str, extended: bool) -> None:
        verb = "EHLO" if extended else "HELO"
        if not hostname:
            await self.push(f"501 5.5.4 Syntax: {verb} hostname")
            return
        self.note(helo=policy_pb2.Helo(hostname=hostname, extended=extended))
        assert self.session is not None
        self._set_rset_state()
        self.session.extended_smtp = extended
        self.session.host_name = hostname
        if not extended:
            await self.push(f"250 {self.hostname}")
            return
        lines = [
            self.hostname,
            "PIPELINING",
            f"SIZE {self.data_size_limit}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "DSN",
            "SMTPUTF8",
            "CHUNKING",
        ]
        if self.tls_context is not None and not self.tls_active:
            lines.append("STARTTLS")
        if self.tls_active:
            lines.append("AUTH PLAIN LOGIN")
        await self.push("\r\n".join(f"250-{x}" for x in lines[:-1]) + f"\r\n250 {lines[-1]}")

    async def smtp_STARTTLS(self, arg: str):
        if self.tls_active:
            await self.push("503 5.5.1 TLS already active")
            return
        await super().smtp_STARTTLS(arg)
        if self.transport is None or self.transport.is_closing():
            # Closed during the handshake (the drain, or a client gone): asyncio then wakes the
            # handshake's waiter without an error and never reports the connection lost to this
            # protocol, so the next read would wait for ever (it held whole drains): end here.
            self._closing = True
            return
        if self._tls_protocol is not None:
            metrics.TLS.labels(self._tls_info().version or "unknown").inc()
            self.note(tls_started=policy_pb2.TlsStarted(tls=self._tls_info()))

    async def smtp_NOOP(self, arg: str):
        await self.push("250 2.0.0 OK")

    async def smtp_QUIT(self, arg: str):
        await self.push("221 2.0.0 Bye")
        self._closing = True
        self.close_transport()

    async def smtp_VRFY(self, arg: str):
        await self.push("252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery")

    async def smtp_EXPN(self, arg: str):
        await self.push("502 5.5.1 EXPN not implemented")

    async def smtp_HELP(self, arg: str):
        await self.push("214 2.0.0 See RFC 6409")

    async def smtp_AUTH(self, arg: str) -> None:
        session = self.session
        assert session is not None
        if not session.host_name or not session.extended_smtp:
            await self.push("503 5.5.1 Send EHLO first")
            return
        if not self.tls_active:
            await self.push("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        if session.authenticated:
            await self.push("503 5.5.1 Already authenticated")
            return
        if self.envelope.mail_from is not None:
            await self.push("503 5.5.1 AUTH not permitted during a mail transaction")
            return
        args = (arg or "").split()
        if not args or len(args) > 2:
            await self.push("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        initial = b""
        if len(args) == 2:
            if args[1] != "=":
                try:
                    initial = base64.b64decode(args[1], validate=True)
                except (binascii.Error, ValueError):
                    await self.push("501 5.5.2 Cannot decode base64")
                    return
        # A span of its own, and policy's side of it as its child: a slow password hash shows here.
        with tracer.start_as_current_span(
            "smtp.auth", kind=trace.SpanKind.CLIENT, attributes={"smtp.auth.mechanism": args[0].upper()}
        ) as span:
            verdict = await self.ask(
                trace_context=inject_context(),
                auth_start=policy_pb2.AuthStart(
                    mechanism=args[0].upper(), has_initial_response=len(args) == 2, initial_response=initial
                )
            )
            while verdict.has_challenge:
                await self.push("334 " + base64.b64encode(verdict.challenge).decode())
                blob = await self._read_line()  # the command loop's checks: one line, one reply
                if blob is None:
                    await self.ask(auth_response=policy_pb2.AuthResponse(cancelled=True))
                    return
                if blob == b"*":
                    verdict = await self.ask(
                        trace_context=inject_context(), auth_response=policy_pb2.AuthResponse(cancelled=True)
                    )
                    break
                try:
                    data = base64.b64decode(blob, validate=True)
                except (binascii.Error, ValueError):
                    await self.ask(auth_response=policy_pb2.AuthResponse(cancelled=True))
                    await self.push("501 5.5.2 Cannot decode base64")
                    return
                verdict = await self.ask(trace_context=inject_context(), auth_response=policy_pb2.AuthResponse(data=data))
            span.set_attribute("smtp.reply.code", verdict.reply.code)
        metrics.AUTH.labels("success" if verdict.accept else str(verdict.reply.code or "error")).inc()
        if verdict.accept:
            session.authenticated = True
            self.user = verdict.authenticated_user
        await self.refuse_or(verdict, "235 2.7.0 Authentication successful")

    async def smtp_MAIL(self, arg: str | None) -> None:
        assert self.session is not None and self.envelope is not None
        if not self.session.host_name:
            await self.push("503 5.5.1 Send EHLO/HELO first")
            return
        if self.envelope.mail_from is not None:
            await self.push("503 5.5.1 Sender already specified")
            return
        syntax = "501 5.5.4 Syntax: MAIL FROM:<address> [parameters]"
        if not arg or arg[:5].upper() != "FROM:":
            await self.push(syntax)
            return
        try:
            address, param_text = split_path(arg[5:])
        except AddressError:
            await self.push("501 5.1.7 Bad sender address syntax")
            return
        params = parse_params(param_text)
        if params is None or (param_text and not self.session.extended_smtp):
            await self.push(syntax)
            return
        unknown = set(params) - MAIL_PARAMS
        if unknown:
            await self.push(f"555 5.5.4 Unsupported MAIL parameter {sorted(unknown)[0]}")
            return
        if "SIZE" in params:
            if not params["SIZE"].isdigit():
                await self.push(syntax)
                return
            if int(params["SIZE"]) > self.data_size_limit:
                await self.push("552 5.3.4 Message size exceeds fixed maximum message size")
                return
        body = params.get("BODY", "7BIT").upper()
        if body not in ("7BIT", "8BITMIME"):
            await self.push("501 5.5.4 BODY must be 7BIT or 8BITMIME")
            return
        if "SMTPUTF8" in params and params["SMTPUTF8"]:
            await self.push("501 5.5.4 SMTPUTF8 takes no value")
            return
        if not address.isascii() and "SMTPUTF8" not in params:
            await self.push("553 5.6.7 Non-ASCII address requires SMTPUTF8")
            return
        problem = dsn_problem(params)
        if problem:
            await self.push(problem)
            return
        verdict = await self.ask(mail_from=policy_pb2.MailFrom(address=address, parameters=params))
        # Per-command detail is an event on the session's span, not a span of its own.
        trace.get_current_span().add_event("smtp.mail", {
            "smtp.mail_from": self._address_attribute(address), "smtp.reply.code": verdict.reply.code or 250})
        if verdict.accept:
            self.envelope.mail_from = verdict.address or address
            self.envelope.mail_options = [f"{k}={v}" if v else k for k, v in params.items()]
            self.envelope.smtp_utf8 = "SMTPUTF8" in params
            self._mail_params = params
        await self.refuse_or(verdict, "250 2.1.0 Sender OK")

    async def smtp_RCPT(self, arg: str | None) -> None:
        assert self.session is not None and self.envelope is not None
        if self.envelope.mail_from is None:
            await self.push("503 5.5.1 Need MAIL command")
            return
        syntax = "501 5.5.4 Syntax: RCPT TO:<address> [parameters]"
        if not arg or arg[:3].upper() != "TO:":
            await self.push(syntax)
            return
        try:
            address, param_text = split_path(arg[3:])
        except AddressError:
            await self.push("501 5.1.3 Bad recipient address syntax")
            return
        params = parse_params(param_text)
        if params is None or not address or (param_text and not self.session.extended_smtp):
            await self.push(syntax)
            return
        unknown = set(params) - RCPT_PARAMS
        if unknown:
            await self.push(f"555 5.5.4 Unsupported RCPT parameter {sorted(unknown)[0]}")
            return
        if not address.isascii() and not self.envelope.smtp_utf8:
            await self.push("553 5.6.7 Non-ASCII address requires SMTPUTF8")
            return
        problem = dsn_problem(params)
        if problem:
            await self.push(problem)
            return
        if len(self.envelope.rcpt_tos) >= self.backends.settings.max_recipients:
            await self.push("452 4.5.3 Too many recipients")
            return
        verdict = await self.ask(rcpt_to=policy_pb2.RcptTo(address=address, parameters=params))
        trace.get_current_span().add_event("smtp.rcpt", {
            "smtp.rcpt_to": self._address_attribute(address), "smtp.reply.code": verdict.reply.code or 250})
        if verdict.accept:
            self.envelope.rcpt_tos.append(verdict.address or address)
            self.envelope.rcpt_options.append(params)
            self.envelope.data_decided = verdict.data_decided
        await self.refuse_or(verdict, "250 2.1.5 Recipient OK")

    async def smtp_RSET(self, arg: str):
        self._set_rset_state()
        await self._end_bdat()
        self.note(reset=policy_pb2.Reset())
        await self.push("250 2.0.0 OK")

    async def smtp_DATA(self, arg: str) -> None:
        assert self.session is not None and self.envelope is not None
        problem = self._data_problem()
        if not problem and arg:
            problem = "501 5.5.4 Syntax: DATA"
        if problem:
            await self.push(problem)
            return
        verdict = await self._data_verdict()
        if not verdict.accept:
            await self.refuse_or(verdict, "")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        # "In data" lasts until the reply is written: a drain must not close a session whose
        # message is being queued (its client would retry a message that was accepted).
        self.in_data = True
        try:
            queue_id = new_queue_id()
            with self._message_span(queue_id):
                submission = Submission(self.backends, self._envelope(queue_id))
                try:
                    problem = await self._read_data(submission)
                    status = await self._finish(submission, problem)
                except BaseException:
                    await submission.abandon()
                    raise
                finally:
                    self._set_rset_state()
            await self._answer(status, submission)
        finally:
            self.in_data = False

    def _data_problem(self) -> str | None:
        """What DATA and the first BDAT must have before any content: the same for both."""
        if self.envelope.mail_from is None:
            return "503 5.5.1 Need MAIL command"
        if not self.envelope.rcpt_tos:
            return "554 5.5.1 No valid recipients"
        if not self.backends.queue.available:
            return render(QUEUE_DOWN)
        return None

    async def _data_verdict(self) -> policy_pb2.Verdict:
        """Policy's word on DATA (or BDAT): given already with the last RCPT when there is
        nothing left to decide or count, else asked now."""
        if getattr(self.envelope, "data_decided", False):
            return DATA_DECIDED
        return await self.ask(data_start=policy_pb2.DataStart(recipient_count=len(self.envelope.rcpt_tos)))

    def _message_span(self, queue_id: str, current: bool = True):
        attributes = {"submitd.queue_id": queue_id, "smtp.recipients.count": len(self.envelope.rcpt_tos)}
        if current:
            return tracer.start_as_current_span("smtp.data", attributes=attributes)
        return tracer.start_span("smtp.data", attributes=attributes)

    async def _read_data(self, submission: Submission) -> str | None:
        """Read the content up to CRLF "." CRLF, passing it on as it comes; the refusal, or None.

        A refused message is still read to its end (and dropped), so that the client's next
        command is not taken from the middle of it."""
        reader = DataReader(self.data_size_limit)
        started = reset_at = time.monotonic()
        self._reset_timeout(self.settings.data_read_timeout)
        while True:
            now = time.monotonic()
            if now - reset_at > 0.5:
                # The idle deadline moves on at most twice a second, not for every read (a timer
                # handle each time): a client is cut within half a second of it.
                self._reset_timeout(self.settings.data_read_timeout)
                reset_at = now
                if now - started > self.settings.data_rate_grace:
                    self._check_rate(started, reader.received)
            data = await self._reader.read(READ_SIZE)
            if not data:
                raise ConnectionResetError("connection closed during DATA")
            content, rest = reader.feed(data)
            if reader.problem:
                await submission.abandon()
            elif content:
                await submission.feed(content)
            if rest is not None:
                if rest:
                    unread(self._reader, rest)  # pipelined commands after the end of data
                return reader.problem

    async def _finish(self, submission: Submission, problem: str | None) -> str:
        if problem:
            await submission.abandon()
            trace.get_current_span().set_attribute("smtp.reply.code", int(problem[:3]))
            return problem
        started = time.monotonic()
        status = await submission.finish()
        metrics.EOD_LATENCY.observe(time.monotonic() - started)
        return status

    def _check_rate(self, started: float, received: int) -> None:
        """A client slower than the minimum data rate is told 421 and the session ends here."""
        elapsed = time.monotonic() - started
        if elapsed > self.settings.data_rate_grace and received < self.settings.min_data_rate * elapsed:
            log.warning("data rate too low", extra={"fields": {"peer": self.client_address, "session": self.session_id}})
            self._writer.write(b"421 4.4.2 Data rate too low, closing connection\r\n")
            self._closing = True
            self.close_transport()
            raise ConnectionAbortedError("data rate too low")

    # -- CHUNKING (RFC 3030) ---------------------------------------------------------

    async def _end_bdat(self) -> None:
        bdat, self._bdat = self._bdat, None
        self.in_data = False
        if bdat is not None:
            await bdat.submission.abandon()
            bdat.span.end()

    async def smtp_BDAT(self, arg: str | None) -> None:
        parts = (arg or "").split()
        if not parts or not parts[0].isdigit() or len(parts) > 2 or (len(parts) == 2 and parts[1].upper() != "LAST"):
            await self.push("501 5.5.4 Syntax: BDAT chunk-size [LAST]")
            return
        size, last = int(parts[0]), len(parts) == 2
        if self._bdat is None:
            queue_id = new_queue_id()
            span = self._message_span(queue_id, current=False)
            self._bdat = Bdat(ChunkReader(self.data_size_limit), Submission(self.backends, self._envelope(queue_id)), span)
            self.in_data = True
            # The chunk is read whatever the answer: its octets are not commands.
            self._bdat.problem = self._data_problem()
            if not self._bdat.problem:
                verdict = await self._data_verdict()
                if not verdict.accept:
                    self._bdat.problem = render(verdict.reply)
        bdat = self._bdat
        done = last
        try:
            with trace.use_span(bdat.span, end_on_exit=False):
                await self._read_chunk(size, bdat)
                if not last:
                    await self.push(bdat.problem or bdat.reader.problem or f"250 2.0.0 {size} octets received")
                    return
                bdat.reader.finish()
                try:
                    status = await self._finish(bdat.submission, bdat.problem or bdat.reader.problem)
                finally:
                    self._set_rset_state()
            await self._answer(status, bdat.submission)
        except BaseException:
            done = True
            raise
        finally:
            if done:
                await self._end_bdat()

    async def _read_chunk(self, size: int, bdat: "Bdat") -> None:
        """Read exactly ``size`` octets, within the data deadlines, passing them on as they come."""
        remaining = size
        started = time.monotonic()
        while remaining:
            self._reset_timeout(self.settings.data_read_timeout)
            self._check_rate(started, size - remaining)
            piece = await self._reader.read(min(remaining, READ_SIZE))
            if not piece:
                raise ConnectionResetError("connection closed during BDAT")
            remaining -= len(piece)
            content = bdat.reader.feed(piece)
            if bdat.problem or bdat.reader.problem:
                await bdat.submission.abandon()
            elif content:
                await bdat.submission.feed(content)

    async def _answer(self, status: str, submission: Submission) -> None:
        """The reply to the end of a transaction, counted and logged."""
        await self.push(status)
        accepted = status.startswith("250")
        if accepted:
            self.junk = 0
            self.accepted.append(submission.envelope.queue_id)
            metrics.SIZE.observe(submission.size)
        else:
            self.refused += 1
        metrics.MESSAGES.labels("accepted" if accepted else "refused", status[:3]).inc()
        log.info(
            "message %s", "accepted" if accepted else "refused",
            extra={"fields": {"session": self.session_id, "reply": status,
                              "queue_id": submission.envelope.queue_id if accepted else None}},
        )

    def _envelope(self, queue_id: str) -> common_pb2.Envelope:
        params = getattr(self, "_mail_params", {})
        recipients = [
            common_pb2.Recipient(address=a, notify=p.get("NOTIFY", ""), orcpt=p.get("ORCPT", ""))
            for a, p in zip(self.envelope.rcpt_tos, self.envelope.rcpt_options)
        ]
        peer = self.session.peer or ("",)
        return common_pb2.Envelope(
            queue_id=queue_id,
            return_path=self.envelope.mail_from or "",
            recipients=recipients,
            authenticated_user=self.user or "",
            client_address=str(peer[0]),
            helo=self.session.host_name or "",
            smtputf8=bool(self.envelope.smtp_utf8),
            body_type=params.get("BODY", "7BIT").upper(),
            dsn_ret=params.get("RET", "").upper(),
            dsn_envid=params.get("ENVID", ""),
        )

