"""SMTP AUTH (RFC 4954) for one session: mechanism choice, the SASL exchange, the credentials
check (``credentials.py``) and the lockouts (``lockouts.py``).

Every failure is answered ``auth_failure_delay`` after the credentials arrived, however long its
check took (a check that takes longer: the next multiple of it). A wrong password for an
argon2id user, for a user on a legacy bcrypt or SHA512-CRYPT hash, an unknown login (its dummy
hash) and a login refused by the lockouts without any hash all answer at the same moment, so
the reply time tells an attacker neither which logins exist nor how they are hashed. The delay
must exceed the slowest hash in the users file to hide it (argon2id at its defaults: ~0.25 s of
CPU; bcrypt at cost 12: about as much)."""

from __future__ import annotations

import asyncio
import logging
import math

from submitd.v1 import policy_pb2
from submitd_common.replies import reply

from .credentials import Authenticator, HashingBusy, Locked
from .directories import DirectoryUnavailable
from .lockouts import CLIENT, Lockouts
from .oauth import MECHANISMS as TOKEN_MECHANISMS, token_mechanisms
from .rules import SessionState, refuse
from .sasl import MECHANISMS, SaslMalformed
from .settings import Settings

log = logging.getLogger("submitd.policy")

TEMPORARY = (454, "4.7.0", "Temporary authentication failure, try again later")
FACTORIES = MECHANISMS | TOKEN_MECHANISMS
TOO_MANY_FAILURES = (421, "4.7.0", "Too many authentication failures, try again later")


def mechanisms(settings: Settings) -> list[str]:
    """The SASL mechanisms AUTH accepts, in the order EHLO lists them: the frontend advertises
    exactly these (``Capabilities``), and ``start`` refuses any other."""
    available = {*MECHANISMS, *token_mechanisms(settings)}
    return [m for m in (m.upper() for m in settings.auth_mechanisms) if m in available]


class Auth:
    def __init__(self, settings: Settings, authenticator: Authenticator, lockouts: Lockouts, tokens=None) -> None:
        self.settings = settings
        self.authenticator = authenticator
        self.lockouts = lockouts
        self.tokens = tokens  # oauth.auth.TokenAuth when oauth_mode is set
        self.mechanisms = mechanisms(settings)

    async def start(self, state: SessionState, ev: policy_pb2.AuthStart) -> policy_pb2.Verdict:
        if not state.tls and not self.settings.allow_auth_without_tls:
            return refuse(538, "5.7.11", "Encryption required for requested authentication mechanism")
        if state.user is not None:
            return refuse(503, "5.5.1", "Already authenticated")
        started = asyncio.get_running_loop().time()
        if await self.lockouts.client_locked(state.peer):
            await self._delay(started)
            return refuse(*TOO_MANY_FAILURES, disconnect=True)
        name = ev.mechanism.upper()
        factory = FACTORIES.get(name) if name in self.mechanisms else None
        if factory is None:
            return refuse(504, "5.5.4", "Unrecognized authentication type")
        state.sasl = factory()
        return await self._sasl(state, lambda m: m.start(ev.initial_response if ev.has_initial_response else None))

    async def step(self, state: SessionState, ev: policy_pb2.AuthResponse) -> policy_pb2.Verdict:
        if state.sasl is None:
            return refuse(503, "5.5.1", "No authentication in progress")
        if ev.cancelled:
            state.sasl = None
            return refuse(501, "5.0.0", "Authentication cancelled")
        return await self._sasl(state, lambda m: m.respond(ev.data))

    async def _sasl(self, state: SessionState, advance) -> policy_pb2.Verdict:
        try:
            step = advance(state.sasl)
        except SaslMalformed as e:
            state.sasl = None
            return refuse(501, "5.5.2", f"Cannot decode response: {e}")
        if step.challenge is not None:
            return policy_pb2.Verdict(accept=False, has_challenge=True, challenge=step.challenge)
        mechanism, state.sasl = state.sasl, None
        if step.failed:  # the client's answer to a refused token's error challenge (RFC 7628 §3.2.2)
            return refuse(535, "5.7.8", "Authentication credentials invalid")
        if step.token is not None:
            return await self.tokens.check(state, mechanism, step.token)
        return await self._check(state, step.credentials)

    async def _check(self, state: SessionState, creds) -> policy_pb2.Verdict:
        attempt = self.lockouts.attempt(creds.login, state.peer)
        try:
            return await self._checked(state, creds, attempt, asyncio.get_running_loop().time())
        finally:
            attempt.close()

    async def _checked(self, state: SessionState, creds, attempt, started: float) -> policy_pb2.Verdict:
        if await attempt.locked():
            await self._delay(started)
            return refuse(*TEMPORARY)
        try:
            user = await self.authenticator.authenticate(creds.login, creds.password, admit=attempt.admit)
        except HashingBusy:
            await attempt.unchecked()
            log.warning("password hashing queue full", extra={"fields": {"peer": state.peer, "session": state.session_id}})
            return refuse(*TEMPORARY)
        except DirectoryUnavailable as e:
            # Never 535: a user is not told their password is wrong because a directory is down.
            await attempt.unchecked()
            await self._delay(started)
            log.warning("directory unavailable", extra={"fields": {"peer": state.peer, "session": state.session_id, "error": str(e)}})
            return refuse(*TEMPORARY)
        except Locked:
            await attempt.unchecked()
            await self._delay(started)
            if attempt.refused_by == CLIENT:
                return refuse(*TOO_MANY_FAILURES, disconnect=True)
            return refuse(*TEMPORARY)
        if user is not None and creds.authzid and creds.authzid != creds.login and creds.authzid not in user.act_as:
            user = None
        if user is None:
            await attempt.failed()
            await self._delay(started)
            log.warning("authentication failed", extra={"fields": {"peer": state.peer, "session": state.session_id}})
            return refuse(535, "5.7.8", "Authentication credentials invalid")
        await attempt.succeeded()
        state.user = user
        log.info("authenticated", extra={"fields": {"peer": state.peer, "user": user.login, "session": state.session_id}})
        return policy_pb2.Verdict(
            accept=True, authenticated_user=user.login, reply=reply(235, "2.7.0", "Authentication successful")
        )

    async def _delay(self, started: float) -> None:
        """Until ``auth_failure_delay`` after ``started`` (or the first multiple of it not past)."""
        delay = self.settings.auth_failure_delay
        if delay <= 0:
            return
        loop = asyncio.get_running_loop()
        periods = max(1, math.ceil((loop.time() - started) / delay))
        await asyncio.sleep(max(0.0, started + periods * delay - loop.time()))
