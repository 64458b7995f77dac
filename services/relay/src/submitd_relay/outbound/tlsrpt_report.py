"""A TLS report (RFC 8460): the counts it is made of, where it goes (the domain's TLSRPT record,
§3) and in what form: the JSON report (§4), POSTed to an https: address (§5.4), or the message
for a mailto: address (§5.3). Every name is resolved by the relay's own resolver, never the
system's, and no address the relay would not deliver mail to is connected to."""

from __future__ import annotations

import base64
import email.utils
import hashlib
import ipaddress
import json
import re
import secrets
import ssl
import time
import urllib.parse
from dataclasses import dataclass, field

import aiohttp
import dns.asyncresolver
import dns.resolver
import yarl

from submitd.v1 import common_pb2
from submitd_common import received
from submitd_common.addresses import parse_mailbox

from . import results as R
from .resolving import RelayResolver

MAX_RUA = 5  # report addresses used per domain: a record cannot make the relay a mailing list
MAX_FAILURE_KINDS = 200  # distinct (result type, MX, address) per policy and day; more are summed without MX and address
MAX_REASON = 200  # characters of a failure's detail kept as its failure-reason-code
_VERSION = re.compile(r"^v=TLSRPTv1[ \t]*;")


class ReportNotDelivered(Exception):
    pass


_UNSAFE = re.compile(r"[^a-z0-9.\-]")


def key_domain(domain: str) -> str | None:
    """A policy domain as the end of a KV key (letters, digits, '-', '.' kept; anything else as
    =XX per octet), or None for one that could not be a key (an empty label)."""
    encoded = _UNSAFE.sub(lambda m: "".join(f"={b:02x}" for b in m.group().encode()), domain)
    return encoded if encoded and ".." not in encoded and not encoded.startswith(".") else None


def domain_of_key(encoded: str) -> str:
    return re.sub(rb"=([0-9a-f]{2})", lambda m: bytes.fromhex(m.group(1).decode()), encoded.encode()).decode(
        "utf-8", "replace")


PolicyKey = tuple[str, tuple[str, ...], tuple[str, ...]]  # type, policy strings, MX patterns
FailureKey = tuple[str, str, str]  # result type, receiving MX host name, receiving address


@dataclass
class PolicyCounts:
    successes: int = 0
    failures: dict[FailureKey, int] = field(default_factory=dict)
    reasons: dict[FailureKey, str] = field(default_factory=dict)

    def fail(self, key: FailureKey, count: int, reason: str) -> None:
        if key not in self.failures and len(self.failures) >= MAX_FAILURE_KINDS:
            key = (key[0], "", "")
        self.failures[key] = self.failures.get(key, 0) + count
        if reason and key not in self.reasons:
            self.reasons[key] = reason[:MAX_REASON]


class DomainCounts:
    """One policy domain's results in one period, by policy (RFC 8460 §4.2)."""

    def __init__(self) -> None:
        self.policies: dict[PolicyKey, PolicyCounts] = {}

    def add(self, result: R.TlsResult) -> None:
        counts = self._policy((result.policy_type, tuple(result.policy_strings), tuple(result.mx_host_patterns)))
        if result.ok:
            counts.successes += 1
        else:
            counts.fail((result.result_type, result.receiving_mx_hostname, result.receiving_ip), 1, result.detail)

    def merge(self, other: "DomainCounts") -> None:
        for key, theirs in other.policies.items():
            mine = self._policy(key)
            mine.successes += theirs.successes
            for failure, count in theirs.failures.items():
                mine.fail(failure, count, theirs.reasons.get(failure, ""))

    def _policy(self, key: PolicyKey) -> PolicyCounts:
        if key not in self.policies:
            self.policies[key] = PolicyCounts()
        return self.policies[key]

    @property
    def totals(self) -> tuple[int, int]:
        return (sum(p.successes for p in self.policies.values()),
                sum(sum(p.failures.values()) for p in self.policies.values()))

    def to_bytes(self) -> bytes:
        return json.dumps({"policies": [
            {"type": t, "strings": list(strings), "mx": list(mx), "successes": p.successes,
             "failures": [{"result": k[0], "mx": k[1], "ip": k[2], "count": n, "reason": p.reasons.get(k, "")}
                          for k, n in p.failures.items()]}
            for (t, strings, mx), p in self.policies.items()
        ]}, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "DomainCounts":
        counts = cls()
        for raw in json.loads(data).get("policies", []):
            p = counts._policy((raw["type"], tuple(raw["strings"]), tuple(raw["mx"])))
            p.successes += raw["successes"]
            for f in raw["failures"]:
                p.fail((f["result"], f["mx"], f["ip"]), f["count"], f.get("reason", ""))
        return counts


def parse_record(texts: list[str]) -> list[str]:
    """The https: and mailto: URIs of the TLSRPT record among a name's TXT ``texts`` (RFC 8460
    §3): none unless exactly one of them starts with "v=TLSRPTv1;"."""
    records = [t for t in texts if _VERSION.match(t)]
    if len(records) != 1:
        return []
    for part in records[0].split(";")[1:]:
        name, _, value = part.strip(" \t").partition("=")
        if name == "rua":
            uris = [u.strip(" \t") for u in value.split(",")]
            return [u for u in uris if u.lower().startswith(("https://", "mailto:"))][:MAX_RUA]
    return []


async def lookup_rua(resolver: dns.asyncresolver.Resolver, domain: str) -> list[str]:
    """The report addresses ``domain`` publishes at ``_smtp._tls.<domain>`` (none: no reports)."""
    try:
        answer = await resolver.resolve(f"_smtp._tls.{domain}", "TXT")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    return parse_record([b"".join(rr.strings).decode("utf-8", "replace") for rr in answer])


def mailto_address(uri: str) -> str:
    """The address of a mailto: report URI (RFC 6068; its query, if any, is ignored)."""
    path = urllib.parse.unquote(uri[len("mailto:"):].split("?", 1)[0])
    address = parse_mailbox(path)  # ASCII, one address, a domain (a literal is refused below)
    if address.domain.startswith("[") or "." not in address.domain:
        raise ValueError(f"not a mail domain: {address.domain}")
    return f"{address.local}@{address.domain}"


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _datetime(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def build_report(*, organization: str, contact: str, report_id: str, start: int, end: int, domain: str,
                 counts: DomainCounts) -> dict:
    """The JSON report (RFC 8460 §4) of one policy domain's ``counts``."""
    policies = []
    for (policy_type, strings, mx), p in counts.policies.items():
        policy: dict = {"policy-type": policy_type}
        if strings:
            policy["policy-string"] = list(strings)
        policy["policy-domain"] = domain
        if mx:
            policy["mx-host"] = list(mx)
        item: dict = {"policy": policy, "summary": {
            "total-successful-session-count": p.successes,
            "total-failure-session-count": sum(p.failures.values()),
        }}
        details = []
        for (result_type, mx_host, ip), count in sorted(p.failures.items()):
            detail: dict = {"result-type": result_type}
            if mx_host:
                detail["receiving-mx-hostname"] = mx_host
            if ip:
                detail["receiving-ip"] = ip
            detail["failed-session-count"] = count
            reason = p.reasons.get((result_type, mx_host, ip))
            if reason:
                detail["failure-reason-code"] = reason
            details.append(detail)
        if details:
            item["failure-details"] = details
        policies.append(item)
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": _datetime(start), "end-datetime": _datetime(end - 1)},
        "contact-info": contact,
        "report-id": report_id,
        "policies": policies,
    }


def report_filename(submitter: str, domain: str, start: int, end: int, unique: str) -> str:
    """RFC 8460 §5.1: ``submitter!policy-domain!begin!end!unique.json.gz``."""
    return f"{submitter}!{domain}!{start}!{end}!{unique}.json.gz"


def report_message(*, queue_id: str, report_id: str, domain: str, submitter: str, from_address: str, to: str,
                   start: int, end: int, data: bytes, totals: tuple[int, int]) -> bytes:
    """The report as a message (RFC 8460 §5.3): a multipart/report of a text part and the
    gzipped JSON. ``TLS-Required: No`` (RFC 8689 §5): a report about broken TLS must get through it."""
    boundary = f"submitd-tlsrpt-{secrets.token_hex(12)}"
    unique = re.sub(r"[^A-Za-z0-9]", "", report_id.partition("@")[0])
    encoded = base64.b64encode(data).decode()
    successes, failures = totals
    lines = [
        received.report_field(by=submitter, queue_id=queue_id).decode().rstrip("\r\n"),
        f"From: <{from_address}>",
        f"To: <{to}>",
        f"Subject: Report Domain: {domain}",
        f" Submitter: {submitter}",
        f" Report-ID: <{report_id}>",
        f"Date: {email.utils.formatdate(localtime=False)}",
        f"Message-ID: <{queue_id}.tlsrpt.{secrets.token_hex(4)}@{submitter}>",
        f"TLS-Report-Domain: {domain}",
        f"TLS-Report-Submitter: {submitter}",
        "TLS-Required: No",
        "Auto-Submitted: auto-generated",
        "MIME-Version: 1.0",
        'Content-Type: multipart/report; report-type="tlsrpt";',
        f' boundary="{boundary}"',
        "",
        "This is a multipart message in MIME format.",
        "",
        f"--{boundary}",
        'Content-Type: text/plain; charset="us-ascii"',
        "Content-Transfer-Encoding: 7bit",
        "",
        f"This is an aggregate TLS report (RFC 8460) from {submitter} for {domain},",
        f"from {_datetime(start)} to {_datetime(end - 1)}: {successes} successful and {failures} failed",
        "TLS sessions. The report itself is the attached gzipped JSON.",
        "",
        f"--{boundary}",
        "Content-Type: application/tlsrpt+gzip",
        "Content-Transfer-Encoding: base64",
        "Content-Disposition: attachment;",
        f' filename="{report_filename(submitter, domain, start, end, unique)}"',
        "",
        *(encoded[i:i + 76] for i in range(0, len(encoded), 76)),
        "",
        f"--{boundary}--",
        "",
    ]
    return "\r\n".join(lines).encode("ascii")


def report_envelope(queue_id: str, to: str) -> common_pb2.Envelope:
    """From the null path, as a DSN's: a report that cannot be delivered is not reported back."""
    return common_pb2.Envelope(queue_id=queue_id, return_path="", body_type="7BIT", tls_optional=True,
                               recipients=[common_pb2.Recipient(address=to, notify="NEVER")])


async def post_report(uri: str, data: bytes, mx, *, port: int, ca_file: str | None, timeout: float) -> None:
    """POST the gzipped report to an https: address (RFC 8460 §5.4), its certificate verified."""
    url = yarl.URL(uri)
    if url.scheme != "https" or not url.host:
        raise ReportNotDelivered(f"not an https URL: {uri}")
    if url.explicit_port is None:
        url = url.with_port(port)
    try:
        literal = ipaddress.ip_address(url.host)
    except ValueError:
        literal = None
    if literal is not None and not mx.reachable(str(literal)):  # (aiohttp asks no resolver for an address)
        raise ReportNotDelivered(f"{url.host} is not a public address")
    connector = aiohttp.TCPConnector(resolver=RelayResolver(mx.r, mx.reachable), ssl=ssl.create_default_context(cafile=ca_file),
                                     use_dns_cache=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        try:
            async with session.post(url, data=data, headers={"Content-Type": "application/tlsrpt+gzip"},
                                    allow_redirects=False) as response:
                if not 200 <= response.status < 300:
                    raise ReportNotDelivered(f"{url.host} answered HTTP {response.status}")
        except aiohttp.ClientConnectorCertificateError as e:
            raise ReportNotDelivered(f"{url.host}: certificate not trusted ({e.certificate_error})") from None
        except aiohttp.ClientConnectorDNSError as e:
            raise ReportNotDelivered(str(e.os_error)) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise ReportNotDelivered(f"{url.host}: {str(e) or type(e).__name__}") from None
