"""The Policy gRPC service: one Session stream per SMTP connection."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time

import grpc
from opentelemetry import trace

from submitd.v1 import policy_pb2, policy_pb2_grpc
from submitd_common.files import WatchedFile
from submitd_common.replies import reply
from submitd_common.telemetry import extract_context

from . import metrics, rules
from .counters import Counters, key_part
from .credentials import Authenticator, HashingBusy, Locked
from .sasl import MECHANISMS, SaslMalformed
from .settings import Settings
from submitd_common.users import UserDB

log = logging.getLogger("submitd.policy")
tracer = trace.get_tracer("submitd.policy")

ACCEPT = policy_pb2.Verdict(accept=True)


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


class PolicyService(policy_pb2_grpc.PolicyServicer):
    def __init__(
        self, settings: Settings, users: WatchedFile[UserDB], rates: Counters | None, authfail: Counters | None
    ) -> None:
        self.settings = settings
        self.users = users
        self.rates = rates
        self.counters = authfail
        self.trusted = [ipaddress.ip_network(n, strict=False) for n in settings.trusted_networks]
        self.errors = ErrorLog(settings.error_log_per_minute)
        self.authenticator = Authenticator(
            users,
            concurrency=settings.password_hash_concurrency,
            queue=settings.password_hash_queue,
            cache_seconds=settings.auth_cache_seconds,
            cache_entries=settings.auth_cache_entries,
        )

    def context(self) -> rules.Context:
        return rules.Context(self.settings, self.users.value, self.rates)

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
        if kind == "connect":
            state.session_id = ev.session_id
            state.peer = ev.proxy_address or ev.peer_address
            state.tls = ev.implicit_tls or bool(ev.tls.version)
            state.trusted = rules.in_networks(state.peer, self.trusted)
            return ACCEPT
        if kind == "helo":
            state.helo = ev.hostname
            return ACCEPT
        if kind == "tls_started":
            state.tls = True
            state.user = None
            state.helo = ""
            return ACCEPT
        if kind == "auth_start":
            return await self.auth_start(state, ev)
        if kind == "auth_response":
            return await self.auth_step(state, ev)
        if kind == "reset":
            self._reset(state)
            return ACCEPT
        ctx = self.context()
        if kind == "mail_from":
            self._reset(state)
            parsed = rules.parse_for(ev, ctx, sender=True, utf8="SMTPUTF8" in ev.parameters)
            if isinstance(parsed, policy_pb2.Verdict):
                return parsed
            verdict = await rules.first_refusal(rules.MAIL_RULES, ctx, state, rules.Ask(ev, parsed))
            if verdict is not None:
                return verdict
            state.mail_from = str(parsed) if parsed else ""
            return self._accept_address(ev.address, parsed)
        if kind == "rcpt_to":
            parsed = rules.parse_for(ev, ctx, sender=False, utf8=True)
            if isinstance(parsed, policy_pb2.Verdict):
                return parsed
            verdict = await rules.first_refusal(rules.RCPT_RULES, ctx, state, rules.Ask(ev, parsed))
            if verdict is not None:
                return verdict
            state.recipients += 1
            if not state.authorized:
                state.extra["postmaster_only"] = True
            verdict = self._accept_address(ev.address, parsed)
            if rules.data_needs_no_question(ctx, state):
                verdict = policy_pb2.Verdict(accept=True, address=verdict.address, data_decided=True)
            return verdict
        if kind == "data_start":
            return await rules.first_refusal(rules.DATA_RULES, ctx, state, rules.Ask(ev, None)) or ACCEPT
        return rules.refuse(502, "5.5.1", "Command not implemented")

    @staticmethod
    def _reset(state: rules.SessionState) -> None:
        state.mail_from = None
        state.recipients = 0
        state.extra.pop("postmaster_only", None)

    @staticmethod
    def _accept_address(given: str, parsed) -> policy_pb2.Verdict:
        # Tell the frontend when the address changed (domain completion).
        if parsed is not None and parsed.domain and str(parsed) != given and parsed.local == given.rpartition("@")[0]:
            return policy_pb2.Verdict(accept=True, address=str(parsed))
        return ACCEPT

    # -- AUTH -----------------------------------------------------------------------------

    async def auth_start(self, state: rules.SessionState, ev: policy_pb2.AuthStart) -> policy_pb2.Verdict:
        if not state.tls and not self.settings.allow_auth_without_tls:
            return rules.refuse(538, "5.7.11", "Encryption required for requested authentication mechanism")
        if state.user is not None:
            return rules.refuse(503, "5.5.1", "Already authenticated")
        if self.counters is not None:
            failures = await self.counters.get(f"client.{key_part(state.peer)}")
            if failures >= self.settings.auth_failures_per_client:
                await asyncio.sleep(self.settings.auth_failure_delay)
                return rules.refuse(421, "4.7.0", "Too many authentication failures, try again later", disconnect=True)
        factory = MECHANISMS.get(ev.mechanism.upper())
        if factory is None:
            return rules.refuse(504, "5.5.4", "Unrecognized authentication type")
        state.sasl = factory()
        return await self._sasl(state, lambda m: m.start(ev.initial_response if ev.has_initial_response else None))

    async def auth_step(self, state: rules.SessionState, ev: policy_pb2.AuthResponse) -> policy_pb2.Verdict:
        if state.sasl is None:
            return rules.refuse(503, "5.5.1", "No authentication in progress")
        if ev.cancelled:
            state.sasl = None
            return rules.refuse(501, "5.0.0", "Authentication cancelled")
        return await self._sasl(state, lambda m: m.respond(ev.data))

    async def _sasl(self, state: rules.SessionState, advance) -> policy_pb2.Verdict:
        try:
            step = advance(state.sasl)
        except SaslMalformed as e:
            state.sasl = None
            return rules.refuse(501, "5.5.2", f"Cannot decode response: {e}")
        if step.challenge is not None:
            return policy_pb2.Verdict(accept=False, has_challenge=True, challenge=step.challenge)
        state.sasl = None
        creds = step.credentials
        assert creds is not None
        login_key = f"login.{key_part(creds.login + chr(0) + state.peer)}"
        if self.counters is not None and await self.counters.get(login_key) >= self.settings.auth_failures_per_login:
            # Locked for this login from this address only: the user elsewhere is not affected.
            await asyncio.sleep(self.settings.auth_failure_delay)
            return rules.refuse(454, "4.7.0", "Temporary authentication failure, try again later")
        reserved = False

        async def admit() -> bool:
            # The guess counts before its password is checked, in one atomic step: N parallel
            # guesses get at most the limit of checks, never N (then refused like the rest).
            nonlocal reserved
            if self.counters is None:
                return True
            reserved = True
            return await self.counters.add(login_key, 1) <= self.settings.auth_failures_per_login

        try:
            user = await self.authenticator.authenticate(creds.login, creds.password, admit=admit)
        except (HashingBusy, Locked) as e:
            if reserved:
                await self.counters.add(login_key, -1)
            if isinstance(e, Locked):
                await asyncio.sleep(self.settings.auth_failure_delay)
            else:
                log.warning("password hashing queue full", extra={"fields": {"peer": state.peer, "session": state.session_id}})
            return rules.refuse(454, "4.7.0", "Temporary authentication failure, try again later")
        if user is not None and creds.authzid and creds.authzid != creds.login and creds.authzid not in user.act_as:
            user = None
        if user is None:
            if self.counters is not None:
                if not reserved:
                    await self.counters.incr(login_key)
                await self.counters.incr(f"client.{key_part(state.peer)}")
            await asyncio.sleep(self.settings.auth_failure_delay)
            log.warning("authentication failed", extra={"fields": {"peer": state.peer, "session": state.session_id}})
            return rules.refuse(535, "5.7.8", "Authentication credentials invalid")
        if reserved:
            await self.counters.add(login_key, -1)  # a right password is no failure
        state.user = user
        log.info("authenticated", extra={"fields": {"peer": state.peer, "user": user.login, "session": state.session_id}})
        return policy_pb2.Verdict(
            accept=True, authenticated_user=user.login, reply=reply(235, "2.7.0", "Authentication successful")
        )
