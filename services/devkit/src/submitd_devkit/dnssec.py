"""A real DNSSEC setup on 127.0.0.1 for the relay's DANE and MTA-STS tests: Debian's ``knotd``
serves the lab's zones, the signed ones signed offline with ldnsutils (``ldns-keygen -a
ECDSAP256SHA256``, a KSK and a ZSK per zone, then ``ldns-signzone``; knot signs nothing, it serves
them as they are), and Debian's ``unbound`` validates them against trust anchors (the KSKs' DS
records), each lab zone a stub zone at knot. What a client of the resolver sees:

- a name in a signed zone: its data with the AD bit (secure);
- a name in an unsigned zone (``domain-insecure``): its data without AD (insecure);
- a name listed as bogus: SERVFAIL (its RRSIG is spoilt after signing: the data no longer matches);
- any other name: REFUSED by unbound itself, or its built-in answers (localhost, test.: NXDOMAIN).

    lab = DnssecLab(tmp_path / "dns", zones={
        "signed.test": Zone(records={
            "signed.test": {"MX": ["10 mx.signed.test."], "TXT": ["v=spf1 -all"]},
            "mx.signed.test": {"A": ["127.0.0.1"]},
            "_25._tcp.mx.signed.test": {"TLSA": ["3 1 1 <sha-256 of the key, hex>"]},
            "_mta-sts.signed.test": {"TXT": ["v=STSv1; id=1"]}}),
        "plain.test": Zone(signed=False, records={"mx.plain.test": {"A": ["127.0.0.1"]}}),
    }, bogus={("mx.signed.test", "A")}).start()
    lab.resolver        # ("127.0.0.1", port): unbound, the relay's DNS_NAMESERVERS, DNS_PORT (DNS_DNSSEC)
    lab.set_records("mx.signed.test", "A", ["127.0.0.2"])            # re-signed, reloaded, flushed
    lab.set_records("_25._tcp.mx.signed.test", "TLSA", [...], bogus=True)
    lab.authoritative   # ("127.0.0.1", port): knotd, which answers without validating anything
    lab.flush("signed.test")                                          # unbound's cache, at and below
    lab.stop()          # or: with DnssecLab(...) as lab

Starting takes about 0.1 s (0.2 s with five signed zones): keys, signing, both servers up,
readiness by queries, and a check that each zone's SOA comes back secure or insecure as it should.

Record tables are DnsServer's (dns.py): name -> {rdtype: [rdata as zone-file text]}, names
absolute (the final dot optional), names inside rdata absolute too. A TXT value is the text itself
(quoted here, and split into strings of 255 bytes); one that starts with ``"`` is taken as quoted
zone-file text. Each zone gets an SOA and ``NS localhost.`` of its own; TTLs are 30 s, and unbound
keeps nothing longer than 5 s, a denial 1 s (set_records flushes the zone from its cache anyway).
``DnssecLab(..., ttl=3600)`` gives every record, denial and cache that TTL instead, as a real zone
would (make bench: a relay's DNS cache then holds, as in production).

A client sees the AD bit only if it asks for DNSSEC: the DO bit (dnspython:
``resolver.use_edns(0, dns.flags.DO, 1232)``) or the AD bit (``resolver.flags = RD | AD``).

Nothing leaves loopback: unbound sends from 127.0.0.1 (``outgoing-interface``), with ``do-ip6: no``,
and has nowhere to go but knot (its root hints are never used: every name is a stub zone or refused
locally); its source ports stay above 32767, out of free_port's range. Neither the system's
unbound nor knot (service or configuration) is used: configs, keys, zone files and logs
(knotd.log, unbound.log) are in the lab's directory; knot's control socket needs a short path, so
its rundir is a temporary directory under /tmp, removed at stop. unbound's remote control
(cache flushes) is on a loopback port without certificates. Needs knot, unbound and ldnsutils
(.ci/run installs them).

    python -m submitd_devkit.dnssec DIR     # the example zones below, until Ctrl-C
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT

from .ports import free_port

KNOTD, UNBOUND = "/usr/sbin/knotd", "/usr/sbin/unbound"
KEYGEN, SIGNZONE = "/usr/bin/ldns-keygen", "/usr/bin/ldns-signzone"
TTL = 30
Records = dict[str, dict[str, list[str]]]


@dataclass
class Zone:
    signed: bool = True
    records: Records = field(default_factory=dict)


def _name(name: str) -> str:
    return name.lower().rstrip(".") + "."


def _rdata(rdtype: str, value: str) -> str:
    """Zone-file text for one value, checked by dnspython (a mistake fails here, not in knot)."""
    if rdtype == "TXT" and not value.startswith('"'):
        data = value.encode()
        strings = [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
        return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, strings).to_text()
    return dns.rdata.from_text("IN", rdtype, value, origin=dns.name.root, relativize=False).to_text()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """To the process and whatever it started (each has a session, so a process group, of its own)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            proc.send_signal(sig)


def _stop(procs: list[subprocess.Popen], rundir: str) -> None:
    for proc in procs:
        _signal_group(proc, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    shutil.rmtree(rundir, ignore_errors=True)


class DnssecLab:
    def __init__(self, workdir: Path | str, zones: dict[str, Zone],
                 bogus: set[tuple[str, str]] | frozenset = frozenset(), ttl: int | None = None) -> None:
        for tool in (KNOTD, UNBOUND, KEYGEN, SIGNZONE):
            if not Path(tool).exists():
                raise RuntimeError(f"{tool} is missing: apt-get install knot unbound ldnsutils")
        self.root = Path(workdir).absolute()
        self.zones = {_name(z): Zone(zone.signed, {}) for z, zone in zones.items()}
        for z, zone in zones.items():
            for name, table in zone.records.items():
                if self._zone_of(name) != _name(z):
                    raise ValueError(f"{name} is not in zone {z}")
                self.zones[_name(z)].records[_name(name)] = {t.upper(): list(v) for t, v in table.items()}
        self.bogus = {(_name(n), t.upper()) for n, t in bogus}
        self.ttl = ttl  # None: TTL in the zones, unbound's cache 5 s and 1 s for a denial
        for name, _ in self.bogus:
            if not self.zones[self._zone_of(name)].signed:
                raise ValueError(f"{name}: only data in a signed zone can be bogus")
        self.serials = dict.fromkeys(self.zones, 0)
        self.knot_port, self.port, self.control_port = free_port(), free_port(), free_port()
        self.keys: dict[str, list[str]] = {}  # zone -> [ZSK, KSK] (ldns key file base names)
        self.procs: list[subprocess.Popen] = []
        self.rundir = ""
        self._finalizer: weakref.finalize | None = None

    @property
    def resolver(self) -> tuple[str, int]:
        """unbound, the validating resolver."""
        return ("127.0.0.1", self.port)

    @property
    def authoritative(self) -> tuple[str, int]:
        """knotd, which serves the zones (signatures, spoilt ones too, and all)."""
        return ("127.0.0.1", self.knot_port)

    @property
    def running(self) -> bool:
        return self._finalizer is not None and self._finalizer.alive

    def _zone_of(self, name: str) -> str:
        labels = _name(name).split(".")
        for i in range(len(labels) - 1):
            if (zone := ".".join(labels[i:])) in self.zones:
                return zone
        raise ValueError(f"{name} is in none of the lab's zones {sorted(self.zones)}")

    # -- start, stop ---------------------------------------------------------------------------

    def start(self) -> "DnssecLab":
        for sub in ("keys", "zones", "knot-db"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.rundir = tempfile.mkdtemp(prefix="dnsseclab-")
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.rundir)  # at exit, if not stopped
        try:
            for zone in self.zones:
                if self.zones[zone].signed:
                    self.keys[zone] = [self._run([KEYGEN, "-a", "ECDSAP256SHA256", *flags, zone.rstrip(".")],
                                                 cwd=self.root / "keys").strip() for flags in ([], ["-k"])]
                self._write_zone(zone)
            self._write_configs()
            for args, log in (([KNOTD], "knotd.log"), ([UNBOUND, "-d"], "unbound.log")):
                conf = self.root / ("knot.conf" if args[0] == KNOTD else "unbound.conf")
                with open(self.root / log, "ab") as out:
                    self.procs.append(subprocess.Popen([*args, "-c", str(conf)], stdout=out, stderr=out,
                                                       start_new_session=True))
            # knot first: unbound is asked nothing that reaches knot before knot has every zone.
            self._wait("knotd to load the zones",
                       lambda: all(self._knot_serial(z) == s for z, s in self.serials.items()))
            self._wait("unbound to answer", lambda: self._ask(self.resolver, "localhost.", "A", 0.05) is not None)
            for zone, spec in self.zones.items():
                self._check(zone, spec.signed)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM to knotd and unbound, and wait for them (killed after 5 s); the rundir removed."""
        if self._finalizer is not None:
            self._finalizer()  # _stop, once

    def __enter__(self) -> "DnssecLab":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- changes -------------------------------------------------------------------------------

    def set_records(self, name: str, rdtype: str, values: list[str], *, bogus: bool | None = None) -> None:
        """The values of one RRset (none: removed), published as a zone change would be: the zone
        re-signed (same keys) with a new serial, knot reloaded (SIGHUP; waits until knot serves
        it), the zone flushed from unbound's cache. ``bogus``: spoil its signature from now on
        (True) or no longer (False); None keeps it as it was."""
        name, rdtype = _name(name), rdtype.upper()
        zone = self._zone_of(name)
        records = self.zones[zone].records.setdefault(name, {})
        if values:
            records[rdtype] = list(values)
        else:
            records.pop(rdtype, None)
        if bogus and values:
            if not self.zones[zone].signed:
                raise ValueError(f"{name}: only data in a signed zone can be bogus")
            self.bogus.add((name, rdtype))
        elif bogus is False or not values:
            self.bogus.discard((name, rdtype))
        self._write_zone(zone)
        if self.running:
            self.procs[0].send_signal(signal.SIGHUP)  # knot: reload the configuration and changed zones
            self._wait(f"knotd to serve serial {self.serials[zone]} of {zone}",
                       lambda: self._knot_serial(zone) == self.serials[zone])
            self.flush(zone)

    def flush(self, zone: str = ".") -> None:
        """Forget what unbound has cached at and below ``zone`` (unbound-control flush_zone)."""
        self._control("flush_zone", _name(zone))

    def _control(self, *command: str) -> str:
        """unbound-control's protocol, spoken directly (no certificates: control-use-cert: no)."""
        with socket.create_connection(("127.0.0.1", self.control_port), timeout=5) as sock:
            sock.sendall(f"UBCT1 {' '.join(command)}\n".encode())
            text = sock.makefile("rb").read().decode(errors="replace")  # until unbound closes
        if not text.startswith("ok"):
            raise RuntimeError(f"unbound-control {' '.join(command)}: {text.strip()}")
        return text

    # -- zone files, keys, configs -------------------------------------------------------------

    def _zone_text(self, zone: str) -> str:
        self.serials[zone] += 1
        lines = [f"$TTL {self.ttl or TTL}",
                 f"{zone} SOA localhost. hostmaster.localhost. {self.serials[zone]} 60 10 3600 {self.ttl or 1}",
                 f"{zone} NS localhost."]
        for name, table in sorted(self.zones[zone].records.items()):
            lines += [f"{name} {rdtype} {_rdata(rdtype, value)}"
                      for rdtype, values in table.items() for value in values]
        return "\n".join(lines) + "\n"

    def _write_zone(self, zone: str) -> None:
        path = self.root / "zones" / f"{zone}zone"
        text = self._zone_text(zone)
        if self.zones[zone].signed:
            unsigned = self.root / "keys" / f"{zone}zone.unsigned"
            unsigned.write_text(text)
            now = datetime.now(timezone.utc)
            self._run([SIGNZONE, "-i", f"{now - timedelta(hours=1):%Y%m%d%H%M%S}",
                       "-e", f"{now + timedelta(days=30):%Y%m%d%H%M%S}", "-f", f"{unsigned}.signed",
                       str(unsigned), *self.keys[zone]], cwd=self.root / "keys")
            text = self._spoil(zone, Path(f"{unsigned}.signed").read_text())
        path.with_suffix(".tmp").write_text(text)
        os.replace(path.with_suffix(".tmp"), path)

    def _spoil(self, zone: str, signed: str) -> str:
        """The bogus RRsets' signatures with one byte changed: they verify no more."""
        wanted = {(n, t) for n, t in self.bogus if self._zone_of(n) == zone}
        lines, spoilt = [], set()
        for line in signed.splitlines():
            fields = line.split(None, 4)  # name TTL class type rdata (one record a line, as ldns writes it)
            key = (fields[0].lower(), fields[4].split()[0]) if len(fields) == 5 and fields[3] == "RRSIG" else None
            if key in wanted:
                rrsig = dns.rdata.from_text("IN", "RRSIG", fields[4], origin=dns.name.root, relativize=False)
                wrong = bytes([rrsig.signature[0] ^ 0xFF]) + rrsig.signature[1:]
                line = "\t".join(fields[:4] + [rrsig.replace(signature=wrong).to_text()])
                spoilt.add(key)
            lines.append(line)
        if wanted - spoilt:
            raise ValueError(f"bogus, but no such data to spoil: {sorted(wanted - spoilt)}")
        return "\n".join(lines) + "\n"

    def _write_configs(self) -> None:
        zones = "".join(f"  - domain: {z}\n    file: {z}zone\n" for z in self.zones)
        (self.root / "knot.conf").write_text(
            f'server:\n    rundir: "{self.rundir}"\n    listen: 127.0.0.1@{self.knot_port}\n'
            "    udp-workers: 1\n    tcp-workers: 1\n    background-workers: 1\n"
            f'database:\n    storage: "{self.root / "knot-db"}"\n'
            "log:\n  - target: stderr\n    any: info\n"
            # Served as written: no signing, no journal, no writing back to the files.
            f'template:\n  - id: default\n    storage: "{self.root / "zones"}"\n    zonefile-sync: -1\n'
            f"    zonefile-load: whole\n    journal-content: none\nzone:\n{zones}")
        anchors = self.root / "anchors"
        anchors.write_text("".join((self.root / "keys" / f"{ksk}.ds").read_text() for _, ksk in self.keys.values()))
        stubs = "".join(f'stub-zone:\n    name: "{z}"\n    stub-addr: 127.0.0.1@{self.knot_port}\n'
                        for z in self.zones)
        local = "".join(f'    local-zone: "{z}" transparent\n' for z in self.zones)
        insecure = "".join(f'    domain-insecure: "{z}"\n' for z, spec in self.zones.items() if not spec.signed)
        (self.root / "unbound.conf").write_text(
            f"server:\n    interface: 127.0.0.1\n    port: {self.port}\n    do-ip6: no\n"
            "    outgoing-interface: 127.0.0.1\n    do-not-query-localhost: no\n"
            "    outgoing-port-avoid: 0-32767\n    outgoing-range: 64\n    num-threads: 1\n"
            f'    username: ""\n    chroot: ""\n    directory: "{self.root}"\n'
            f'    pidfile: "{self.root / "unbound.pid"}"\n    use-syslog: no\n    logfile: ""\n'
            "    verbosity: 1\n    val-log-level: 2\n    access-control: 127.0.0.0/8 allow\n"
            '    module-config: "validator iterator"\n    trust-anchor-signaling: no\n'
            f'    trust-anchor-file: "{anchors}"\n'
            f"    cache-max-ttl: {self.ttl or 5}\n    cache-max-negative-ttl: {self.ttl or 1}\n    val-bogus-ttl: 1\n"
            '    local-zone: "." refuse\n' + local + insecure + stubs +
            f"remote-control:\n    control-enable: yes\n    control-interface: 127.0.0.1\n"
            f"    control-port: {self.control_port}\n    control-use-cert: no\n")

    # -- helpers -------------------------------------------------------------------------------

    def _run(self, command: list[str], cwd: Path) -> str:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    @staticmethod
    def _ask(server: tuple[str, int], name: str, rdtype: str, timeout: float = 2) -> dns.message.Message | None:
        query = dns.message.make_query(name, rdtype)
        query.flags |= dns.flags.AD
        try:
            return dns.query.udp(query, server[0], port=server[1], timeout=timeout)
        except (dns.exception.Timeout, OSError):
            return None

    def _knot_serial(self, zone: str) -> int | None:
        reply = self._ask(self.authoritative, zone, "SOA", 0.05)
        if reply is None or reply.rcode() != dns.rcode.NOERROR or not reply.answer:
            return None
        return reply.answer[0][0].serial

    def _wait(self, what: str, ready) -> None:
        deadline = time.monotonic() + 10
        while not ready():
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}) {self._logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what} {self._logs()}")
            time.sleep(0.005)

    def _check(self, zone: str, signed: bool) -> None:
        """The zone's SOA through unbound: secure (AD) if signed, else insecure, or the lab is wrong."""
        reply = self._ask(self.resolver, zone, "SOA")
        if reply is None or reply.rcode() != dns.rcode.NOERROR or bool(reply.flags & dns.flags.AD) != signed:
            got = "no answer" if reply is None else f"{dns.rcode.to_text(reply.rcode())} {reply.flags!r}"
            raise RuntimeError(f"unbound's answer for the SOA of {zone}: {got} {self._logs()}")

    def _logs(self) -> str:
        tails = [f"{log}:\n{(self.root / log).read_text(errors='replace')[-1500:]}"
                 for log in ("knotd.log", "unbound.log") if (self.root / log).exists()]
        return "; see\n" + "\n".join(tails)


EXAMPLE = {
    "signed.test": Zone(records={"signed.test": {"MX": ["10 mx.signed.test."]},
                                 "mx.signed.test": {"A": ["127.0.0.1"]},
                                 "bogus.signed.test": {"A": ["127.0.0.1"]},
                                 "_mta-sts.signed.test": {"TXT": ["v=STSv1; id=1"]}}),
    "plain.test": Zone(signed=False, records={"plain.test": {"MX": ["10 mx.plain.test."]},
                                              "mx.plain.test": {"A": ["127.0.0.1"]}}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description="A DNSSEC lab (knotd + unbound) on 127.0.0.1, until Ctrl-C")
    parser.add_argument("directory", type=Path, help="its configs, keys, zone files and logs (kept)")
    started = time.monotonic()
    lab = DnssecLab(parser.parse_args().directory, EXAMPLE, bogus={("bogus.signed.test", "A")}).start()
    print(f"started in {time.monotonic() - started:.2f} s; resolver 127.0.0.1 port {lab.port},"
          f" knot port {lab.knot_port}")
    print(f"  try: drill -D -p {lab.port} @127.0.0.1 mx.signed.test A   (zones: {', '.join(EXAMPLE)};"
          " bogus: bogus.signed.test A)")
    print(f"  relay: SUBMITD_RELAY_DNS_NAMESERVERS='[\"127.0.0.1\"]' SUBMITD_RELAY_DNS_PORT={lab.port}"
          " SUBMITD_RELAY_DNS_DNSSEC=true")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        lab.procs[0].wait()
    except KeyboardInterrupt:
        pass
    finally:
        lab.stop()


if __name__ == "__main__":
    main()
