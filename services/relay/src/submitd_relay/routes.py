"""Where mail for a domain goes: its MX hosts, then their addresses (RFC 5321 §5.1)."""

from __future__ import annotations

import ipaddress
import random
import time
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.rdatatype
import dns.resolver

from .outbound.dane import Tlsa
from .settings import Settings


class CachedLookups:
    """``resolve(name, rdtype)`` as dnspython's, with answers kept, parsed, until they expire:
    a destination's MX, addresses, TLSA and MTA-STS records (found or not) are asked once per
    TTL, not once per message; dnspython's own cache still builds a query and, for a name that
    has no such record, a new exception each time. Failures (SERVFAIL, timeouts) are not kept."""

    LIMIT = 20_000
    NEGATIVE_TTL = 60.0  # without an SOA in the denial
    MAX_NEGATIVE_TTL = 3600.0

    def __init__(self, resolver: dns.asyncresolver.Resolver) -> None:
        self.resolver = resolver
        self.kept: dict[tuple[str, str], tuple[float, object]] = {}

    async def resolve(self, name: str, rdtype: str):
        key = (name.lower(), rdtype)
        hit = self.kept.get(key)
        now = time.time()
        if hit is not None and hit[0] > now:
            if isinstance(hit[1], dns.exception.DNSException):
                raise hit[1].with_traceback(None)
            return hit[1]
        try:
            answer = await self.resolver.resolve(name, rdtype)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer) as e:
            self._keep(key, now + self._negative_ttl(e), e)
            raise
        self._keep(key, answer.expiration, answer)
        return answer

    def peek(self, name: str, rdtype: str):
        """What ``resolve`` would give at once, without asking: an answer, the kept NXDOMAIN or
        NoAnswer, or None (nothing kept, or expired)."""
        hit = self.kept.get((name.lower(), rdtype))
        return hit[1] if hit is not None and hit[0] > time.time() else None

    def _keep(self, key: tuple[str, str], until: float, value: object) -> None:
        if len(self.kept) >= self.LIMIT:
            self.kept.clear()  # rare, and all that costs is one lookup each again
        self.kept[key] = (until, value)

    def _negative_ttl(self, e: dns.exception.DNSException) -> float:
        responses = list((e.kwargs.get("responses") or {}).values()) or [e.kwargs.get("response")]
        ttls = [min(rrset.ttl, rrset[0].minimum) for r in responses if r is not None
                for rrset in r.authority if rrset.rdtype == dns.rdatatype.SOA]
        return min(min(ttls, default=self.NEGATIVE_TTL), self.MAX_NEGATIVE_TTL)


class TlsaUnavailable(Exception):
    """A TLSA lookup failed (SERVFAIL, as a validating resolver answers for bogus data, or a timeout)."""


class RouteError(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


@dataclass(frozen=True)
class Host:
    name: str  # for TLS and reports
    address: str  # what to connect to
    port: int
    secure: bool = False  # the MX and this address came DNSSEC-validated (the AD bit): DANE may apply


class MxResolver:
    """MX, then A/AAAA (RFC 5321 §5.1); a null MX (RFC 7505) refuses the domain at once."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        resolver = dns.asyncresolver.Resolver(configure=not settings.dns_nameservers)
        if settings.dns_nameservers:
            resolver.nameservers = list(settings.dns_nameservers)
            resolver.port = settings.dns_port
        resolver.lifetime = settings.dns_timeout
        self.dnssec = settings.dns_dnssec
        if self.dnssec:
            # Ask for DNSSEC records and for the AD bit (RFC 6840 §5.7); only a validating
            # resolver the operator named (DNS_DNSSEC) is believed about it.
            resolver.use_edns(0, dns.flags.DO, 1232)
            resolver.flags = dns.flags.RD | dns.flags.AD
        self.r = CachedLookups(resolver)
        self.internal = [ipaddress.ip_network(n, strict=False) for n in settings.mx_internal_networks]

    def _secure(self, answer: dns.resolver.Answer) -> bool:
        return self.dnssec and bool(answer.response.flags & dns.flags.AD)

    async def hosts(self, domain: str) -> list[Host]:
        mx_secure = False
        try:
            answer = await self.r.resolve(domain, "MX")
            mx_secure = self._secure(answer)
            records = list(answer)
            if any(rr.exchange == dns.name.root for rr in records):
                raise RouteError(556, f"5.1.10 Domain {domain} does not accept mail (null MX, RFC 7505)")
            # Lowest preference first; equal preferences in random order (RFC 5321 §5.1).
            records.sort(key=lambda rr: (rr.preference, random.random()))
            names = [rr.exchange.to_text(omit_final_dot=True) for rr in records]
        except dns.resolver.NXDOMAIN:
            raise RouteError(550, f"5.1.2 Domain {domain} does not exist") from None
        except dns.resolver.NoAnswer as e:
            names = [domain]  # no MX: the domain itself is the implicit MX
            # ... and DANE applies to it if the denial of the MX came validated (RFC 7672 §2.2.1).
            response = e.kwargs.get("response")
            mx_secure = self.dnssec and response is not None and bool(response.flags & dns.flags.AD)
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
            raise RouteError(451, f"4.4.3 DNS lookup of {domain} failed: {type(e).__name__}") from None
        except (dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel, dns.name.IDNAException) as e:
            raise RouteError(553, f"5.1.2 Invalid recipient domain {domain}: {type(e).__name__}") from None
        except dns.exception.DNSException as e:
            raise RouteError(451, f"4.4.3 DNS lookup of {domain} failed: {type(e).__name__}") from None
        hosts: list[Host] = []
        temporary = internal = False
        for name in names:
            for rdtype in ("A", "AAAA"):
                try:
                    answer = await self.r.resolve(name, rdtype)
                    secure = mx_secure and self._secure(answer)
                    for rr in answer:
                        if not self.reachable(rr.address):
                            internal = True  # DNS must not aim the relay at the site's own network
                            continue
                        hosts.append(Host(name, rr.address, self.s.mx_port, secure))
                except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                    pass
                except dns.exception.DNSException:
                    temporary = True
        if not hosts:
            if temporary:
                raise RouteError(451, f"4.4.3 DNS lookup of the mail hosts of {domain} failed")
            if internal:
                raise RouteError(550, f"5.4.4 The mail hosts of {domain} have no public address")
            raise RouteError(550, f"5.4.4 No address for the mail hosts of {domain}")
        return hosts

    async def tlsa(self, host: Host) -> list[Tlsa] | None:
        """The DNSSEC-validated TLSA records of ``host`` (RFC 7672 §2.2): None where DANE does not
        apply (insecure, or none published); TlsaUnavailable where the lookup failed or was bogus
        (the host must not be used then, and never in clear)."""
        if not (self.dnssec and host.secure):
            return None
        name = f"_{host.port}._tcp.{host.name}"
        try:
            answer = await self.r.resolve(name, "TLSA")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None  # a validated denial or an insecure one: either way, no DANE here
        except dns.exception.DNSException as e:
            raise TlsaUnavailable(f"TLSA lookup of {name} failed ({type(e).__name__}): DNSSEC-bogus or unreachable") from None
        if not self._secure(answer):
            return None
        return [Tlsa(rr.usage, rr.selector, rr.mtype, rr.cert) for rr in answer]

    def reachable(self, address: str) -> bool:
        """A public address, or one in MX_INTERNAL_NETWORKS: loopback, private, link-local and
        other special-purpose addresses are never connected to for a domain's MX."""
        ip = ipaddress.ip_address(address)
        if any(ip in net for net in self.internal):
            return True
        return ip.is_global
