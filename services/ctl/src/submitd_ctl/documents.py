"""What submitctl changes, as data: the users file and the DKIM keys, before and after.

Nothing here reads a file, a Secret or the network. A Secret (or the local directory) is a set
of files, ``Files``: name -> bytes. Each change takes the files as they are and returns the files
as they should be, checked the way the services will read them (a change that would break the
users file or the keys file is refused here, never written)."""

from __future__ import annotations

import copy
import posixpath
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from submitd_common.users import UserDB, normalize
from submitd_rewriter import dkim

Files = dict[str, bytes]
USERS = "users.yaml"
KEYS = "keys.yaml"
_SELECTOR = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")
_DOMAIN = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9-]{1,63}\.)+[A-Za-z0-9-]{2,63}$")


class ChangeError(ValueError):
    """The change cannot be made (unknown user, a selector still needed, ...): exit code 1."""


# -- users ------------------------------------------------------------------------------------


def users_document(files: Files) -> dict:
    text = files.get(USERS, b"")
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ChangeError(f"{USERS}: expected a mapping at the top level")
    data.setdefault("users", {})
    if data["users"] is None:
        data["users"] = {}
    return data


def with_users(files: Files, doc: dict) -> Files:
    """``files`` with the users file replaced by ``doc``, once the policy's own reader accepts it."""
    UserDB.from_mapping(doc)  # raises ValueError as the policy would: never write what it refuses
    out = dict(files)
    out[USERS] = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).encode()
    return out


def _entry(doc: dict, login: str) -> dict:
    entry = doc["users"].get(login)
    if not isinstance(entry, dict):
        raise ChangeError(f"no user {login!r}")
    return entry


def require_user(files: Files, login: str, exists: bool = True) -> None:
    """Refuse early (before a password is asked for) when ``login`` is (not) there."""
    there = isinstance(users_document(files)["users"].get(login), dict)
    if exists and not there:
        raise ChangeError(f"no user {login!r}")
    if not exists and there:
        raise ChangeError(f"user {login!r} exists (to change the password: user passwd)")


def add_user(files: Files, login: str, password_hash: str, send_as: list[str] | None = None,
             messages_per_hour: int | None = None) -> Files:
    require_user(files, login, exists=False)
    doc = copy.deepcopy(users_document(files))
    if "@" in login and not _DOMAIN.match(login.rpartition("@")[2]):
        raise ChangeError(f"{login!r}: the domain must be fully qualified")
    entry: dict = {"password": password_hash}
    if send_as:
        entry["send_as"] = [normalize(a) for a in send_as]
    if messages_per_hour:
        entry["limits"] = {"messages_per_hour": messages_per_hour}
    doc["users"][login] = entry
    return with_users(files, doc)


def set_password(files: Files, login: str, password_hash: str) -> Files:
    doc = copy.deepcopy(users_document(files))
    _entry(doc, login)["password"] = password_hash
    return with_users(files, doc)


def set_suspended(files: Files, login: str, suspended: bool) -> Files:
    doc = copy.deepcopy(users_document(files))
    entry = _entry(doc, login)
    if suspended:
        entry["suspended"] = True
    else:
        entry.pop("suspended", None)
    return with_users(files, doc)


def remove_user(files: Files, login: str) -> Files:
    """The user and their places in shared addresses (an alias nobody may use any more goes)."""
    doc = copy.deepcopy(users_document(files))
    _entry(doc, login)
    del doc["users"][login]
    aliases = doc.get("aliases") or {}
    for address in list(aliases):
        aliases[address] = [u for u in aliases[address] or [] if u != login]
        if not aliases[address]:
            del aliases[address]
    return with_users(files, doc)


def user_rows(files: Files) -> list[dict]:
    """One row per user, without the password hash."""
    doc = users_document(files)
    rows = []
    for login, entry in sorted(doc["users"].items()):
        entry = entry or {}
        rows.append({
            "login": login,
            "send_as": list(entry.get("send_as") or []),
            "suspended": bool(entry.get("suspended", False)),
            "scheme": str(entry.get("password", "")).split("$")[1] if "$" in str(entry.get("password", "")) else "",
            "limits": dict(entry.get("limits") or {}),
        })
    return rows


# -- DKIM -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyEntry:
    domain: str
    selector: str
    key_file: str
    algorithm: str
    created: datetime | None


def keys_document(files: Files) -> dict:
    data = yaml.safe_load(files.get(KEYS, b"")) or {}
    if not isinstance(data, dict):
        raise ChangeError(f"{KEYS}: expected a mapping at the top level")
    data["keys"] = list(data.get("keys") or [])
    return data


def _created(entry: dict) -> datetime | None:
    value = entry.get("created")
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, str):
        return datetime.fromisoformat(value)
    return None


def key_file_name(key_file: str) -> str:
    """The key's name among the files: keys.yaml may name it by a path (a Secret mounted at
    /etc/submitd/dkim/, or the make run directory); the file is beside keys.yaml."""
    return posixpath.basename(key_file)


def key_pem(files: Files, entry: dict) -> bytes:
    name = key_file_name(str(entry["key_file"]))
    if name not in files:
        raise ChangeError(f"{KEYS} names {name}, which is not beside it")
    return files[name]


def key_entries(files: Files) -> list[KeyEntry]:
    """The keys, each with its algorithm read from its PEM."""
    out = []
    for entry in keys_document(files)["keys"]:
        key = serialization.load_pem_private_key(key_pem(files, entry), password=None)
        algorithm = "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "rsa"
        out.append(KeyEntry(str(entry["domain"]).lower(), str(entry["selector"]), str(entry["key_file"]),
                            algorithm, _created(entry)))
    return out


def new_selector(files: Files, domain: str, algorithm: str, now: datetime) -> str:
    taken = {str(e["selector"]) for e in keys_document(files)["keys"] if str(e["domain"]).lower() == domain}
    base = f"s{now:%Y%m}{'e' if algorithm == 'ed25519' else 'r'}"
    selector, n = base, 1
    while selector in taken:
        n += 1
        selector = f"{base}{n}"
    return selector


@dataclass(frozen=True)
class Rotation:
    files: Files
    selector: str
    record: str  # the DNS TXT record to publish


def rotate(files: Files, domain: str, algorithm: str, now: datetime, selector: str | None = None,
           key=None) -> Rotation:
    """A new key for ``domain`` beside the ones it has: every key of a domain signs, so mail keeps
    a verifying signature while the new record reaches DNS. The PEM goes into the same files,
    named relative to the keys file."""
    domain = domain.lower().rstrip(".")
    if not _DOMAIN.match(domain):
        raise ChangeError(f"{domain!r} is not a fully qualified domain")
    if algorithm not in ("rsa", "ed25519"):
        raise ChangeError("the algorithm is rsa or ed25519")
    selector = selector or new_selector(files, domain, algorithm, now)
    if not _SELECTOR.match(selector):
        raise ChangeError(f"{selector!r} is not a valid selector (letters, digits, '-')")
    doc = copy.deepcopy(keys_document(files))
    if any(str(e["domain"]).lower() == domain and str(e["selector"]) == selector for e in doc["keys"]):
        raise ChangeError(f"{domain} already has a selector {selector!r}")
    key = key or dkim.generate_key(algorithm)
    name = f"{domain}.{selector}.pem"
    doc["keys"].append({"domain": domain, "selector": selector, "key_file": name,
                        "created": now.astimezone(timezone.utc).isoformat(timespec="seconds")})
    out = dict(files)
    out[name] = dkim.private_pem(key)
    out[KEYS] = yaml.safe_dump(doc, sort_keys=False).encode()
    return Rotation(out, selector, dkim.txt_record(key, domain, selector))


def retire(files: Files, domain: str, selector: str, now: datetime, grace: timedelta) -> Files:
    """Remove a selector once a newer key of its domain has signed for ``grace`` (so that
    receivers have seen the new record working before the old one stops signing). The last key
    of a domain is never removed this way."""
    domain = domain.lower().rstrip(".")
    doc = copy.deepcopy(keys_document(files))
    mine = [e for e in doc["keys"] if str(e["domain"]).lower() == domain]
    old = [e for e in mine if str(e["selector"]) == selector]
    if not old:
        raise ChangeError(f"{domain} has no selector {selector!r}")
    others = [e for e in mine if str(e["selector"]) != selector]
    if not others:
        raise ChangeError(f"{selector!r} is the last key of {domain}: rotate first")
    ready = [e for e in others if (_created(e) or now) <= now - grace]
    if not ready:
        newest = min((_created(e) or now) for e in others)
        wait = newest + grace - now
        raise ChangeError(
            f"the newer key of {domain} has signed for less than {grace} ({wait} to go); "
            "retire it after that, or give a shorter --grace"
        )
    doc["keys"] = [e for e in doc["keys"] if e not in old]
    out = dict(files)
    still_named = {key_file_name(str(e["key_file"])) for e in doc["keys"]}
    for entry in old:
        name = key_file_name(str(entry["key_file"]))
        if name not in still_named:
            out.pop(name, None)
    out[KEYS] = yaml.safe_dump(doc, sort_keys=False).encode()
    return out


def parse_txt(text: str) -> dict[str, str]:
    """A DKIM key record's tags (``v=DKIM1; k=ed25519; p=...``)."""
    tags = {}
    for part in text.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            tags[name.strip()] = re.sub(r"\s+", "", value)
    return tags


def record_matches(key_pem: bytes, published: str) -> bool:
    """Whether the published TXT text is the public half of ``key_pem``."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    want = parse_txt(dkim.txt_value(key).decode())
    got = parse_txt(published)
    return got.get("p") == want.get("p") and got.get("k", "rsa") == want.get("k")
