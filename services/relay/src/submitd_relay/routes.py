"""Where mail for a domain goes: its MX hosts, then their addresses (RFC 5321 §5.1)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from .settings import Settings


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


class MxResolver:
    """MX, then A/AAAA (RFC 5321 §5.1); a null MX (RFC 7505) refuses the domain at once."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.r = dns.asyncresolver.Resolver(configure=not settings.dns_nameservers)
        if settings.dns_nameservers:
            self.r.nameservers = list(settings.dns_nameservers)
            self.r.port = settings.dns_port
        self.r.lifetime = settings.dns_timeout

    async def hosts(self, domain: str) -> list[Host]:
        try:
            answer = await self.r.resolve(domain, "MX")
            records = list(answer)
            if any(rr.exchange == dns.name.root for rr in records):
                raise RouteError(556, f"5.1.10 Domain {domain} does not accept mail (null MX, RFC 7505)")
            # Lowest preference first; equal preferences in random order (RFC 5321 §5.1).
            records.sort(key=lambda rr: (rr.preference, random.random()))
            names = [rr.exchange.to_text(omit_final_dot=True) for rr in records]
        except dns.resolver.NXDOMAIN:
            raise RouteError(550, f"5.1.2 Domain {domain} does not exist") from None
        except dns.resolver.NoAnswer:
            names = [domain]  # no MX: the domain itself is the implicit MX
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
            raise RouteError(451, f"4.4.3 DNS lookup of {domain} failed: {type(e).__name__}") from None
        except (dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel, dns.name.IDNAException) as e:
            raise RouteError(553, f"5.1.2 Invalid recipient domain {domain}: {type(e).__name__}") from None
        except dns.exception.DNSException as e:
            raise RouteError(451, f"4.4.3 DNS lookup of {domain} failed: {type(e).__name__}") from None
        hosts: list[Host] = []
        temporary = False
        for name in names:
            for rdtype in ("A", "AAAA"):
                try:
                    for rr in await self.r.resolve(name, rdtype):
                        hosts.append(Host(name, rr.address, self.s.mx_port))
                except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                    pass
                except dns.exception.DNSException:
                    temporary = True
        if not hosts:
            if temporary:
                raise RouteError(451, f"4.4.3 DNS lookup of the mail hosts of {domain} failed")
            raise RouteError(550, f"5.4.4 No address for the mail hosts of {domain}")
        return hosts
