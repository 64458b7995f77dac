"""The Rewriter gRPC service: envelope and chunks in; a reject, or envelope and chunks out."""

from __future__ import annotations

import logging

import grpc
from opentelemetry import trace

from submitd.v1 import rewriter_pb2, rewriter_pb2_grpc
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
                    yield rewriter_pb2.RewriteResponse(reject=reply(552, "5.3.4", "Message header section too large"))
                    return
                continue
            header_done = True
            for out in self._rewrite(envelope, *split):
                yield out
            pending.clear()
        if envelope is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no envelope")
        if not header_done:
            # The whole message is a header section without a body (or without its blank line).
            msg = bytes(pending)
            if msg and not msg.endswith(b"\r\n"):
                msg += b"\r\n"
            for out in self._rewrite(envelope, msg, b""):
                yield out

    def _rewrite(self, envelope, header: bytes, rest: bytes):
        new_header, actions = headers.complete(
            header,
            add_date=self.settings.add_date,
            add_message_id=self.settings.add_message_id,
            domain=self.settings.message_id_domain,
        )
        span = trace.get_current_span()
        span.set_attribute("submitd.rewriter.actions", actions)
        yield rewriter_pb2.RewriteResponse(envelope=envelope)
        yield rewriter_pb2.RewriteResponse(chunk=new_header + rest)
