"""MTA-STS (RFC 8461) for direct MX delivery: the ``_mta-sts`` TXT record, the policy it announces
and the cache every relay replica shares (a NATS KV bucket), so a domain's policy is fetched once
per change, not once per replica or message.

    policies = StsPolicies(settings, await open_bucket(js), resolver)
    policy, failure = await policies.policy("example.net")   # failure: an RFC 8460 result type

The parsers are pure; ``StsPolicies`` does the lookups (§5), ``stsfetch`` the HTTPS (§3.3).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver
from nats.js.errors import KeyNotFoundError
from pydantic import BaseModel, Field

from submitd_common import jetstream

from . import results
from .stsfetch import FetchFailed, PolicyFetcher

log = logging.getLogger(__name__)

MAX_AGE_LIMIT = 31557600  # §3.2: a year
REFRESH_AFTER = 86400.0  # §3.3: refresh a cached policy proactively, about once a day
RETRY_FAILED_AFTER = 300.0  # §3.3: at most one attempt per five minutes per failing id
KV_RECHECK_AFTER = 300.0  # how long "the KV holds no policy for this domain" is believed
MEMORY_DOMAINS = 10_000
MODES = ("enforce", "testing", "none")


class MtaStsSettings(BaseModel):
    """The relay's MTA-STS settings (SUBMITD_RELAY_ prefix in the relay's Settings)."""

    mta_sts: bool = Field(
        True, description="Honour the MTA-STS policies (RFC 8461) of recipient domains on direct MX delivery")
    mta_sts_ca_file: str | None = Field(
        None, description="CA bundle for MTA-STS policy hosts' certificates (default: the system trust store)")
    mta_sts_port: int = Field(443, description="HTTPS port of MTA-STS policy hosts (443; tests change it)")
    mta_sts_timeout: float = Field(10.0, description="Seconds for one MTA-STS policy fetch, lookup included")


class StsPolicyInvalid(ValueError):
    pass


@dataclass(frozen=True)
class StsPolicy:
    domain: str
    id: str  # the TXT record's id it was fetched under
    mode: str  # "enforce", "testing" or "none"
    mx: tuple[str, ...]  # patterns, lower case: "mx.example.net" or "*.example.net"
    max_age: int  # seconds, at most MAX_AGE_LIMIT
    fetched_at: float = 0.0  # epoch seconds
    text: str = ""  # the policy as served

    @property
    def expires_at(self) -> float:
        return self.fetched_at + self.max_age

    def expired(self, now: float) -> bool:
        return now >= self.expires_at

    def lines(self) -> tuple[str, ...]:
        """The policy's lines without their terminators: TLS-RPT's "policy-string" (RFC 8460 §4.4)."""
        return _lines(self.text)  # (every message's TLS result quotes them: split once per text)

    def matches(self, mx_host: str) -> bool:
        """Whether an MX host is one the policy names (§4.1): exactly, or by a ``*.`` pattern
        standing for exactly one leftmost label; case-insensitive, a trailing dot ignored."""
        host = mx_host.rstrip(".").lower()
        first, _, rest = host.partition(".")
        return any(host == p or (p.startswith("*.") and first and rest == p[2:]) for p in self.mx)

    def to_json(self) -> bytes:
        return json.dumps({"domain": self.domain, "id": self.id, "fetched_at": self.fetched_at,
                           "text": self.text}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "StsPolicy":
        """A policy another replica stored: its text is parsed again, not trusted as fields."""
        raw = json.loads(data)
        return parse_policy(raw["text"], domain=raw["domain"], id=raw["id"], fetched_at=float(raw["fetched_at"]))


# §3.2's ABNF. Field names are case-sensitive (%s"..."); values are WSP-trimmed.
_FIELD = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,31}):[ \t]*(.*?)[ \t]*")
_VALUE = re.compile(r"[^\x00-\x20\x7f](?:[^\x00-\x1f\x7f]*[^\x00-\x20\x7f])?")  # sts-policy-ext-value
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"  # RFC 5321 sub-domain
_MX = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*")
_MAX_AGE = re.compile(r"[0-9]{1,10}")


def parse_policy(text: str, *, domain: str = "", id: str = "", fetched_at: float = 0.0) -> StsPolicy:
    """A policy file by RFC 8461 §3.2 (LF or CRLF lines; unknown fields ignored; of a repeated
    field other than mx, the first counts); StsPolicyInvalid when it is not one."""
    lines = text.split("\n")
    if len(lines) > 1 and lines[-1] == "":
        lines.pop()  # the last line's terminator is optional
    fields: dict[str, str] = {}
    mx: list[str] = []
    for n, line in enumerate(lines):
        if n < len(lines) - 1 or text.endswith("\n"):
            line = line.removesuffix("\r")
        m = _FIELD.fullmatch(line)
        if not m or not _VALUE.fullmatch(m.group(2)):
            raise StsPolicyInvalid(f"line {n + 1} is not a field: {line[:80]!r}")
        name, value = m.groups()
        if name == "mx":
            if not _MX.fullmatch(value):
                raise StsPolicyInvalid(f"mx {value[:80]!r} is not a host name or *. pattern")
            mx.append(value.lower())
        else:
            fields.setdefault(name, value)
    for name in ("version", "mode", "max_age"):
        if name not in fields:
            raise StsPolicyInvalid(f"no {name}")
    if fields["version"] != "STSv1":
        raise StsPolicyInvalid(f"version {fields['version']!r} is not STSv1")
    mode = fields["mode"]
    if mode not in MODES:
        raise StsPolicyInvalid(f"mode {mode!r} is not enforce, testing or none")
    if not _MAX_AGE.fullmatch(fields["max_age"]):
        raise StsPolicyInvalid(f"max_age {fields['max_age']!r} is not 1 to 10 digits")
    if not mx and mode != "none":
        raise StsPolicyInvalid(f"mode {mode} without mx")
    # Longer than the RFC's maximum is still a policy: it is kept for the maximum.
    max_age = min(int(fields["max_age"]), MAX_AGE_LIMIT)
    return StsPolicy(domain, id, mode, tuple(mx), max_age, fetched_at, text)


# §3.1: sts-text-record (with erratum 6285's reading of which records "begin with v=STSv1;").
_TXT = re.compile(r"v=STSv1((?:[ \t]*;[ \t]*[A-Za-z0-9][A-Za-z0-9_.-]{0,31}=[\x21-\x3a\x3c\x3e-\x7e]+)+)[ \t]*;?[ \t]*")
_ID = re.compile(r"[A-Za-z0-9]{1,32}")


@functools.lru_cache(maxsize=1024)
def _lines(text: str) -> tuple[str, ...]:
    lines = re.split(r"\r?\n", text)
    return tuple(lines[:-1] if lines and lines[-1] == "" else lines)


def parse_txt(records: Iterable[str | bytes]) -> str | None:
    """The policy id the ``_mta-sts`` TXT records announce (each record its strings joined), or
    None: no STSv1 record, several, or an invalid one all mean "no policy announced" (§3.1)."""
    return _parse_txt(tuple(records))


@functools.lru_cache(maxsize=4096)  # every message to a domain reads its kept TXT answer again
def _parse_txt(records: tuple[str | bytes, ...]) -> str | None:
    texts = [r.decode("latin-1") if isinstance(r, bytes) else r for r in records]
    announcing = [t for t in texts if re.match(r"v=STSv1[ \t]*;", t)]
    if len(announcing) != 1:
        return None
    m = _TXT.fullmatch(announcing[0])
    if not m:
        return None
    for field in m.group(1).split(";")[1:]:
        name, _, value = field.strip(" \t").partition("=")
        if name == "id":  # the first one counts
            return value if _ID.fullmatch(value) else None
    return None


_DOMAIN = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)+")


@functools.lru_cache(maxsize=4096)  # asked for every message; a pure function of the name
def policy_domain(domain: str) -> str | None:
    """The domain in A-labels and lower case (also its KV key), or None for a name that cannot
    have a policy host."""
    try:
        name = dns.name.from_text(domain.rstrip(".")).to_text(omit_final_dot=True).lower()
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return None
    return name if _DOMAIN.fullmatch(name) else None


async def open_bucket(js, spec: jetstream.KvSpec):
    """The shared policy cache, as provisioning made it (``spec``: streams.sts_policies)."""
    return await jetstream.open_kv(js, spec)


def _reachable_rule(settings) -> Callable[[str], bool]:
    internal = [ipaddress.ip_network(n, strict=False) for n in getattr(settings, "mx_internal_networks", [])]

    def reachable(address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return ip.is_global or any(ip in net for net in internal)

    return reachable


@dataclass
class _Known:
    policy: StsPolicy | None = None
    kv_checked_at: float = float("-inf")  # when the KV last had nothing newer
    failed_id: str = ""  # the TXT id whose fetch failed, and until when not to retry it
    retry_at: float = 0.0
    failure: str | None = None


class StsPolicies:
    """The policy to apply per domain (§5): the TXT id is looked up every time; a policy is
    fetched only when that id differs from the cached one's, the cached one expired or is a day
    old; a cached unexpired policy keeps applying while fetches fail or the TXT is gone (§5.1)."""

    def __init__(self, settings, kv, resolver: dns.asyncresolver.Resolver, *,
                 reachable: Callable[[str], bool] | None = None, clock: Callable[[], float] = time.time) -> None:
        self.enabled = getattr(settings, "mta_sts", True)
        self.kv = kv
        self.resolver = resolver
        self.clock = clock
        self.fetcher = PolicyFetcher(
            resolver, reachable or _reachable_rule(settings), port=settings.mta_sts_port,
            ca_file=settings.mta_sts_ca_file, timeout=settings.mta_sts_timeout)
        self._known: OrderedDict[str, _Known] = OrderedDict()
        self._inflight: dict[str, asyncio.Task] = {}

    async def policy(self, domain: str) -> tuple[StsPolicy | None, str | None]:
        """The policy to apply to mail for ``domain`` (None: deliver as without MTA-STS) and, when
        a fetch failed, its RFC 8460 result type (also when a cached policy still applies)."""
        name = policy_domain(domain) if self.enabled else None
        if name is None:
            return None, None
        known = self._settled_answer(name)
        if known is not None:
            return known
        task = self._inflight.get(name)
        if task is None:  # one lookup per domain at a time; the others wait for its answer
            task = self._inflight[name] = asyncio.ensure_future(self._policy(name))
            task.add_done_callback(lambda t: self._settled(name, t))
        return await asyncio.shield(task)

    def _settled_answer(self, domain: str) -> tuple[StsPolicy | None, None] | None:
        """The answer without a task or a lookup, when the TXT record's answer is still in the
        resolver's keeping and says what the last lookup said (the steady state: every message
        to a domain asks this); None: ask properly."""
        peek = getattr(self.resolver, "peek", None)
        known = self._known.get(domain)
        if peek is None or known is None:
            return None
        kept = peek(f"_mta-sts.{domain}", "TXT")
        now = self.clock()
        if kept is None or (known.policy is not None and known.policy.expired(now)):
            return None
        if isinstance(kept, (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer)):
            if known.policy is None and now - known.kv_checked_at >= KV_RECHECK_AFTER:
                return None
            return known.policy, None
        if isinstance(kept, Exception) or not self._current(
                known.policy, parse_txt(b"".join(rr.strings) for rr in kept), now):
            return None
        return known.policy, None

    def _settled(self, name: str, task: asyncio.Task) -> None:
        if self._inflight.get(name) is task:
            del self._inflight[name]
        if not task.cancelled():
            task.exception()  # seen, even if every caller was cancelled

    async def close(self) -> None:
        await self.fetcher.close()

    async def _policy(self, domain: str) -> tuple[StsPolicy | None, str | None]:
        known = self._entry(domain)
        txt_id = await self._txt_id(domain)
        now = self.clock()
        if known.policy and known.policy.expired(now):
            known.policy = None  # §5.1: never used past its max_age
        if txt_id is None:  # no policy announced (or DNS failed): the cached one keeps applying
            if known.policy is None and now - known.kv_checked_at >= KV_RECHECK_AFTER:
                await self._from_kv(domain, known, now)
            return known.policy, None
        if self._current(known.policy, txt_id, now):
            return known.policy, None
        if known.failed_id == txt_id and now < known.retry_at:
            return known.policy, known.failure
        await self._from_kv(domain, known, now)  # another replica may have fetched it already
        if self._current(known.policy, txt_id, now):
            return known.policy, None
        try:
            text = await self.fetcher.fetch(domain)
            fetched = parse_policy(text, domain=domain, id=txt_id, fetched_at=self.clock())
        except FetchFailed as e:
            return self._failed(domain, known, txt_id, now, e.result_type, e.detail)
        except StsPolicyInvalid as e:
            return self._failed(domain, known, txt_id, now, results.STS_POLICY_INVALID, str(e))
        known.policy, known.failed_id, known.failure = fetched, "", None
        await self._to_kv(domain, fetched)
        return fetched, None

    def _failed(self, domain: str, known: _Known, txt_id: str, now: float, failure: str,
                detail: str) -> tuple[StsPolicy | None, str]:
        known.failed_id, known.retry_at, known.failure = txt_id, now + RETRY_FAILED_AFTER, failure
        if known.policy is None or known.policy.mode != "none":  # §3.3: tell the operator
            log.warning("MTA-STS policy of %s (id %s) not usable: %s: %s%s", domain, txt_id, failure, detail,
                        "; the cached policy still applies" if known.policy else "")
        return known.policy, failure

    @staticmethod
    def _current(policy: StsPolicy | None, txt_id: str, now: float) -> bool:
        return policy is not None and policy.id == txt_id and now - policy.fetched_at < REFRESH_AFTER

    def _entry(self, domain: str) -> _Known:
        known = self._known.get(domain)
        if known is None:
            known = self._known[domain] = _Known()
            if len(self._known) > MEMORY_DOMAINS:
                self._known.popitem(last=False)  # the least recently asked for
        self._known.move_to_end(domain)
        return known

    async def _txt_id(self, domain: str) -> str | None:
        try:
            answer = await self.resolver.resolve(f"_mta-sts.{domain}", "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except dns.exception.DNSException as e:
            log.info("MTA-STS TXT lookup for %s failed: %s", domain, type(e).__name__)
            return None
        return parse_txt(b"".join(rr.strings) for rr in answer)

    async def _from_kv(self, domain: str, known: _Known, now: float) -> None:
        """Adopt the shared cache's policy when it is newer than ours and unexpired."""
        known.kv_checked_at = now
        try:
            entry = await self.kv.get(domain)
            shared = StsPolicy.from_json(entry.value)
        except KeyNotFoundError:
            return
        except (StsPolicyInvalid, ValueError, KeyError, TypeError) as e:
            log.warning("MTA-STS cache entry for %s unreadable: %s", domain, e)
            return
        except Exception as e:  # NATS away: this replica's own memory still works
            log.warning("MTA-STS cache read for %s failed: %r", domain, e)
            return
        if shared.domain != domain or shared.expired(now):
            return
        if known.policy is None or shared.fetched_at > known.policy.fetched_at:
            known.policy = shared

    async def _to_kv(self, domain: str, policy: StsPolicy) -> None:
        try:
            await self.kv.put(domain, policy.to_json())
        except Exception as e:
            log.warning("MTA-STS cache write for %s failed: %r", domain, e)

