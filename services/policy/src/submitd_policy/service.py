"""The Policy gRPC service: one Session stream per SMTP connection."""

from __future__ import annotations

import ipaddress
import logging

import grpc

from submitd.v1 import policy_pb2, policy_pb2_grpc
from submitd_common.files import WatchedFile
from submitd_common.replies import reply

from . import rules
from .sasl import MECHANISMS, SaslMalformed
from .users import UserDB

log = logging.getLogger("submitd.policy")

ACCEPT = policy_pb2.Verdict(accept=True)


class PolicyService(policy_pb2_grpc.PolicyServicer):
    def __init__(self, users: WatchedFile[UserDB], trusted_networks: list[str], allow_auth_without_tls: bool) -> None:
        self.users = users
        self.trusted = [ipaddress.ip_network(n, strict=False) for n in trusted_networks]
        self.allow_auth_without_tls = allow_auth_without_tls

    async def Session(self, request_iterator, context: grpc.aio.ServicerContext):
        state = rules.SessionState()
        async for event in request_iterator:
            kind = event.WhichOneof("event")
            try:
                verdict = await self.decide(state, kind, getattr(event, kind))
            except Exception:
                log.exception("policy failure on %s", kind)
                verdict = policy_pb2.Verdict(accept=False, reply=reply(451, "4.3.0", "Temporary policy failure"))
            yield verdict

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
        if kind == "mail_from":
            verdict = rules.first_refusal(rules.MAIL_RULES, state, ev)
            if verdict is None:
                state.mail_from = ev.address
                state.recipients = 0
            return verdict or ACCEPT
        if kind == "rcpt_to":
            verdict = rules.first_refusal(rules.RCPT_RULES, state, ev)
            if verdict is None:
                state.recipients += 1
            return verdict or ACCEPT
        if kind == "data_start":
            return rules.first_refusal(rules.DATA_RULES, state, ev) or ACCEPT
        if kind == "reset":
            state.mail_from = None
            state.recipients = 0
            return ACCEPT
        return rules.refuse(502, "5.5.1", "Command not implemented")

    async def auth_start(self, state: rules.SessionState, ev: policy_pb2.AuthStart) -> policy_pb2.Verdict:
        if not state.tls and not self.allow_auth_without_tls:
            return rules.refuse(538, "5.7.11", "Encryption required for requested authentication mechanism")
        if state.user is not None:
            return rules.refuse(503, "5.5.1", "Already authenticated")
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
        user = await self.users.value.authenticate(creds.login, creds.password)
        if user is None or (creds.authzid and creds.authzid != creds.login):
            log.warning("authentication failed", extra={"fields": {"peer": state.peer, "session": state.session_id}})
            return rules.refuse(535, "5.7.8", "Authentication credentials invalid")
        state.user = user
        log.info("authenticated", extra={"fields": {"peer": state.peer, "user": user.login, "session": state.session_id}})
        return policy_pb2.Verdict(
            accept=True, authenticated_user=user.login, reply=reply(235, "2.7.0", "Authentication successful")
        )
