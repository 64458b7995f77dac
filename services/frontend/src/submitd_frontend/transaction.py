"""The mail transaction's commands: MAIL, RCPT, DATA and BDAT, and one message's content from
the first octet to its reply. A part of :class:`~.session.Session` (which holds the state)."""

from __future__ import annotations

import logging
from collections import deque
import time

from opentelemetry import trace

from submitd.v1 import common_pb2, policy_pb2
from submitd_common.ids import new_queue_id
from submitd_common.replies import render

from . import metrics, replies
from .backends import QUEUE_DOWN
from .settings import Settings
from .state import Backends, Bdat, Connection, State, Submission, Transaction
from .wire import ChunkReader, CommandInput, DataReader, bdat_args, dsn_problem, mail_problem, parse_path

log = logging.getLogger("submitd.frontend")
tracer = trace.get_tracer("submitd.frontend")

DATA_DECIDED = policy_pb2.Verdict(accept=True)


class TransactionCommands:
    settings: Settings
    connection: Connection
    backends: Backends
    state: State
    input: CommandInput
    client_address: str
    session_id: str
    junk: int
    accepted: deque[str]  # the last ones (the session's closing log line)
    accepted_count: int
    refused: int

    def expired(self) -> bool:
        raise NotImplementedError

    async def send(self, reply: str) -> None:
        raise NotImplementedError

    async def answer(self, verdict: policy_pb2.Verdict, default: str) -> bool:
        raise NotImplementedError

    async def ask(self, **event) -> policy_pb2.Verdict:
        raise NotImplementedError

    async def mail(self, arg: str | None) -> None:
        state = self.state
        if not state.helo:
            await self.send(replies.NEED_HELO)
            return
        if state.transaction is not None:
            await self.send(replies.SENDER_GIVEN)
            return
        parsed = parse_path(arg, mail=True, extended=state.extended)
        problem = parsed if isinstance(parsed, str) else mail_problem(*parsed, self.settings.max_message_size, tls=state.tls)
        if problem:
            await self.send(problem)
            return
        address, params = parsed
        verdict = await self.ask(mail_from=policy_pb2.MailFrom(address=address, parameters=params))
        self._event("smtp.mail", "smtp.mail_from", address, verdict)
        if verdict.accept:
            state.transaction = Transaction(verdict.address or address, params)
        await self.answer(verdict, replies.SENDER_OK)

    async def rcpt(self, arg: str | None) -> None:
        transaction = self.state.transaction
        if transaction is None:
            await self.send(replies.NEED_MAIL)
            return
        parsed = parse_path(arg, mail=False, extended=self.state.extended)
        if isinstance(parsed, str):
            problem = parsed
        elif not parsed[0].isascii() and "SMTPUTF8" not in transaction.params:
            problem = replies.ADDRESS_NEEDS_SMTPUTF8
        else:
            problem = dsn_problem(parsed[1])
        if not problem and len(transaction.recipients) >= self.settings.max_recipients:
            problem = replies.TOO_MANY_RECIPIENTS
        if problem:
            await self.send(problem)
            return
        address, params = parsed
        verdict = await self.ask(rcpt_to=policy_pb2.RcptTo(address=address, parameters=params))
        self._event("smtp.rcpt", "smtp.rcpt_to", address, verdict)
        if verdict.accept:
            transaction.recipients.append((verdict.address or address, params))
            transaction.data_decided = verdict.data_decided
        await self.answer(verdict, replies.RECIPIENT_OK)

    def _event(self, name: str, attribute: str, address: str, verdict: policy_pb2.Verdict) -> None:
        # Per-command detail is an event on the session's span, not a span of its own; full
        # addresses only where the operator wants them, the domain otherwise.
        shown = address if self.settings.trace_addresses else address.rpartition("@")[2]
        trace.get_current_span().add_event(name, {attribute: shown, "smtp.reply.code": verdict.reply.code or 250})

    def may_start_data(self) -> str | None:
        """What DATA and the first BDAT must have before any content: the same for both."""
        transaction = self.state.transaction
        if transaction is None:
            return replies.NEED_MAIL
        if not transaction.recipients:
            return replies.NO_RECIPIENTS
        if not self.backends.queue_available:
            return render(QUEUE_DOWN)
        return None

    async def _data_verdict(self) -> policy_pb2.Verdict:
        """Policy's word on DATA (or BDAT): given already with the last RCPT when there is
        nothing left to decide or count, else asked now."""
        transaction = self.state.transaction
        assert transaction is not None
        if transaction.data_decided:
            return DATA_DECIDED
        return await self.ask(data_start=policy_pb2.DataStart(recipient_count=len(transaction.recipients)))

    def _start_message(self) -> tuple[Submission, trace.Span]:
        transaction = self.state.transaction
        assert transaction is not None
        queue_id = new_queue_id()
        span = tracer.start_span("smtp.data", attributes={
            "submitd.queue_id": queue_id, "smtp.recipients.count": len(transaction.recipients)})
        params, user, helo = transaction.params, self.state.user, self.state.helo
        envelope = common_pb2.Envelope(
            queue_id=queue_id, return_path=transaction.mail_from,
            recipients=[common_pb2.Recipient(address=a, notify=p.get("NOTIFY", ""), orcpt=p.get("ORCPT", ""))
                        for a, p in transaction.recipients],
            authenticated_user=user or "", client_address=self.client_address, helo=helo or "",
            smtputf8="SMTPUTF8" in params, body_type=params.get("BODY", "7BIT").upper(),
            dsn_ret=params.get("RET", "").upper(), dsn_envid=params.get("ENVID", ""),
            esmtp=self.state.extended, received_by=self.settings.hostname, require_tls="REQUIRETLS" in params,
        )
        if self.state.tls_info is not None:
            envelope.tls_version, envelope.tls_cipher = self.state.tls_info.version, self.state.tls_info.cipher
        return self.backends.submission(envelope), span

    async def data(self, arg: str | None) -> None:
        problem = self.may_start_data() or (replies.DATA_SYNTAX if arg else None)
        if problem:
            await self.send(problem)
            return
        verdict = await self._data_verdict()
        if not verdict.accept:
            await self.answer(verdict, "")
            return
        await self.send(replies.START_DATA)
        # "In data" lasts until the reply is written: a drain must not close a session whose
        # message is being queued (its client would retry a message that was accepted).
        self.state.in_data = True
        try:
            submission, span = self._start_message()
            with trace.use_span(span, end_on_exit=True):
                try:
                    status = await self._finish(submission, await self._read_data(submission))
                except BaseException:
                    await submission.abandon()
                    raise
                finally:
                    self.state.transaction = None
            await self._answer(status, submission)
        finally:
            self.state.in_data = False

    async def _read_data(self, submission: Submission) -> str | None:
        """The content up to CRLF "." CRLF, passed on as it comes; the refusal, or None.

        A refused message is still read to its end (and dropped), so that the client's next
        command is not taken from the middle of it."""
        reader = DataReader(self.settings.max_message_size)
        self.connection.expect(content=True)
        data = self.input.take()
        while True:
            if data:
                content, rest = reader.feed(data)
                if reader.problem:
                    await submission.abandon()
                elif content:
                    await submission.feed(content)
                if rest is not None:
                    self.input.feed(rest)  # pipelined commands after the end of data
                    return reader.problem
            data = await self.connection.read()
            if not data:
                raise EOFError("connection closed during DATA")
            await self._within_lifetime()

    async def _within_lifetime(self) -> None:
        """Message content counts against MAX_SESSION_SECONDS too (a BDAT transfer has no end of
        its own): past it the session ends at the next block read, its message never queued."""
        if self.expired():
            log.warning("session time limit reached in message content", extra={"fields": {
                "peer": self.client_address, "session": self.session_id}})
            await self.send(replies.SESSION_TOO_LONG)
            raise EOFError("session time limit reached during message content")

    async def _finish(self, submission: Submission, problem: str | None) -> str:
        if problem:
            await submission.abandon()
            trace.get_current_span().set_attribute("smtp.reply.code", int(problem[:3]))
            return problem
        started = time.monotonic()
        status = await submission.finish()
        metrics.EOD_LATENCY.observe(time.monotonic() - started)
        return status

    async def _answer(self, status: str, submission: Submission) -> None:
        """The reply to the end of a transaction, counted and logged."""
        await self.send(status)
        accepted = status.startswith("250")
        if accepted:
            self.junk = 0
            self.accepted.append(submission.envelope.queue_id)
            self.accepted_count += 1
            metrics.SIZE.observe(submission.size)
        else:
            self.refused += 1
        metrics.MESSAGES.labels("accepted" if accepted else "refused", status[:3]).inc()
        log.info("message %s", "accepted" if accepted else "refused", extra={"fields": {
            "session": self.session_id, "reply": status,
            "queue_id": submission.envelope.queue_id if accepted else None}})

    # -- CHUNKING (RFC 3030) ----------------------------------------------------------------------

    async def _end_bdat(self) -> None:
        bdat, self.state.bdat = self.state.bdat, None
        if bdat is not None:
            self.state.in_data = False
            await bdat.submission.abandon()
            bdat.span.end()

    async def bdat(self, arg: str | None) -> None:
        args = bdat_args(arg)
        if args is None:
            await self.send(replies.BDAT_SYNTAX)
            return
        size, last = args
        state = self.state
        if state.bdat is None:
            # The chunk is read whatever the answer: its octets are not commands.
            problem = self.may_start_data()
            if not problem:
                verdict = await self._data_verdict()
                problem = None if verdict.accept else render(verdict.reply)
            if state.transaction is not None:
                submission, span = self._start_message()
            else:  # nothing to submit: the chunk is read and dropped
                submission, span = _Nothing(), tracer.start_span("smtp.data")
            state.bdat = Bdat(ChunkReader(self.settings.max_message_size), submission, span, problem)
            state.in_data = True
        bdat = state.bdat
        done = last
        try:
            with trace.use_span(bdat.span, end_on_exit=False):
                await self._read_chunk(size, bdat)
                if not last:
                    await self.send(bdat.problem or bdat.reader.problem or replies.chunk_received(size))
                    return
                bdat.reader.finish()
                try:
                    status = await self._finish(bdat.submission, bdat.problem or bdat.reader.problem)
                finally:
                    state.transaction = None
            await self._answer(status, bdat.submission)
        except BaseException:
            done = True
            raise
        finally:
            if done:
                await self._end_bdat()

    async def _read_chunk(self, size: int, bdat: Bdat) -> None:
        """Exactly ``size`` octets, within the content deadlines, passed on as they come."""
        remaining = size
        self.connection.expect(content=True)
        while remaining:
            piece = self.input.take(remaining)
            if not piece:
                data = await self.connection.read()
                if not data:
                    raise EOFError("connection closed during BDAT")
                await self._within_lifetime()
                piece = data[:remaining]
                if len(data) > remaining:
                    self.input.feed(data[remaining:])
            remaining -= len(piece)
            content = bdat.reader.feed(piece)
            if bdat.problem or bdat.reader.problem:
                await bdat.submission.abandon()
            elif content:
                await bdat.submission.feed(content)


class _Nothing:
    """The submission of a BDAT refused before its content (no transaction): nothing kept."""

    envelope = common_pb2.Envelope()
    size = 0

    async def feed(self, content: bytes) -> None:
        pass

    async def abandon(self) -> None:
        pass

    async def finish(self) -> str:
        raise AssertionError("a refused BDAT is never finished")
