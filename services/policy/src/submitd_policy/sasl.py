"""SASL mechanisms as small state machines: feed client data, get a challenge or a result."""

from __future__ import annotations

from dataclasses import dataclass, field


class SaslMalformed(ValueError):
    """The client's message does not follow the mechanism (501 5.5.2)."""


@dataclass
class Credentials:
    authzid: str
    login: str
    password: str


@dataclass
class BearerToken:
    """An OAuth 2.0 bearer token (OAUTHBEARER, XOAUTH2) and the authorization identity asked for
    with it ("" when none). Never logged: it is a password that anyone holding it may use."""

    authzid: str
    token: str = field(repr=False)


@dataclass
class Step:
    challenge: bytes | None = None
    credentials: Credentials | None = None
    token: BearerToken | None = None
    failed: bool = False  # the exchange ends here in 535 (after a token's error challenge)


class Plain:
    """RFC 4616: [authzid] NUL authcid NUL passwd."""

    name = "PLAIN"

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Step(challenge=b"")
        return self.respond(initial)

    def respond(self, data: bytes) -> Step:
        parts = data.split(b"\x00")
        if len(parts) != 3 or not parts[1]:
            raise SaslMalformed("malformed PLAIN message")
        try:
            authzid, login, password = (p.decode("utf-8") for p in parts)
        except UnicodeDecodeError as e:
            raise SaslMalformed("PLAIN message is not UTF-8") from e
        return Step(credentials=Credentials(authzid, login, password))


class Login:
    """The LOGIN mechanism: user name, then password, each on request."""

    name = "LOGIN"

    def __init__(self) -> None:
        self.login: str | None = None

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Step(challenge=b"Username:")
        return self.respond(initial)

    def respond(self, data: bytes) -> Step:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SaslMalformed("LOGIN data is not UTF-8") from e
        if self.login is None:
            if not text:
                raise SaslMalformed("empty user name")
            self.login = text
            return Step(challenge=b"Password:")
        return Step(credentials=Credentials("", self.login, text))


MECHANISMS = {"PLAIN": Plain, "LOGIN": Login}
