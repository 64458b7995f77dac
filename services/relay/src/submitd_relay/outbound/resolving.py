"""aiohttp's name lookups through the relay's own resolver (the one its MX lookups use), never the
system's, keeping only the addresses the relay would deliver mail to (MX_INTERNAL_NETWORKS): a DNS
record must not aim the relay's HTTPS clients (MTA-STS policies, TLS reports) at the site's own
network."""

from __future__ import annotations

import socket
from collections.abc import Callable

import dns.asyncresolver
import dns.exception
import dns.resolver
from aiohttp.abc import AbstractResolver


class RelayResolver(AbstractResolver):
    def __init__(self, resolver: dns.asyncresolver.Resolver, reachable: Callable[[str], bool]) -> None:
        self.r = resolver
        self.reachable = reachable

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list:
        found, refused = [], []
        for rdtype, fam in (("A", socket.AF_INET), ("AAAA", socket.AF_INET6)):
            if family not in (socket.AF_UNSPEC, fam):
                continue
            try:
                answer = await self.r.resolve(host, rdtype)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException as e:
                raise OSError(f"DNS lookup of {host} failed: {type(e).__name__}") from None
            for rr in answer:
                (found if self.reachable(rr.address) else refused).append(
                    {"hostname": host, "host": rr.address, "port": port, "family": fam, "proto": 0,
                     "flags": socket.AI_NUMERICHOST})
        if not found:
            raise OSError(f"{host} has no public address" if refused else f"{host} has no address")
        return found

    async def close(self) -> None:
        pass
