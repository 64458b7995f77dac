"""SMTP-only app passwords: the records ``submitctl`` writes and policy reads, in the NATS KV
bucket ``SUBMITD_APPPASSWORDS`` (``jetstream.APPPASSWORDS_BUCKET``).

An app password is 160 bits from ``secrets`` (32 base32 letters, shown in groups of four),
shown once when it is made. It is stored as HMAC-SHA256, keyed with a random salt of its own,
over the login and the password. A slow hash (argon2id) is there to make guessing a password a
*person* chose expensive; a secret of 160 random bits cannot be guessed, nor found from its HMAC
(2^160 tries), so a fast keyed hash is a sound verifier here, and an AUTH with an app password
costs an HMAC per app password of that login, never an argon2 verification. The login is part
of what is hashed, so an entry copied under another login verifies nothing there.

Keys carry the login only hashed; the values carry it in the clear (the operator's listing):

- ``pw.<login hash>.<id>``: the app password (``AppPassword.to_json``). Written and purged by
  ``submitctl`` alone: policy's NATS user may not publish there (``natsauth``).
- ``used.<login hash>.<id>``: ``{"last_used": <unix seconds>}``, written by policy at most once a
  minute per app password.

Both sides read the bucket without a consumer: the keys from the stream's subject list and each
value by a direct get (``read_entries``); policy follows changes with a plain subscription to the
bucket's subjects. A consumer grant would let a NATS user aim a push consumer's deliveries at any
subject, the queue's included (checked against nats-server 2.15).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass

from nats.js.errors import KeyNotFoundError

ENTRY, USED = "pw", "used"
SECRET_BYTES = 20  # 160 bits: 32 base32 letters
_SHAPE = re.compile(r"[a-z2-7]{32}")
MAX_PER_LOGIN = 50  # an HMAC each, per AUTH with a password of that login that is not its main one


def login_key(login: str) -> str:
    return hashlib.sha256(login.encode("utf-8")).hexdigest()[:32]


def entry_key(login: str, ident: str) -> str:
    return f"{ENTRY}.{login_key(login)}.{ident}"


def used_key(login: str, ident: str) -> str:
    return f"{USED}.{login_key(login)}.{ident}"


def generate() -> str:
    """A new app password: 160 random bits as 8 groups of 4 lower-case base32 letters."""
    letters = base64.b32encode(secrets.token_bytes(SECRET_BYTES)).decode().lower()
    return "-".join(letters[i:i + 4] for i in range(0, len(letters), 4))


def normalize(password: str) -> str | None:
    """The 32 letters of an app password typed with or without its dashes or spaces, in either
    case; None for anything that cannot be one (a main password, most of the time)."""
    letters = re.sub(r"[\s-]", "", password).lower()
    return letters if _SHAPE.fullmatch(letters) else None


def verifier(login: str, letters: str, salt: bytes) -> bytes:
    return hmac.new(salt, login.encode("utf-8") + b"\0" + letters.encode("ascii"), hashlib.sha256).digest()


@dataclass(frozen=True)
class AppPassword:
    login: str
    ident: str
    name: str
    created: int  # unix seconds
    salt: bytes
    verifier: bytes

    @property
    def key(self) -> str:
        return entry_key(self.login, self.ident)

    def matches(self, login: str, letters: str) -> bool:
        """``letters``: ``normalize``'s answer for the password given."""
        return login == self.login and hmac.compare_digest(verifier(login, letters, self.salt), self.verifier)

    def to_json(self) -> bytes:
        return json.dumps({"login": self.login, "id": self.ident, "name": self.name, "created": self.created,
                           "salt": self.salt.hex(), "verifier": self.verifier.hex(), "scheme": "hmac-sha256"}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "AppPassword":
        d = json.loads(data)
        if d.get("scheme") != "hmac-sha256":
            raise ValueError(f"unknown app-password scheme {d.get('scheme')!r}")
        return cls(str(d["login"]), str(d["id"]), str(d["name"]), int(d["created"]),
                   bytes.fromhex(d["salt"]), bytes.fromhex(d["verifier"]))


def new(login: str, name: str, now: float) -> tuple[AppPassword, str]:
    """A new app password for ``login``: its record, and the password (to show once)."""
    password = generate()
    salt = secrets.token_bytes(16)
    record = AppPassword(login, secrets.token_hex(6), name, int(now), salt,
                         verifier(login, normalize(password) or "", salt))
    return record, password


def last_used_of(data: bytes) -> int:
    try:
        return int(json.loads(data)["last_used"])
    except (ValueError, KeyError, TypeError):
        return 0


def last_used_json(when: float) -> bytes:
    return json.dumps({"last_used": int(when)}).encode()


async def read_entries(js, kv, bucket: str, keys: str = ">", concurrency: int = 32) -> dict[str, tuple[bytes, int]]:
    """key -> (value, revision) of every live key of ``kv`` (the KV bucket ``bucket``) matching
    ``keys`` (a subject pattern below the bucket's prefix), read without a consumer: the subjects
    from the stream's info, then each value by a (direct) get. Revoked keys are left out."""
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"$KV.{bucket}.{keys}")
    subjects = list((info.state.subjects or {}).keys())
    prefix = f"$KV.{bucket}."
    found: dict[str, tuple[bytes, int]] = {}
    limit = asyncio.Semaphore(concurrency)

    async def read(subject: str) -> None:
        key = subject[len(prefix):]
        async with limit:
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:
                return
        if entry.value:
            found[key] = (entry.value, entry.revision or 0)

    await asyncio.gather(*(read(s) for s in subjects if s.startswith(prefix)))
    return found
