"""The Rewriter gRPC service: a message in, completed, signed and queued (Submit, SubmitMany: the
frontend's), or handed back (Rewrite, RewriteWhole: the relay's reports)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
import nats.errors
import nats.js.errors
from prometheus_client import Counter
from opentelemetry import trace

from submitd.v1 import common_pb2, rewriter_pb2, rewriter_pb2_grpc
from submitd_common.files import WatchedFile
from submitd_common.replies import reply
from submitd_common.telemetry import extract_context, server_call
from submitd_common.users import UserDB

from . import dkim, encoding, headers, withdrawals
from .message import Options, Refused, addresses_of, rewrite_header
from .queue import QUEUE_DOWN, QueueUnavailable, QueueWriter
from .settings import Settings

tracer = trace.get_tracer("submitd.rewriter")

log = logging.getLogger("submitd.rewriter")
ACTIONS = Counter("submitd_rewriter_actions_total", "Changes the rewriter made to messages", ["action"])
SIGNATURES = Counter("submitd_dkim_signatures_total", "DKIM signatures added", ["algorithm"])
REFUSED = Counter("submitd_rewriter_refused_total", "Messages the rewriter refused", ["code"])
TOO_LARGE = reply(552, "5.3.4", "Message header section too large")
GIVEN_UP = reply(451, "4.3.0", "Message incomplete, not queued")


class RewriterService(rewriter_pb2_grpc.RewriterServicer):
    def __init__(
        self,
        settings: Settings,
        users: WatchedFile[UserDB] | None = None,
        keys: WatchedFile[dict[str, list[dkim.Key]]] | None = None,
        rules: WatchedFile | None = None,
        queue: QueueWriter | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.users = users
        self.keys = keys
        self.rules = rules
        self.options = Options(
            domain=settings.message_id_domain,
            add_date=settings.add_date,
            fix_date=settings.fix_date,
            add_message_id=settings.add_message_id,
            fix_message_id=settings.fix_message_id,
            add_sender=settings.add_sender,
            check_addresses=settings.check_header_addresses,
            check_from=settings.check_header_from,
            complete_domain=settings.complete_domain,
            max_hops=settings.max_hops,
            max_fields=settings.max_header_fields,
            hide_client=settings.received_client == "hide",
        )

    async def Rewrite(self, request_iterator, context: grpc.aio.ServicerContext):
        with server_call(tracer, "/submitd.v1.Rewriter/Rewrite", context):
            async for response in self._rewrite(request_iterator, context):
                yield response

    async def _rewrite(self, request_iterator, context: grpc.aio.ServicerContext):
        envelope = None
        pending = bytearray()
        job: Job | None = None
        async for req in request_iterator:
            part = req.WhichOneof("part")
            if part == "envelope":
                envelope = req.envelope
                continue
            if envelope is None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the envelope comes first")
            if job is not None:
                yield rewriter_pb2.RewriteResponse(chunk=job.body(req.chunk))
                continue
            pending += req.chunk
            split = headers.split_header(bytes(pending))
            # Until its end is seen, the header is at least all of pending but a blank line's CR.
            if (len(split[0]) if split else len(pending) - 1) > self.settings.max_header_bytes:
                yield rewriter_pb2.RewriteResponse(reject=TOO_LARGE)
                return
            if split is None:
                continue
            pending.clear()
            job = Job(self, envelope)
            try:
                first = job.start(*split)
            except Refused as e:
                yield rewriter_pb2.RewriteResponse(reject=e.reply)
                return
            yield rewriter_pb2.RewriteResponse(envelope=job.envelope)
            yield rewriter_pb2.RewriteResponse(chunk=first)
        if envelope is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no envelope")
        if job is None:
            job = Job(self, envelope)
            try:
                first = job.start(*header_only(bytes(pending)))
            except Refused as e:
                yield rewriter_pb2.RewriteResponse(reject=e.reply)
                return
            yield rewriter_pb2.RewriteResponse(envelope=job.envelope)
            yield rewriter_pb2.RewriteResponse(chunk=first)
        tail = job.tail()
        if tail:
            yield rewriter_pb2.RewriteResponse(chunk=tail)
        yield rewriter_pb2.RewriteResponse(prepend=job.finish())

    async def RewriteWhole(self, request: rewriter_pb2.WholeMessage, context) -> rewriter_pb2.WholeResult:
        with server_call(tracer, "/submitd.v1.Rewriter/RewriteWhole", context):
            return self.rewrite_whole(request)

    async def SubmitMany(self, request_iterator, context: grpc.aio.ServicerContext):
        """Whole messages of many sessions on one stream, each completed, signed and queued at
        once; a batch is answered in one stream message when JetStream stored all of it (they
        were published together, and are acknowledged together), and batches answered together
        share one. A withdrawn item still being queued is withdrawn; when the stream ends or
        breaks (the frontend went), so is every item still being queued."""
        if self.queue is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this rewriter queues nothing")
        ready: asyncio.Queue = asyncio.Queue()  # lists of replies; an empty one only wakes the writer
        working: dict[int, asyncio.Task] = {}
        batches: set[asyncio.Task] = set()

        async def one(item) -> rewriter_pb2.SubmitReply:
            with tracer.start_as_current_span(
                "submitd.v1.Rewriter/SubmitMany", context=extract_context(item.trace_context),
                kind=trace.SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.service": "submitd.v1.Rewriter", "rpc.method": "SubmitMany"},
            ):
                result = await self.submit_whole(item.message)
            return rewriter_pb2.SubmitReply(id=item.id, result=result)

        async def answer(tasks: list[tuple[int, asyncio.Task]]) -> None:
            await asyncio.wait([task for _, task in tasks])
            replies = []
            for item_id, task in tasks:
                if working.get(item_id) is task:
                    del working[item_id]
                if task.cancelled():
                    continue  # withdrawn: nobody waits for it
                if task.exception() is not None:
                    log.error("submission failed", exc_info=task.exception())
                    replies.append(rewriter_pb2.SubmitReply(
                        id=item_id, result=rewriter_pb2.SubmitResult(reply=QUEUE_DOWN)))
                else:
                    replies.append(task.result())
            batches.discard(asyncio.current_task())  # (before the writer looks whether all is done)
            ready.put_nowait(replies)

        async def read() -> None:
            try:
                await take(request_iterator)
            finally:
                ready.put_nowait([])

        async def take(requests) -> None:
            async for batch in requests:
                tasks = []
                for item in batch.items:
                    if item.withdraw:
                        withdrawals.ASKED.inc()
                        task = working.get(item.id)
                        if task is not None and not task.done():
                            task.cancel()  # the publish under way is withdrawn (QueueWriter)
                            continue
                        # Queued already (its answer and the withdraw crossed), or on another call:
                        # the client was told 451 and sends it again, so the entry is withdrawn.
                        if item.queue_id:
                            self.queue.withdrawals.add(item.queue_id)
                        continue
                    task = asyncio.create_task(one(item))
                    working[item.id] = task
                    tasks.append((item.id, task))
                if tasks:
                    batches.add(asyncio.create_task(answer(tasks)))

        reader = asyncio.create_task(read())
        try:
            while True:
                replies = list(await ready.get())
                while not ready.empty():
                    replies += ready.get_nowait()
                if replies:
                    yield rewriter_pb2.SubmitReplies(replies=replies)
                if reader.done() and not batches and ready.empty():
                    reader.result()  # (a broken request stream ends the call with its error)
                    return
        finally:
            reader.cancel()
            pending = [reader, *batches, *working.values()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def submit_whole(self, message: rewriter_pb2.WholeMessage) -> rewriter_pb2.SubmitResult:
        result = self.rewrite_whole(message)
        if result.WhichOneof("result") == "reject":
            return rewriter_pb2.SubmitResult(reply=result.reject)
        envelope = result.accepted.envelope
        try:
            await self.queue.publish(envelope, result.accepted.message)
        except QueueUnavailable as e:
            return self._not_queued(e.reply)
        return rewriter_pb2.SubmitResult(queued=envelope.queue_id)

    def _not_queued(self, smtp_reply) -> rewriter_pb2.SubmitResult:
        """The queue did not take it: the reply, and whether the frontend should refuse DATA up
        front until this rewriter serves again (NATS is away)."""
        return rewriter_pb2.SubmitResult(reply=smtp_reply, queue_unavailable=not self.queue.available)

    async def Submit(self, request_iterator, context: grpc.aio.ServicerContext) -> rewriter_pb2.SubmitResult:
        """A larger message: its output written into the Object Store as it is produced (at most
        a few chunks waiting for NATS: a slow queue slows the call, and so the client), then
        its queue entry. A refusal or a failure removes what was stored; a cancelled call
        (the client went) removes it too, or withdraws the entry if it was being published."""
        if self.queue is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this rewriter queues nothing")
        with server_call(tracer, "/submitd.v1.Rewriter/Submit", context):
            writer = None
            whole = False

            async def until_the_end():
                # Only an explicit end makes the message whole: a stream that merely stops (a
                # cancelled call can look like one that was finished) is never queued.
                nonlocal whole
                async for request in request_iterator:
                    if request.WhichOneof("part") == "end":
                        whole = True
                        return
                    yield request

            try:
                envelope, prefix = None, b""
                async for part in self._rewrite(until_the_end(), context):
                    kind = part.WhichOneof("part")
                    if kind == "chunk":
                        await writer.write(part.chunk)
                    elif kind == "envelope":
                        envelope = part.envelope
                        writer = self.queue.body_writer(envelope.queue_id)
                    elif kind == "prepend":
                        prefix = part.prepend
                    elif kind == "reject":
                        trace.get_current_span().set_attribute("smtp.reply.code", part.reject.code)
                        return rewriter_pb2.SubmitResult(reply=part.reject)
                if not whole or context.cancelled():
                    await self._abort(writer)
                    return rewriter_pb2.SubmitResult(reply=GIVEN_UP)
                await writer.close()
            except (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError, OSError) as e:
                log.warning("queue unavailable while storing a body: %r", e)
                await self._abort(writer)
                return self._not_queued(QUEUE_DOWN)
            except BaseException:
                await self._abort(writer)
                raise
            try:
                await self.queue.publish_stored(envelope, prefix, writer)
            except QueueUnavailable as e:
                # Not removed: the entry may be stored after all (then withdrawn); an unused body
                # goes by the relay's orphan sweep.
                return self._not_queued(e.reply)
            return rewriter_pb2.SubmitResult(queued=envelope.queue_id)

    @staticmethod
    async def _abort(writer) -> None:
        if writer is not None and not writer.closed:
            # Shielded: a cancelled call (the client went) still removes its chunks.
            with contextlib.suppress(BaseException):
                await asyncio.shield(writer.abort())

    def rewrite_whole(self, request: rewriter_pb2.WholeMessage) -> rewriter_pb2.WholeResult:
        split = headers.split_header(request.message) or header_only(request.message)
        if len(split[0]) > self.settings.max_header_bytes:
            return rewriter_pb2.WholeResult(reject=TOO_LARGE)
        job = Job(self, request.envelope)
        try:
            first = job.start(*split)
        except Refused as e:
            return rewriter_pb2.WholeResult(reject=e.reply)
        first += job.tail()
        message = job.finish() + first
        return rewriter_pb2.WholeResult(accepted=rewriter_pb2.WholeMessage(envelope=job.envelope, message=message))


class Job:
    """One message: its header rewritten at once, its body hashed as it streams by."""

    def __init__(self, service: RewriterService, envelope: common_pb2.Envelope) -> None:
        self.service = service
        self.envelope = common_pb2.Envelope()
        self.envelope.CopyFrom(envelope)
        self.fields = []
        self.keys: list[dkim.Key] = []
        self.hasher: dkim.BodyHash | None = None
        self.qp: encoding.QuotedPrintable | None = None

    def start(self, header: bytes, rest: bytes) -> bytes:
        users = self.service.users.value if self.service.users else None
        rules = self.service.rules.value if self.service.rules else None
        try:
            result = rewrite_header(header, self.envelope, users, self.service.options, rules)
        except Refused as e:
            REFUSED.labels(str(e.reply.code)).inc()
            trace.get_current_span().set_attribute("smtp.reply.code", e.reply.code)
            raise
        new_header = result.header
        fields = result.fields
        if (
            self.service.settings.seven_bit
            and self.envelope.body_type == "8BITMIME"
            and encoding.convertible(fields)
        ):
            fields = encoding.mark_quoted_printable(fields)
            new_header = b"".join(f.raw for f in fields)
            self.qp = encoding.QuotedPrintable()
            self.envelope.body_type = "7BIT"
            result.actions.append("transfer_encoded")
            rest = b"\r\n" + self.qp.update(rest[2:] if rest.startswith(b"\r\n") else rest)
        self.fields = [(f.name, f.raw) for f in fields]
        self.keys = self._signing_keys(fields)
        span = trace.get_current_span()
        span.set_attribute("submitd.rewriter.actions", result.actions)
        for action in result.actions:
            ACTIONS.labels(action).inc()
        span.set_attribute("submitd.dkim.selectors", [k.selector for k in self.keys])
        if self.keys:
            self.hasher = dkim.BodyHash()
            # rest starts with the blank line that ends the header: not part of the body
            self.hasher.update(rest[2:] if rest.startswith(b"\r\n") else rest)
        return new_header + rest

    def body(self, chunk: bytes) -> bytes:
        if self.qp is not None:
            chunk = self.qp.update(chunk)
        return self.body_bytes(chunk)

    def tail(self) -> bytes:
        """What a conversion still holds back (a last line without CRLF)."""
        if self.qp is None:
            return b""
        return self.body_bytes(self.qp.finish())

    def body_bytes(self, data: bytes) -> bytes:
        if self.hasher is not None:
            self.hasher.update(data)
        return data

    def finish(self) -> bytes:
        """The fields to put in front: the signatures over everything sent."""
        if not self.keys:
            return b""
        body_hash = self.hasher.digest()
        for key in self.keys:
            SIGNATURES.labels(key.algorithm).inc()
        return b"".join(dkim.sign(self.fields, body_hash, key) for key in self.keys)

    def _signing_keys(self, fields) -> list[dkim.Key]:
        if self.service.keys is None:
            return []
        froms = [f for f in fields if f.key == "from"]
        if len(froms) != 1:
            return []
        try:
            addrs = addresses_of(froms[0], self.envelope.smtputf8)
        except Refused:
            return []
        if len(addrs) != 1:
            return []
        return list(self.service.keys.value.get(addrs[0].domain, []))


def header_only(message: bytes) -> tuple[bytes, bytes]:
    """A message that is all header section (no blank line): the header and no rest."""
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    return message, b""
