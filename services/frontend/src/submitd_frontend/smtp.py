"""The SMTP dialog of a Message Submission Agent on top of aiosmtpd's connection handling.

aiosmtpd supplies the socket, the line reader, STARTTLS (with the RFC 3207 buffer reset)
and the command dispatch. The commands that carry submission policy (EHLO, AUTH, MAIL,
RCPT, DATA, RSET) are ours: each is one event on the session's policy stream.
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

from aiosmtpd.smtp import SMTP, Session
from opentelemetry import trace

from submitd.v1 import common_pb2, policy_pb2, policy_pb2_grpc, rewriter_pb2_grpc
from submitd_common.addresses import AddressError, split_path
from submitd_common.ids import new_queue_id
from submitd_common.replies import render

from .backends import QUEUE_DOWN, BackendUnavailable, PolicySession, QueueWriter, rewrite
from .settings import Settings

log = logging.getLogger("submitd.frontend")
tracer = trace.get_tracer("submitd.frontend")

LINE_LIMIT = 1000  # octets including CRLF (RFC 5321 §4.5.3.1.6), plus one for a stuffed dot
MAIL_PARAMS = {"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH"}
RCPT_PARAMS = {"NOTIFY", "ORCPT"}


@dataclass
class Backends:
    settings: Settings
    policy: policy_pb2_grpc.PolicyStub
    rewriter: rewriter_pb2_grpc.RewriterStub
    queue: QueueWriter


class Sessions:
    """The live sessions of this frontend, for draining."""

    def __init__(self) -> None:
        self.active: set["SubmissionSMTP"] = set()
        self.draining = False


def parse_params(text: str) -> dict[str, str] | None:
    params: dict[str, str] = {}
    for token in text.split():
        key, eq, value = token.partition("=")
        if not key.isalnum() or (eq and not value):
            return None
        params[key.upper()] = value
    return params


class SubmissionSMTP(SMTP):
    def __init__(self, backends: Backends, sessions: Sessions, *, implicit_tls: bool, tls_context: ssl.SSLContext | None):
        s = backends.settings
        super().__init__(
            handler=None,
            hostname=s.hostname,
            ident="ESMTP submitd",
            tls_context=None if implicit_tls else tls_context,
            data_size_limit=s.max_message_size,
            enable_SMTPUTF8=True,
            timeout=s.command_timeout,
            auth_require_tls=True,
        )
        self.backends = backends
        self.sessions = sessions
        self.implicit_tls = implicit_tls
        self.policy: PolicySession | None = None
        self.in_data = False
        self.session_id = uuid.uuid4().hex[:16]
        self.user: str | None = None

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
        self.sessions.active.add(self)
        with tracer.start_as_current_span(
            "smtp.session",
            kind=trace.SpanKind.SERVER,
            attributes={
                "network.peer.address": str(peer[0]),
                "network.peer.port": int(peer[1]) if len(peer) > 1 else 0,
                "server.port": sockname[1] if sockname else 0,
                "submitd.session_id": self.session_id,
                "smtp.implicit_tls": self.implicit_tls,
            },
        ):
            try:
                if self.sessions.draining:
                    await self.push("421 4.3.2 Service shutting down, try again later")
                    self.transport.close()
                    return
                self.policy = PolicySession(self.backends.policy, self.backends.settings.policy_timeout)
                try:
                    verdict = await self.policy.ask(
                        connect=policy_pb2.Connect(
                            session_id=self.session_id,
                            peer_address=str(peer[0]),
                            peer_port=int(peer[1]) if len(peer) > 1 else 0,
                            local_port=sockname[1] if sockname else 0,
                            implicit_tls=self.implicit_tls,
                            tls=self._tls_info(),
                        )
                    )
                except BackendUnavailable as e:
                    await self.push(render(e.reply))
                    self.transport.close()
                    return
                if not verdict.accept:
                    await self.push(render(verdict.reply))
                    self.transport.close()
                    return
                await super()._handle_client()
            finally:
                self.sessions.active.discard(self)
                if self.policy is not None:
                    await self.policy.close()

    async def handle_exception(self, error: Exception) -> str:
        # Never an exception text on the wire; the client may retry.
        if isinstance(error, BackendUnavailable):
            if error.reply.code == 421:
                self._close_after_reply = True
            return render(error.reply)
        log.exception("session %s: internal error", self.session_id)
        return "451 4.3.0 Internal error, try again later"

    async def push(self, status) -> None:
        await super().push(status)
        if getattr(self, "_close_after_reply", False) and self.transport is not None:
            self.transport.close()

    async def ask(self, **event) -> policy_pb2.Verdict:
        assert self.policy is not None
        return await self.policy.ask(**event)

    async def refuse_or(self, verdict: policy_pb2.Verdict, default: str) -> bool:
        """Send the verdict's reply (or ``default`` when accepted without one). True if accepted."""
        if verdict.accept:
            await self.push(render(verdict.reply) if verdict.reply.code else default)
            return True
        await self.push(render(verdict.reply))
        if verdict.disconnect and self.transport is not None:
            self.transport.close()
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
        verdict = await self.ask(helo=policy_pb2.Helo(hostname=hostname, extended=extended))
        if not verdict.accept:
            await self.refuse_or(verdict, "")
            return
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
        ]
        if self.tls_context is not None and not self.tls_active:
            lines.append("STARTTLS")
        if self.tls_active:
            lines.append("AUTH PLAIN LOGIN")
        # Room for the parameters these extensions add to MAIL and RCPT.
        self.command_size_limits["MAIL"] = 512 + 26 + 100 + 10 + 500 + 14
        self.command_size_limits["RCPT"] = 512 + 500 + 30
        await self.push("\r\n".join(f"250-{x}" for x in lines[:-1]) + f"\r\n250 {lines[-1]}")

    async def smtp_STARTTLS(self, arg: str):
        if self.tls_active:
            await self.push("503 5.5.1 TLS already active")
            return
        await super().smtp_STARTTLS(arg)
        if self._tls_protocol is not None:
            await self.ask(tls_started=policy_pb2.TlsStarted(tls=self._tls_info()))

    async def smtp_NOOP(self, arg: str):
        await self.push("250 2.0.0 OK")

    async def smtp_QUIT(self, arg: str):
        await self.push("221 2.0.0 Bye")
        self._handler_coroutine.cancel()
        self.transport.close()

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
        with tracer.start_as_current_span("smtp.auth", attributes={"smtp.auth.mechanism": args[0].upper()}) as span:
            verdict = await self.ask(
                auth_start=policy_pb2.AuthStart(
                    mechanism=args[0].upper(), has_initial_response=len(args) == 2, initial_response=initial
                )
            )
            while verdict.has_challenge:
                await self.push("334 " + base64.b64encode(verdict.challenge).decode())
                line = await self._reader.readline()
                blob = line.rstrip(b"\r\n")
                if blob == b"*":
                    verdict = await self.ask(auth_response=policy_pb2.AuthResponse(cancelled=True))
                    break
                try:
                    data = base64.b64decode(blob, validate=True)
                except (binascii.Error, ValueError):
                    await self.ask(auth_response=policy_pb2.AuthResponse(cancelled=True))
                    await self.push("501 5.5.2 Cannot decode base64")
                    return
                verdict = await self.ask(auth_response=policy_pb2.AuthResponse(data=data))
            span.set_attribute("smtp.reply.code", verdict.reply.code)
        if verdict.accept:
            session.authenticated = True
            session.login_data = verdict.authenticated_user
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
        verdict = await self.ask(mail_from=policy_pb2.MailFrom(address=address, parameters=params))
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
        if len(self.envelope.rcpt_tos) >= self.backends.settings.max_recipients:
            await self.push("452 4.5.3 Too many recipients")
            return
        verdict = await self.ask(rcpt_to=policy_pb2.RcptTo(address=address, parameters=params))
        if verdict.accept:
            self.envelope.rcpt_tos.append(verdict.address or address)
            self.envelope.rcpt_options.append(params)
        await self.refuse_or(verdict, "250 2.1.5 Recipient OK")

    async def smtp_RSET(self, arg: str):
        self._set_rset_state()
        await self.ask(reset=policy_pb2.Reset())
        await self.push("250 2.0.0 OK")

    async def smtp_DATA(self, arg: str) -> None:
        assert self.session is not None and self.envelope is not None
        if self.envelope.mail_from is None:
            await self.push("503 5.5.1 Need MAIL command")
            return
        if not self.envelope.rcpt_tos:
            await self.push("554 5.5.1 No valid recipients")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        if not self.backends.queue.available:
            await self.push(render(QUEUE_DOWN))
            return
        verdict = await self.ask(data_start=policy_pb2.DataStart(recipient_count=len(self.envelope.rcpt_tos)))
        if not verdict.accept:
            await self.refuse_or(verdict, "")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self.in_data = True
        try:
            message, problem = await self._read_data()
        finally:
            self.in_data = False
        if problem:
            self._set_rset_state()
            await self.push(problem)
            return
        started = time.monotonic()
        try:
            status = await self._submit(message)
        finally:
            self._set_rset_state()
        await self.push(status)
        log.info(
            "message %s",
            "accepted" if status.startswith("250") else "refused",
            extra={"fields": {"session": self.session_id, "reply": status, "ms": round((time.monotonic() - started) * 1000, 1)}},
        )

    async def _read_data(self) -> tuple[bytes, str | None]:
        """Read up to the lone dot. Returns (message, None) or (b"", the reply refusing it).

        The whole message is read before refusing, so the client's next command is not
        taken from the middle of its message.
        """
        limit = self.data_size_limit
        lines: list[bytes] = []
        size = 0
        problem: str | None = None
        reader = self._reader
        mid_line = False  # after an over-long fragment, the next read continues that line
        count = 0
        while True:
            count += 1
            if count & 255 == 0:
                self._reset_timeout()
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as e:
                await reader.readexactly(e.consumed)
                problem = problem or "500 5.5.2 Line too long (RFC 5321 §4.5.3.1.6)"
                mid_line = True
                continue
            except asyncio.IncompleteReadError:
                raise ConnectionResetError("connection closed during DATA")
            if mid_line:
                mid_line = False
                continue
            if line == b".\r\n":
                break
            if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
                # A bare LF or CR: only <CRLF>.<CRLF> may end the data, and such a line
                # must not be passed on to an MTA that reads it differently.
                problem = problem or "554 5.6.0 Message contains bare CR or LF characters"
                continue
            if problem:
                continue
            size += len(line)
            if limit and size > limit:
                problem = "552 5.3.4 Message size exceeds fixed maximum message size"
                lines.clear()
                continue
            if len(line) > LINE_LIMIT + 1:
                problem = "500 5.5.2 Line too long (RFC 5321 §4.5.3.1.6)"
                lines.clear()
                continue
            lines.append(line[1:] if line[:1] == b"." else line)
        return (b"" if problem else b"".join(lines)), problem

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

    async def _submit(self, message: bytes) -> str:
        queue_id = new_queue_id()
        with tracer.start_as_current_span(
            "smtp.data",
            attributes={
                "submitd.queue_id": queue_id,
                "smtp.message.size": len(message),
                "smtp.recipients.count": len(self.envelope.rcpt_tos),
            },
        ) as span:
            envelope = self._envelope(queue_id)
            try:
                final_envelope, result = await rewrite(
                    self.backends.rewriter, envelope, message, self.backends.settings.rewriter_timeout
                )
                if final_envelope is None:
                    assert isinstance(result, common_pb2.Reply)
                    span.set_attribute("smtp.reply.code", result.code)
                    return render(result)
                await self.backends.queue.publish(final_envelope, result)
            except BackendUnavailable as e:
                span.set_attribute("smtp.reply.code", e.reply.code)
                # A failed publish ends the transaction, never the session.
                return render(e.reply) if e.reply.code != 421 else "451 4.3.0 Temporary failure, try again later"
            span.set_attribute("smtp.reply.code", 250)
            return f"250 2.0.0 Ok: queued as {queue_id}"
