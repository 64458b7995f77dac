"""A small authoritative DNS server on 127.0.0.1 for tests of MX delivery: real UDP
queries, answered from a table, so that no test ever asks (or sends mail to) the outside.

    server = DnsServer({"example.net": {"MX": ["10 mx.example.net."]},
                        "mx.example.net": {"A": ["127.0.0.1"]}}).start()
"""

from __future__ import annotations

import socket
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from .ports import free_port


def _key(name: str) -> str:
    return name.lower().rstrip(".") + "."


class DnsServer:
    def __init__(self, zone: dict[str, dict[str, list[str]]]) -> None:
        self.zone = {_key(name): records for name, records in zone.items()}
        self.port = free_port()
        self.queries: list[tuple[str, str]] = []
        self._stopping = False
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._thread = threading.Thread(target=self._serve, daemon=True, name="dns")

    def start(self) -> "DnsServer":
        self._sock.bind(("127.0.0.1", self.port))
        self._thread.start()
        return self

    def stop(self) -> None:
        # Closing the socket does not wake a thread blocked in recvfrom: a datagram does.
        self._stopping = True
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"", ("127.0.0.1", self.port))
        except OSError:
            pass
        self._thread.join(2)
        self._sock.close()

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        for question in query.question:
            name = question.name.to_text().lower()
            rdtype = dns.rdatatype.to_text(question.rdtype)
            self.queries.append((name, rdtype))
            records = self.zone.get(name)
            if records is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif rdtype in records:
                response.answer.append(dns.rrset.from_text(name, 60, "IN", rdtype, *records[rdtype]))
        return response

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self._sock.recvfrom(4096)
            except OSError:
                return
            if self._stopping:
                return
            try:
                reply = self.answer(dns.message.from_wire(data)).to_wire()
            except Exception:
                continue
            try:
                self._sock.sendto(reply, peer)
            except OSError:
                return
