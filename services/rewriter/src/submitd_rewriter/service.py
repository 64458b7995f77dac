"""The Rewriter gRPC service: envelope and chunks in; a reject, or envelope, chunks and the
signature fields out."""

from __future__ import annotations

import logging

import grpc
from prometheus_client import Counter
from opentelemetry import trace

from submitd.v1 import common_pb2, rewriter_pb2, rewriter_pb2_grpc
from submitd_common.files import WatchedFile
from submitd_common.replies import reply
from submitd_common.telemetry import extract_context, server_call
from submitd_common.users import UserDB

from . import dkim, encoding, headers
from .message import Options, Refused, addresses_of, rewrite_header
from .settings import Settings

tracer = trace.get_tracer("submitd.rewriter")

log = logging.getLogger("submitd.rewriter")
ACTIONS = Counter("submitd_rewriter_actions_total", "Changes the rewriter made to messages", ["action"])
SIGNATURES = Counter("submitd_dkim_signatures_total", "DKIM signatures added", ["algorithm"])
REFUSED = Counter("submitd_rewriter_refused_total", "Messages the rewriter refused", ["code"])
TOO_LARGE = reply(552, "5.3.4", "Message header section too large")


class RewriterService(rewriter_pb2_grpc.RewriterServicer):
    def __init__(
        self,
        settings: Settings,
        users: WatchedFile[UserDB] | None = None,
        keys: WatchedFile[dict[str, list[dkim.Key]]] | None = None,
        rules: WatchedFile | None = None,
    ) -> None:
        self.settings = settings
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

    async def RewriteMany(self, request_iterator, context: grpc.aio.ServicerContext):
        """Whole messages of many sessions on one stream; each batch is answered in one reply
        message (rewriting is CPU only, so there is nothing to wait for in between)."""
        async for batch in request_iterator:
            replies = []
            for item in batch.items:
                with tracer.start_as_current_span(
                    "submitd.v1.Rewriter/RewriteMany", context=extract_context(item.trace_context),
                    kind=trace.SpanKind.SERVER,
                    attributes={"rpc.system": "grpc", "rpc.service": "submitd.v1.Rewriter", "rpc.method": "RewriteMany"},
                ):
                    result = self.rewrite_whole(item.message)
                replies.append(rewriter_pb2.WholeReply(id=item.id, result=result))
            yield rewriter_pb2.WholeReplies(replies=replies)

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
