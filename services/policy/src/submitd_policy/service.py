"""The Policy gRPC service: one Session stream per SMTP connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
from opentelemetry import trace

from submitd.v1 import policy_pb2, policy_pb2_grpc
from submitd_common.files import WatchedFile
from submitd_common.replies import reply
from submitd_common.telemetry import extract_context

from submitd_common.users import UserDB

from . import metrics, rules
from .apppasswords import AppPasswords
from .auth import Auth
from .counters import Counters
from .credentials import Authenticator
from .decisions import Decisions
from .directories import build as build_directory
from .directories.chain import Directories
from .lockouts import Lockouts
from . import oauth
from .oauth.auth import TokenAuth
from .settings import Settings

log = logging.getLogger("submitd.policy")
tracer = trace.get_tracer("submitd.policy")

class ErrorLog:
    """RFC 6409 §5.2: refusals are logged with the client's identity and the reason, at most
    ``per_minute`` lines per client address (then one line saying how many were left out)."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.windows: dict[str, list] = {}

    def refused(self, state: rules.SessionState, event: str, verdict: policy_pb2.Verdict) -> None:
        now = time.monotonic()
        window = self.windows.get(state.peer)
        if window is None or now - window[0] >= 60:
            if window and window[2]:
                log.warning("refusals not logged", extra={"fields": {"peer": state.peer, "suppressed": window[2]}})
            window = self.windows[state.peer] = [now, 0, 0]
            if len(self.windows) > 10_000:  # bounded memory under address-spraying clients
                self.windows = {state.peer: window}
        if window[1] >= self.per_minute:
            window[2] += 1
            return
        window[1] += 1
        log.warning(
            "refused",
            extra={
                "fields": {
                    "peer": state.peer,
                    "helo": state.helo,
                    "user": state.user.login if state.user else None,
                    "session": state.session_id,
                    "event": event,
                    "reply": f"{verdict.reply.code} {verdict.reply.enhanced} {verdict.reply.text}",
                }
            },
        )


def default_directories(settings: Settings, users: WatchedFile[UserDB]) -> Directories:
    """The chain the settings name (``directories``), with the settings' TTL, grace and timeout."""
    return Directories(
        [build_directory(name, settings, users) for name in settings.directories],
        ttl=settings.directory_cache_seconds, grace=settings.directory_grace_seconds,
        timeout=settings.directory_timeout, max_entries=settings.auth_cache_entries,
    )


class PolicyService(policy_pb2_grpc.PolicyServicer):
    def __init__(
        self, settings: Settings, users: WatchedFile[UserDB], rates: Counters | None, authfail: Counters | None,
        known: Counters | None = None, directories: Directories | None = None,
        app_passwords: AppPasswords | None = None,
    ) -> None:
        self.errors = ErrorLog(settings.error_log_per_minute)
        self.directories = directories or default_directories(settings, users)
        self.decisions = Decisions(settings, users, rates, self.directories)
        self.authenticator = Authenticator(
            self.directories,
            concurrency=settings.password_hash_concurrency,
            queue=settings.password_hash_queue,
            cache_seconds=settings.auth_cache_seconds,
            cache_entries=settings.auth_cache_entries,
            app_passwords=app_passwords,
        )
        lockouts = Lockouts(authfail, settings, windows=rates, known=known)
        self.auth = Auth(settings, self.authenticator, lockouts)
        self.tokens = oauth.build_validator(settings) if settings.oauth_mode else None
        if self.tokens is not None:
            self.auth.tokens = TokenAuth(settings, self.tokens, self.directories.lookup, lockouts, self.auth._delay)

    async def Sessions(self, request_iterator, context: grpc.aio.ServicerContext):
        """Many SMTP sessions over one stream. Each request runs as its own task, so a slow
        one (a password hash) never holds up the others; replies go out as they are ready,
        batched with whatever else is ready."""
        states: dict[str, rules.SessionState] = {}
        ready: asyncio.Queue[policy_pb2.SessionReply | None] = asyncio.Queue()
        running: set[asyncio.Task] = set()

        async def serve(request: policy_pb2.SessionRequest, state: rules.SessionState) -> None:
            ready.put_nowait(policy_pb2.SessionReply(id=request.id, verdicts=await self.answer(state, request)))

        async def read_requests() -> None:
            try:
                async for batch in request_iterator:
                    for request in batch.requests:
                        if request.end:
                            if states.pop(request.session_id, None) is not None:
                                metrics.SESSIONS.dec()
                            continue
                        state = states.get(request.session_id)
                        if state is None:
                            state = states[request.session_id] = rules.SessionState(session_id=request.session_id)
                            metrics.SESSIONS.inc()
                        task = asyncio.create_task(serve(request, state))
                        running.add(task)
                        task.add_done_callback(running.discard)
                if running:
                    await asyncio.wait(set(running))
            finally:
                ready.put_nowait(None)  # the frontend half-closed, or the stream broke

        reader = asyncio.create_task(read_requests())
        metrics.STREAMS.inc()
        metrics.STREAMS_OPENED.inc()
        try:
            while True:
                first = await ready.get()
                if first is None:
                    break
                replies = [first]
                while not ready.empty():
                    more = ready.get_nowait()
                    if more is None:
                        yield policy_pb2.VerdictBatch(replies=replies)
                        return
                    replies.append(more)
                yield policy_pb2.VerdictBatch(replies=replies)
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()
            metrics.STREAMS.dec()
            metrics.SESSIONS.dec(len(states))  # a stream that ends takes its sessions with it
            states.clear()
            with contextlib.suppress(BaseException):
                await reader  # a broken stream's error: the frontend sees it on its side

    async def Capabilities(self, request: policy_pb2.CapabilitiesRequest, context) -> policy_pb2.CapabilitiesReply:
        return policy_pb2.CapabilitiesReply(auth_mechanisms=self.auth.mechanisms)

    async def answer(self, state: rules.SessionState, request: policy_pb2.SessionRequest) -> list[policy_pb2.Verdict]:
        """One verdict per event, in order. An AUTH step is traced as a child of the frontend's
        span that asked (it is where a slow password hash shows); other steps are not."""
        if request.trace_context and any(e.WhichOneof("event") in ("auth_start", "auth_response") for e in request.events):
            with tracer.start_as_current_span(
                "policy.auth", context=extract_context(request.trace_context), kind=trace.SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.service": "submitd.v1.Policy", "rpc.method": "Sessions"},
            ) as span:
                verdicts = [await self.step(state, e) for e in request.events]
                span.set_attribute("smtp.reply.code", verdicts[-1].reply.code)
                return verdicts
        return [await self.step(state, e) for e in request.events]

    async def step(self, state: rules.SessionState, event: policy_pb2.SessionEvent) -> policy_pb2.Verdict:
        kind = event.WhichOneof("event")
        try:
            verdict = await self.decide(state, kind, getattr(event, kind))
        except Exception:
            log.exception("policy failure on %s", kind)
            verdict = policy_pb2.Verdict(accept=False, reply=reply(451, "4.3.0", "Temporary policy failure"))
        if not verdict.accept and not verdict.has_challenge:
            self.errors.refused(state, kind, verdict)
        metrics.DECISIONS.labels(kind, "accepted" if verdict.accept else "challenge" if verdict.has_challenge else "refused").inc()
        return verdict

    async def decide(self, state: rules.SessionState, kind: str, ev) -> policy_pb2.Verdict:
        if kind == "auth_start":
            return await self.auth.start(state, ev)
        if kind == "auth_response":
            return await self.auth.step(state, ev)
        return await self.decisions.decide(state, kind, ev)
