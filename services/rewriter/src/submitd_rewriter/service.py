"""The Rewriter gRPC service: envelope and chunks in; a reject, or envelope and chunks out."""

from __future__ import annotations

import logging

import grpc
from opentelemetry import trace

from submitd.v1 import common_pb2, rewriter_pb2, rewriter_pb2_grpc
from submitd_common.replies import reply

from . import headers
from .settings import Settings

log = logging.getLogger("submitd.rewriter")


class RewriterService(rewriter_pb2_grpc.RewriterServicer):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def Rewrite(self, request_iterator, context: grpc.aio.ServicerContext):
        envelope = None
        pending = bytearray()
        header_done = False
        async for req in request_iterator:
            part = req.WhichOneof("part")
            if part == "envelope":
                envelope = req.envelope
                continue
            if envelope is None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the envelope comes first")
            if header_done:
                yield rewriter_pb2.RewriteResponse(chunk=req.chunk)
                continue
            pending += req.chunk
            split = headers.split_header(bytes(pending))
            if split is None:
                if len(pending) > self.settings.max_header_bytes:
                    yield rewriter_pb2.RewriteResponse(reject=TOO_LARGE)
                    return
                continue
            header_done = True
            result = self.process(envelope, *split)
            if isinstance(result, common_pb2.Reply):
                yield rewriter_pb2.RewriteResponse(reject=result)
                return
            yield rewriter_pb2.RewriteResponse(envelope=result[0])
            yield rewriter_pb2.RewriteResponse(chunk=result[1])
            pending.clear()
        if envelope is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no envelope")
        if not header_done:
            result = self.process(envelope, *header_only(bytes(pending)))
            if isinstance(result, common_pb2.Reply):
                yield rewriter_pb2.RewriteResponse(reject=result)
                return
            yield rewriter_pb2.RewriteResponse(envelope=result[0])
            yield rewriter_pb2.RewriteResponse(chunk=result[1])

    async def RewriteWhole(self, request: rewriter_pb2.WholeMessage, context) -> rewriter_pb2.WholeResult:
        split = headers.split_header(request.message) or header_only(request.message)
        if len(split[0]) > self.settings.max_header_bytes:
            return rewriter_pb2.WholeResult(reject=TOO_LARGE)
        result = self.process(request.envelope, *split)
        if isinstance(result, common_pb2.Reply):
            return rewriter_pb2.WholeResult(reject=result)
        return rewriter_pb2.WholeResult(accepted=rewriter_pb2.WholeMessage(envelope=result[0], message=result[1]))

    def process(self, envelope: common_pb2.Envelope, header: bytes, rest: bytes):
        """The rewritten (envelope, header + rest), or the Reply refusing the message."""
        new_header, actions = headers.complete(
            header,
            add_date=self.settings.add_date,
            add_message_id=self.settings.add_message_id,
            domain=self.settings.message_id_domain,
        )
        trace.get_current_span().set_attribute("submitd.rewriter.actions", actions)
        return envelope, new_header + rest


TOO_LARGE = reply(552, "5.3.4", "Message header section too large")


def header_only(message: bytes) -> tuple[bytes, bytes]:
    """A message that is all header section (no blank line): the header and no rest."""
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    return message, b""
