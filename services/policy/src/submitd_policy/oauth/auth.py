"""AUTH with a bearer token: the token checked (``tokens``), its login's rights from the directories,
the authorization identity, and the reply.

- The rights are the login's in the directory chain (the users file, LDAP, SQL: an OAuth login may
  live in any of them). A login no directory knows is refused, or with ``oauth_unknown_users:
  token`` is an account that may send as the login alone (when it is an address).
- The authzid (OAUTHBEARER ``a=``, XOAUTH2 ``user=``) must be the token's login, or one the
  login may act as (``act_as``).
- A refusal is the RFC 7628 §3.2.2 exchange: a 334 with the JSON error (``auth_failure_delay``
  after the token arrived, as for a wrong password), the client's dummy response, then 535 5.7.8.
  It counts against the client's lockout (there is no password to guess per login).
- The provider or a directory down or slow: 454 4.7.0 at once, never 535.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from submitd.v1 import policy_pb2
from submitd_common.replies import reply
from submitd_common.users import User

from ..directories import DirectoryUnavailable
from ..rules import refuse
from .provider import ProviderUnavailable, TokenRefused
from .tokens import TokenValidator

log = logging.getLogger("submitd.policy")
TEMPORARY = (454, "4.7.0", "Temporary authentication failure, try again later")


class TokenAuth:
    def __init__(self, settings, validator: TokenValidator, lookup: Callable[[str], Awaitable],
                 lockouts, delay: Callable[[float], Awaitable[None]]) -> None:
        """``lookup(login)``: the directory chain's account for a login, or None."""
        self.settings = settings
        self.validator = validator
        self.lookup = lookup
        self.lockouts = lockouts
        self.delay = delay
        self.configuration = f"{settings.oauth_issuer.rstrip('/')}/.well-known/openid-configuration"

    async def check(self, state, mechanism, bearer) -> policy_pb2.Verdict:
        started = asyncio.get_running_loop().time()
        fields = {"peer": state.peer, "session": state.session_id, "mechanism": type(mechanism).__name__.upper()}
        try:
            identity = await self.validator.validate(bearer.token)
            user, in_directory = await self.user(identity.login)
        except (ProviderUnavailable, DirectoryUnavailable) as e:
            log.warning("token not checked", extra={"fields": {**fields, "error": str(e)}})
            return refuse(*TEMPORARY)
        except TokenRefused as e:
            return await self._refuse(state, mechanism, started, e.status, {**fields, "reason": str(e)})
        fields["login"] = identity.login
        if user is None:
            return await self._refuse(state, mechanism, started, "invalid_token", {**fields, "reason": "no such account"})
        if user.suspended:
            return await self._refuse(state, mechanism, started, "invalid_token", {**fields, "reason": "suspended"})
        if bearer.authzid and not same_login(bearer.authzid, identity.login) and bearer.authzid not in user.act_as:
            return await self._refuse(state, mechanism, started, "invalid_token",
                                      {**fields, "reason": "authzid is not the token's login"})
        state.user, state.user_in_directory = user, in_directory
        log.info("authenticated", extra={"fields": {"peer": state.peer, "user": user.login, "session": state.session_id,
                                                    "mechanism": fields["mechanism"]}})
        return policy_pb2.Verdict(accept=True, authenticated_user=user.login,
                                  reply=reply(235, "2.7.0", "Authentication successful"))

    async def user(self, login: str) -> tuple[User | None, bool]:
        """The login's rights, and whether a directory holds them."""
        account = await self.lookup(login)
        if account is not None:
            return account.user, True
        if self.settings.oauth_unknown_users == "token":
            return User(login=login, password_hash=""), False  # may send as its login when that is an address
        return None, False

    async def _refuse(self, state, mechanism, started: float, status: str, fields: dict) -> policy_pb2.Verdict:
        await self.lockouts.token_failed(state.peer)
        await self.delay(started)
        log.warning("token refused", extra={"fields": fields})
        state.sasl = mechanism  # waits for the client's dummy response, then 535
        challenge = mechanism.failure(status, self.settings.oauth_required_scope, self.configuration)
        return policy_pb2.Verdict(accept=False, has_challenge=True, challenge=challenge)


def same_login(authzid: str, login: str) -> bool:
    """The same login, addresses compared without case (as the users file's local parts are by default)."""
    return authzid == login or ("@" in login and authzid.lower() == login.lower())
