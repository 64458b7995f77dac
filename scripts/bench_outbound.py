"""`make bench BENCH_ARGS="--only outbound"`: what DANE and MTA-STS cost the relay per message
against opportunistic TLS, in one run (issue 28: under 5% more CPU per message once cached).

On loopback only: a DNSSEC lab (knotd + validating unbound, submitd_devkit.dnssec, with TTLs of an
hour as real zones have) and four destinations whose MX hosts all point at one next hop (the dev
kit's sink with STARTTLS, a certificate from a CA of the run's own); the relay decides TLS per MX
host *name*:

- ``base.plain.test``: TLS_POLICY ``may``, opportunistic TLS without looking for DANE or MTA-STS,
  as the relay delivered before issue 28 (the baseline);
- ``plain.plain.test``: looked for, none published (unsigned zone, no ``_mta-sts`` record):
  opportunistic TLS after the checks;
- ``dane.signed.test``: DNSSEC-signed, TLSA 3 1 1 of the next hop's key (DANE-EE);
- ``sts.plain.test``: unsigned, an MTA-STS policy ``enforce`` served over HTTPS by the dev kit's
  policy host (the MX certificate verified against MX_CA_FILE, its name against the policy).

One relay per destination (NATS and a relay each, all configured alike: DNS_DNSSEC=true at the
lab's unbound, MTA-STS on, MX_CA_FILE the run's CA) run side by side: in each round every relay
gets MESSAGES messages (2 KB, one recipient each, queued straight into JetStream as the frontend
queues them, while the relays are stopped with SIGSTOP) for its destination, then all are let go
at once (SIGCONT) and deliver from a full backlog at the same moments on the same machine. CPU
time per unit of work varies by a third from one second to the next on a shared machine; relays
measured at the same time see the same machine, so each round's ratio holds where separate rounds
would not. The destinations rotate over the relays from round to round, after warm-up rounds that
give every relay every destination (policy fetched, DNS answers and connections cached). Per relay
and round: wall time from SIGCONT to its queue empty again, its CPU seconds (from /proc), and the
EHLOs the next hop got from it (two per connection: before and after STARTTLS), i.e. connections
opened. Connections are pooled per (host, TLS policy) and reused, so most messages go over a
connection verified once: the "once cached" steady state the goal means (a pool idle for 30 s is
closed, so a few connections may be opened again in a round).

Then the relay's own routing and TLS planning (MxResolver.hosts, TlsPlanner.plan with its MTA-STS
policies, the pool key), built from the same settings as its __main__ builds them, is timed alone
in this process for each destination: where a difference comes from, without the machine's noise.
Last, one message each to a destination whose TLSA record does not match and to one whose MTA-STS
policy names another MX host must wait (451 4.7.5): the policies really applied.

    make bench BENCH_ARGS="--only outbound --outbound-messages 3000 --outbound-rounds 8"
    .venv/bin/python scripts/bench_outbound.py --profile /tmp/prof   # and py-spy each relay
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import proc_cpu  # noqa: E402

MX = "127.0.0.2"  # the next hop's address, every MX host's (the policy host is on 127.0.0.1)
SENDER = "bench@example.test"
ADMIN_TOKEN = "bench"
MODES = ("base", "plain", "dane", "sts")
DOMAINS = {"base": "base.plain.test", "plain": "plain.plain.test", "dane": "dane.signed.test",
           "sts": "sts.plain.test"}
LABELS = {"base": "opportunistic, no checks", "plain": "opportunistic, checked", "dane": "DANE (TLSA 3 1 1)",
          "sts": "MTA-STS enforce"}
DNS_TTL = 3600  # every record's and denial's, as real zones have (the lab's default caches 5 s)
GOAL = 0.05  # the policy checks add under 5% CPU per message


# -- the world ----------------------------------------------------------------------------------

@dataclass
class World:
    stacks: list  # one relay each (NATS and the relay), configured alike
    sink: object
    ehlos: Counter  # EHLOs at the next hop by the relay's HELO name
    stops: list = field(default_factory=list)

    def pid(self, k: int) -> int:
        return self.stacks[k].procs["relay"].pid

    def stop(self) -> None:
        for stop in reversed(self.stops):
            with contextlib.suppress(Exception):
                stop()


def helo(k: int) -> str:
    return f"relay{k + 1}.bench.localhost"


def spki_sha256(cert_path: Path) -> str:
    """TLSA 3 1 1's data: SHA-256 of the certificate's public key (SubjectPublicKeyInfo)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = x509.load_pem_x509_certificate(cert_path.read_bytes()).public_key()
    return hashlib.sha256(key.public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def policy_text(mx: str) -> str:
    return f"version: STSv1\nmode: enforce\nmx: {mx}\nmax_age: 86400\n"


def start_world(work: Path, relays: int) -> World:
    from submitd_devkit.certs import CertificateAuthority
    from submitd_devkit.dnssec import DnssecLab, Zone
    from submitd_devkit.mtasts import PolicyServer
    from submitd_devkit.ports import free_port
    from submitd_devkit.sink import Sink
    from submitd_devkit.stack import Stack

    world = World([], None, Counter())
    try:
        port = free_port()
        ca = CertificateAuthority(work / "ca", name="submitd bench CA")
        cert, key = ca.issue("mx", dns_names=[f"mx.{d}" for d in (*DOMAINS.values(), "danebad.signed.test",
                                                                   "stsbad.plain.test")])
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.load_cert_chain(cert, key)
        world.sink = Sink(port, host=MX, tls_context=server).start()
        world.stops.append(world.sink.stop)
        handle_ehlo = world.sink.handler.handle_EHLO

        async def counting_ehlo(server, session, envelope, hostname, responses):
            world.ehlos[hostname] += 1
            return await handle_ehlo(server, session, envelope, hostname, responses)

        world.sink.handler.handle_EHLO = counting_ehlo  # before any connection: aiosmtpd takes it per session
        tlsa = f"_{port}._tcp"
        signed = {
            "dane.signed.test": {"MX": ["10 mx.dane.signed.test."]},
            "mx.dane.signed.test": {"A": [MX]},
            f"{tlsa}.mx.dane.signed.test": {"TLSA": [f"3 1 1 {spki_sha256(cert)}"]},
            "danebad.signed.test": {"MX": ["10 mx.danebad.signed.test."]},  # the check: a TLSA mismatch waits
            "mx.danebad.signed.test": {"A": [MX]},
            f"{tlsa}.mx.danebad.signed.test": {"TLSA": ["3 1 1 " + "00" * 32]},
        }
        plain = {}
        for domain in ("base.plain.test", "plain.plain.test", "sts.plain.test", "stsbad.plain.test"):
            plain |= {domain: {"MX": [f"10 mx.{domain}."]}, f"mx.{domain}": {"A": [MX]}}
        for domain in ("sts.plain.test", "stsbad.plain.test"):  # stsbad: its policy names another MX host
            plain |= {f"_mta-sts.{domain}": {"TXT": ["v=STSv1; id=bench1"]}, f"mta-sts.{domain}": {"A": ["127.0.0.1"]}}
        lab = DnssecLab(work / "dns", zones={"signed.test": Zone(signed=True, records=signed),
                                             "plain.test": Zone(signed=False, records=plain)}, ttl=DNS_TTL).start()
        world.stops.append(lab.stop)
        https = PolicyServer(ca).start()
        world.stops.append(https.stop)
        https.serve("sts.plain.test", policy_text("mx.sts.plain.test"))
        https.serve("stsbad.plain.test", policy_text("mx.elsewhere.test"))
        relay = {
            "LOG_LEVEL": "WARNING", "NEXT_HOP_HOST": "", "MX_PORT": str(port),
            "DNS_NAMESERVERS": json.dumps([lab.resolver[0]]), "DNS_PORT": str(lab.resolver[1]), "DNS_DNSSEC": "true",
            "MX_INTERNAL_NETWORKS": json.dumps(["127.0.0.0/8"]), "MX_CA_FILE": str(ca.path),
            "MTA_STS": "true", "MTA_STS_CA_FILE": str(ca.path), "MTA_STS_PORT": str(https.port),
            "TLS_POLICY": json.dumps({"base.plain.test": "may"}),
            "CONNECT_TIMEOUT": "5", "RETRY_SCHEDULE": "[3600]", "ADMIN_TOKEN": ADMIN_TOKEN, "REWRITER_TARGET": "",
        }
        for k in range(relays):
            stack = Stack(work / f"stack{k + 1}", next_hop=("127.0.0.1", port),
                          env={"relay": relay | {"HELO_NAME": helo(k)}})
            world.stops.append(lambda stack=stack: stack.stop(at_once=True))
            stack.start(services=("relay",))
            world.stacks.append(stack)
        return world
    except BaseException:
        world.stop()
        raise


# -- load ---------------------------------------------------------------------------------------

def body(i: int, domain: str, size: int) -> bytes:
    head = (f"From: {SENDER}\r\nTo: bob@{domain}\r\nSubject: outbound bench {i}\r\n"
            f"Message-ID: <bench.{i}.{time.monotonic_ns()}@example.test>\r\n\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


async def queue(url: str, recipients: list[str], size: int) -> list[str]:
    """Each recipient's message queued as the frontend queues one; their queue ids."""
    import nats

    from submitd.v1 import common_pb2, queue_pb2
    from submitd_common import jetstream
    from submitd_common.ids import new_queue_id

    nc = await nats.connect(url)
    js = nc.jetstream()
    sem = asyncio.Semaphore(200)

    async def one(i: int, rcpt: str) -> str:
        env = common_pb2.Envelope(queue_id=new_queue_id(), return_path=SENDER, body_type="7BIT",
                                  recipients=[common_pb2.Recipient(address=rcpt)], authenticated_user=SENDER)
        data = body(i, rcpt.rpartition("@")[2], size)
        async with sem:
            q = queue_pb2.QueuedMessage(envelope=env, received_at_ms=int(time.time() * 1000), size=len(data))
            await jetstream.enqueue(js, q, data, msg_id=env.queue_id, inline_limit=256 << 10, timeout=30)
        return env.queue_id

    try:
        return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(recipients))))
    finally:
        await nc.close()


async def drained(url: str) -> bool:
    import nats

    from submitd_common import jetstream

    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().consumer_info(jetstream.STREAM, jetstream.RELAY_DURABLE)
        return info.num_pending == 0 and info.num_ack_pending == 0
    finally:
        await nc.close()


@dataclass
class Round:
    mode: str
    relay: int
    messages: int
    seconds: float = 0.0  # from SIGCONT to this relay's queue empty again
    cpu: float = 0.0  # the relay's CPU seconds
    ehlos: int = 0

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def cpu_ms(self) -> float:
        return self.cpu / self.messages * 1000


@contextlib.contextmanager
def profiled(pids: dict[str, int], directory: Path | None):
    """py-spy sampling each process (without pausing it) into DIRECTORY/<name>.txt, collapsed stacks."""
    if directory is None:
        yield
        return
    spy = Path(sys.executable).with_name("py-spy")
    procs = [subprocess.Popen([str(spy), "record", "--pid", str(pid), "--nonblocking", "--rate", "250",
                               "--format", "raw", "--output", str(directory / f"{name}.txt")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name, pid in pids.items()]
    try:
        yield
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        for proc in procs:
            proc.wait(30)


def run_round(world: World, modes: list[str], messages: int, size: int, timeout: float = 600,
              profile: Path | None = None, label: str = "") -> list[Round]:
    """Relay k delivers ``messages`` to DOMAINS[modes[k]], all relays at once (queued while they
    are stopped, then SIGCONT together): the same machine, at the same moments, for every mode."""
    handler = world.sink.handler
    handler.reset()
    world.ehlos.clear()
    results = [Round(mode, k, messages) for k, mode in enumerate(modes)]
    pids = [world.pid(k) for k in range(len(modes))]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        for k, mode in enumerate(modes):
            asyncio.run(queue(world.stacks[k].nats.url, [f"bob{i}@{DOMAINS[mode]}" for i in range(messages)], size))
    finally:
        cpu0 = [proc_cpu(pid) for pid in pids]
        t0 = time.perf_counter()
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    with profiled({f"{label}{mode}-relay{k + 1}": pid for k, (mode, pid) in enumerate(zip(modes, pids))}, profile):
        arrived, seen, left = Counter(), 0, set(range(len(modes)))
        relay_of = {DOMAINS[m]: k for k, m in enumerate(modes)}
        deadline = time.monotonic() + timeout
        while left:
            got = handler.messages[seen:]
            seen += len(got)
            for m in got:
                k = relay_of.get(m.rcpt_tos[0].rpartition("@")[2])
                if k is None:
                    raise RuntimeError(f"the next hop got a message for {m.rcpt_tos}")
                arrived[k] += 1
            for k in sorted(left):
                if arrived[k] >= messages and asyncio.run(drained(world.stacks[k].nats.url)):
                    # every delivery of this relay acknowledged: its work is done
                    results[k].seconds, results[k].cpu = time.perf_counter() - t0, proc_cpu(pids[k]) - cpu0[k]
                    left.discard(k)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{[modes[k] for k in left]}: not delivered in {timeout:.0f} s; "
                                   f"see {world.stacks[min(left)].log_path('relay')}")
            time.sleep(0.01)
    for k, r in enumerate(results):
        r.ehlos = world.ehlos[helo(k)]
    return results


def last_reply(world: World, queue_id: str) -> str:
    request = urllib.request.Request(
        f"http://127.0.0.1:{world.stacks[0].ports.relay_http}/api/v1/queue/messages/{queue_id}",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return json.load(r).get("last_reply") or ""
    except urllib.error.HTTPError:
        return ""


def check_policies_apply(world: World) -> list[str]:
    """A TLSA mismatch and an MX the MTA-STS policy does not name wait (451 4.7.5): the rounds
    measured the policies, not a relay that ignores them. Returns the replies seen."""
    expect = {"danebad.signed.test": "451 4.7.5 DANE", "stsbad.plain.test": "451 4.7.5 MTA-STS enforce"}
    ids = asyncio.run(queue(world.stacks[0].nats.url, [f"check@{d}" for d in expect], 2048))
    seen = []
    for (domain, prefix), qid in zip(expect.items(), ids):
        deadline = time.monotonic() + 30
        while not (reply := last_reply(world, qid)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no delivery attempt to {domain} in 30 s")
            time.sleep(0.1)
        if not reply.startswith(prefix):
            raise RuntimeError(f"{domain} should wait with {prefix!r}; the relay said {reply!r}")
        seen.append(f"{domain}: {reply[:110]}")
    if any("check@" in r for m in world.sink.handler.messages for r in m.rcpt_tos):
        raise RuntimeError("a message that failed its policy reached the next hop")
    return seen


# -- the policy work alone ----------------------------------------------------------------------

def relay_settings(stack):
    """The relay's Settings as the stack starts it (its environment, read the relay's way)."""
    from unittest import mock

    from submitd_relay.settings import Settings

    env = {k: v for k, v in stack.service_env("relay").items() if k.startswith("SUBMITD_RELAY_")}
    with mock.patch.dict(os.environ, env):
        return Settings()


async def planning_cost(settings, nats_url: str, calls: int = 3000, repeats: int = 5) -> dict[str, float]:
    """CPU microseconds per message of what the relay does for a message's destination before it
    takes a pooled connection: MX and address lookups, the TLS plan (TLSA lookup, MTA-STS policy),
    the pool key, all cached. The relay's own objects, built as its __main__ builds them, here
    against the same lab and NATS: the least of ``repeats`` runs, destinations rotated."""
    import nats

    from submitd_relay.delivery import NextHopPool
    from submitd_relay.outbound.mtasts import StsPolicies, open_bucket
    from submitd_relay.streams import sts_policies

    pool = NextHopPool(settings)
    nc = await nats.connect(nats_url)
    sts = StsPolicies(settings, await open_bucket(nc.jetstream(), sts_policies(settings)), pool.resolver.r,
                      reachable=pool.resolver.reachable)
    pool.planner.sts = sts

    async def one(domain: str) -> None:
        plan = await pool.planner.plan(domain, await pool.resolver.hosts(domain))
        for host, tls in plan.hosts:
            hash((host, tls.pool_key))

    try:
        for mode in MODES:
            await one(DOMAINS[mode])  # the lookups cached, as in the relay after its first message
        best = {m: float("inf") for m in MODES}
        for _ in range(repeats):
            for mode in MODES:
                t0 = time.process_time()
                for _ in range(calls):
                    await one(DOMAINS[mode])
                best[mode] = min(best[mode], (time.process_time() - t0) / calls * 1e6)
        return best
    finally:
        await pool.close()
        await sts.close()
        await nc.close()


# -- the run -------------------------------------------------------------------------------------

def per_message(rs: list[Round]) -> float:
    """CPU seconds per message over all of a mode's rounds."""
    return sum(r.cpu for r in rs) / sum(r.messages for r in rs)


def table(results: dict[str, list[Round]], rounds: int) -> None:
    base = per_message(results["base"])
    print(f"\n{'destination':42s} {'msg/s':>6s} {'relay CPU ms/msg':>17s} {'vs no checks':>13s} "
          f"{'paired, min..max':>17s} {'new conns/round':>16s}")
    for m in MODES:
        rs = results[m]
        per = per_message(rs)
        pairs = [r.cpu_ms / b.cpu_ms - 1 for r, b in zip(rs, results["base"])]
        rate = sum(r.messages for r in rs) / sum(r.seconds for r in rs)
        spread = f"{min(pairs) * 100:+.1f}..{max(pairs) * 100:+.1f}%" if m != "base" else ""
        print(f"{LABELS[m] + ', ' + DOMAINS[m]:42s} {rate:6.0f} {per * 1000:17.3f} {(per / base - 1) * 100:+12.1f}% "
              f"{spread:>17s} {sum(r.ehlos for r in rs) / 2 / rounds:16.1f}")


def bench_outbound(work: Path, messages: int = 2000, rounds: int | None = None, size: int = 2048,
                   warmup: int = 200, profile: Path | None = None) -> bool:
    """Prints the rounds, the table and the goal's verdict; True if it passed."""
    started = time.perf_counter()
    modes = list(MODES)
    rounds = rounds or 2 * len(modes)
    world = start_world(work, len(modes))
    try:
        print(f"\noutbound TLS: {len(modes)} relays (NATS and a relay each; DNS_DNSSEC at a validating unbound, "
              f"DNS TTLs {DNS_TTL} s; MTA-STS on) delivering side by side, each to one destination, to one next "
              f"hop with STARTTLS on {MX}; {messages} messages of {size // 1024} KB per relay and round, one "
              f"recipient each; {rounds} rounds after warm-up, destinations rotated over the relays; CPU from /proc")
        for i in range(len(modes)):  # every relay warmed for every destination
            run_round(world, modes[i:] + modes[:i], warmup, size)
        results: dict[str, list[Round]] = {m: [] for m in modes}
        for i in range(rounds):
            order = modes[i % len(modes):] + modes[:i % len(modes)]  # relay k gets order[k]
            got = run_round(world, order, messages, size, profile=profile, label=f"{i + 1}-")
            for r in got:
                results[r.mode].append(r)
            print(f"  round {i + 1}: " + "  ".join(f"{r.mode} {r.rate:4.0f} msg/s {r.cpu_ms:.3f} ms" for r in got)
                  + f"  (load {os.getloadavg()[0]:.1f})", flush=True)
        table(results, rounds)
        alone = asyncio.run(planning_cost(relay_settings(world.stacks[0]), world.stacks[0].nats.url))
        base_us = per_message(results["base"]) * 1e6
        print(f"\n  routing and TLS planning per message, the relay's code alone (cached; least of 5 x 3000 "
              f"calls), and the difference as a share of the baseline relay's {base_us / 1000:.2f} ms:\n    "
              + "   ".join(f"{m} {alone[m]:.0f} us" + (f" ({(alone[m] - alone['base']) / base_us * 100:+.1f}%)"
                                                     if m != "base" else "") for m in modes))
        for line in check_policies_apply(world):  # last: these two stay in the queue
            print(f"  check, waits as it should: {line}")
        base, passed = per_message(results["base"]), True
        for m in ("plain", "dane", "sts"):
            extra = per_message(results[m]) / base - 1
            ok = extra < GOAL
            passed &= ok
            print(f"  {'PASS' if ok else 'FAIL'}: {LABELS[m]} adds {extra * 100:+.1f}% relay CPU per message "
                  f"against opportunistic TLS without the checks (goal < {GOAL * 100:.0f}%)")
        print(f"  outbound bench took {time.perf_counter() - started:.0f} s")
    finally:
        world.stop()
    shutil.rmtree(work, ignore_errors=True)  # kept when something failed: the relays' logs are there
    return passed


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outbound-messages", type=int, default=2000, help="messages per relay and round")
    parser.add_argument("--outbound-rounds", type=int, help="rounds (default: two per destination)")
    parser.add_argument("--profile", type=Path,
                        help="py-spy each relay in each round: DIR/<round>-<destination>-relay<k>.txt")
    args = parser.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    ok = bench_outbound(Path(tempfile.mkdtemp(prefix="submitd-bench-outbound-")), args.outbound_messages,
                        args.outbound_rounds, profile=args.profile)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
