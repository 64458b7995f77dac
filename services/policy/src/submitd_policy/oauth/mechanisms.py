"""The SASL mechanisms that carry an OAuth 2.0 bearer token, as small state machines like those of
``submitd_policy.sasl``: OAUTHBEARER (RFC 7628) and XOAUTH2 (the form Gmail and Outlook clients
send). Each yields the token (``Step.token``), never a password.

A token that fails is answered as RFC 7628 §3.2.2 says: a ``334`` challenge holding a JSON error
(``failure``), to which the client sends a dummy response (``%x01``; XOAUTH2 clients send an
empty line), and only then ``535 5.7.8`` (``Step.failed``).
"""

from __future__ import annotations

import json
import re

from ..sasl import BearerToken, SaslMalformed, Step

KVSEP = "\x01"
HTTP_STATUS = {"invalid_token": "401", "insufficient_scope": "403", "invalid_request": "400"}
# RFC 6750 §2.1 b64token, after "Bearer" and at least one space (the scheme is case-insensitive).
BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*)\Z")
KEY = re.compile(r"[A-Za-z]+\Z")  # RFC 7628 §3.1 key
# RFC 7628 §3.1 value: VCHAR, SP, HTAB, CR, LF.
VALUE = re.compile(r"[\x21-\x7e \t\r\n]*\Z")


class _TokenMechanism:
    """The shared part: a first message that carries the token, or an error challenge and the
    client's dummy response after it."""

    def __init__(self) -> None:
        self.failing = False

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Step(challenge=b"")  # the client speaks first (RFC 7628 §3.2)
        return self.respond(initial)

    def respond(self, data: bytes) -> Step:
        if self.failing:  # whatever the client sent after the error challenge
            return Step(failed=True)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SaslMalformed("message is not UTF-8") from e
        return Step(token=self.parse(text))

    def parse(self, text: str) -> BearerToken:
        raise NotImplementedError

    def failure(self, status: str, scope: str, configuration: str) -> bytes:
        """The error challenge for a refused token; the mechanism then waits for the dummy response."""
        self.failing = True
        return self.error(status, scope, configuration)

    def error(self, status: str, scope: str, configuration: str) -> bytes:
        raise NotImplementedError


def _pairs(text: str) -> dict[str, str]:
    """``key=value`` pairs each ended by %x01, then a final %x01 (RFC 7628 §3.1 and XOAUTH2)."""
    if not text.endswith(KVSEP + KVSEP):
        raise SaslMalformed("message does not end with two %x01")
    pairs: dict[str, str] = {}
    for item in text[:-2].split(KVSEP):
        key, eq, value = item.partition("=")
        if not eq or not KEY.match(key) or not VALUE.match(value):
            raise SaslMalformed("malformed key/value pair")
        if key in pairs:
            raise SaslMalformed("repeated key")
        pairs[key] = value
    return pairs


def _bearer(pairs: dict[str, str]) -> str:
    match = BEARER.match(pairs.get("auth", ""))
    if match is None:
        raise SaslMalformed("no Bearer token in auth")
    return match.group(1)


def _saslname(value: str) -> str:
    """RFC 5801 saslname: ``=2C`` is a comma, ``=3D`` an equals sign, any other ``=`` is an error."""
    if re.search(r"=(?!2C|3D)", value) or "," in value:
        raise SaslMalformed("malformed authzid")
    return value.replace("=2C", ",").replace("=3D", "=")


class OAuthBearer(_TokenMechanism):
    """RFC 7628: ``n,a=authzid,`` %x01 ``auth=Bearer <token>`` %x01 [``host=..`` %x01 ``port=..`` %x01] %x01."""

    def parse(self, text: str) -> BearerToken:
        header, sep, rest = text.partition(KVSEP)
        if not sep:
            raise SaslMalformed("no GS2 header")
        flag, comma, after = header.partition(",")
        authzid_field, comma2, tail = after.partition(",")
        if not comma or not comma2 or tail:
            raise SaslMalformed("malformed GS2 header")
        if flag not in ("n", "y"):  # "p=": channel binding, which OAUTHBEARER over SMTP does not use
            raise SaslMalformed("channel binding is not supported")
        authzid = ""
        if authzid_field:
            if not authzid_field.startswith("a="):
                raise SaslMalformed("malformed GS2 header")
            authzid = _saslname(authzid_field[2:])
        return BearerToken(authzid, _bearer(_pairs(rest)))

    def error(self, status: str, scope: str, configuration: str) -> bytes:
        body = {"status": status}
        if scope:
            body["scope"] = scope
        if configuration:
            body["openid-configuration"] = configuration
        return json.dumps(body, separators=(",", ":")).encode()


class XOAuth2(_TokenMechanism):
    """``user=<login>`` %x01 ``auth=Bearer <token>`` %x01 %x01."""

    def parse(self, text: str) -> BearerToken:
        pairs = _pairs(text)
        user = pairs.get("user", "")
        if not user:
            raise SaslMalformed("no user")
        return BearerToken(user, _bearer(pairs))

    def error(self, status: str, scope: str, configuration: str) -> bytes:
        # Google's form: the HTTP status (RFC 6750 §3.1) and the scheme, with the scope a token needs.
        body = {"status": HTTP_STATUS.get(status, "400"), "schemes": "Bearer"}
        if scope:
            body["scope"] = scope
        return json.dumps(body, separators=(",", ":")).encode()


MECHANISMS = {"OAUTHBEARER": OAuthBearer, "XOAUTH2": XOAuth2}
