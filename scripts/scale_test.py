"""`make scale-test`: what the chart promises about scale-out and quorum, shown with processes on
loopback under load, counting what clients see and what arrives at the next hop.

    --only quorum   three clustered nats-server processes, the queue and KV buckets at 3 replicas;
                    under steady submissions: kill -9 the queue stream's leader, later stop a second
                    node for a while, then two of three at once. Counts per phase: 250s, 4xx, the
                    longest run of 4xx, time to a new leader; at the end delivered, duplicates and
                    lost (must be 0). With two of three nodes gone no client may get a 250.

Every figure printed comes from this run; nothing is assumed."""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import nats

from submitd_common import jetstream
from submitd_devkit.sink import Sink
from submitd_devkit.ports import free_port, wait_port
from submitd_devkit.stack import Stack, User

USER, PASSWORD = "load@example.test", "scale test passphrase"
_TOKEN = re.compile(rb"Subject: scale ([0-9a-f]{32})")


@dataclass
class Outcome:
    at: float
    token: str
    code: int  # 250, a 4xx/5xx, or 0 for a connection that failed


@dataclass
class Load:
    """Clients submitting without pause (a session each, reconnecting after any failure)."""
    port: int
    clients: int
    per_session: int = 10  # messages per session, then QUIT and a new connection (as mail clients do)
    pause: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)
    errors: collections.Counter = field(default_factory=collections.Counter)  # the 0s: what failed
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> "Load":
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for t in self.threads:
            t.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _record(self, token: str, code: int) -> None:
        with self.lock:
            self.outcomes.append(Outcome(time.monotonic(), token, code))

    def _client(self) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        client = None
        sent = 0
        while not self.stop.is_set():
            token = uuid.uuid4().hex
            try:
                if client is None:
                    client = smtplib.SMTP("127.0.0.1", self.port, timeout=30)
                    client.starttls(context=context)
                    client.login(USER, PASSWORD)
                    sent = 0
                msg = f"From: {USER}\r\nTo: sink@example.net\r\nSubject: scale {token}\r\n\r\nload\r\n".encode()
                code, _ = client.mail(USER)
                if code == 250:
                    code, _ = client.rcpt("sink@example.net")
                if code == 250:
                    code, _ = client.data(msg)
                self._record(token, code)
                sent += 1
                if code != 250:
                    client = _close(client)
                    time.sleep(0.1)
                elif sent >= self.per_session:
                    try:
                        client.quit()
                    except (OSError, smtplib.SMTPException):
                        pass
                    client = _close(client)
            except smtplib.SMTPResponseException as e:
                self._record(token, e.smtp_code)
                client = _close(client)
                time.sleep(0.2)
            except (OSError, smtplib.SMTPException) as e:
                self._record(token, 0)
                with self.lock:
                    self.errors[f"{type(e).__name__}: {e}"[:80]] += 1
                client = _close(client)
                time.sleep(0.2)
            if self.pause:
                time.sleep(self.pause)
        _close(client)

    def between(self, start: float, end: float) -> list[Outcome]:
        with self.lock:
            return [o for o in self.outcomes if start <= o.at < end]


def _close(client):
    if client is not None:
        try:
            client.close()
        except OSError:
            pass
    return None


def delivered(load: Load, sink: Sink, timeout: float) -> tuple[set[str], collections.Counter, set[str], int]:
    """Wait until every message answered 250 reached the next hop (or ``timeout``): (answered
    250, arrivals per message, lost, duplicates)."""
    accepted = {o.token for o in load.outcomes if o.code == 250}
    deadline = time.monotonic() + timeout
    while True:
        arrived = collections.Counter(
            m.group(1).decode() for msg in list(sink.handler.messages) if (m := _TOKEN.search(msg.data)))
        if accepted <= set(arrived) or time.monotonic() > deadline:
            break
        time.sleep(1)
    return accepted, arrived, accepted - set(arrived), sum(c - 1 for c in arrived.values() if c > 1)


def longest_failure_run(outcomes: list[Outcome]) -> float:
    """Seconds from the first failure to the next 250, longest such run."""
    longest, first_fail = 0.0, None
    for o in sorted(outcomes, key=lambda o: o.at):
        if o.code != 250 and first_fail is None:
            first_fail = o.at
        elif o.code == 250 and first_fail is not None:
            longest = max(longest, o.at - first_fail)
            first_fail = None
    if first_fail is not None and outcomes:
        longest = max(longest, max(o.at for o in outcomes) - first_fail)
    return longest


async def stream_leader(urls: list[str]) -> str | None:
    try:
        nc = await nats.connect(servers=urls, connect_timeout=1, max_reconnect_attempts=0, allow_reconnect=False)
    except Exception:
        return None
    try:
        info = await nc.jetstream(timeout=1).stream_info(jetstream.STREAM)
        return info.cluster.leader if info.cluster else None
    except Exception:
        return None
    finally:
        await nc.close()


def leader(stack: Stack, exclude: set[str] = frozenset()) -> str | None:
    urls = [u for n, u in zip(stack.nats.nodes, stack.nats.urls()) if n.name not in exclude and n.proc]
    return asyncio.run(stream_leader(urls)) if urls else None


def wait_leader(stack: Stack, gone: set[str], timeout: float = 30) -> tuple[str | None, float]:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        found = leader(stack, gone)
        if found and found not in gone:
            return found, time.monotonic() - started
        time.sleep(0.1)
    return None, timeout


def quorum(work: Path, clients: int) -> int:
    sink = Sink().start()
    stack = Stack(
        work / "quorum", next_hop=("127.0.0.1", sink.port), nats_nodes=3,
        users={USER: User(PASSWORD, [USER])},
        env={"frontend": {"MAX_CONNECTIONS_PER_CLIENT": "200"},
             "policy": {"REPLICAS": "3"}, "relay": {"REPLICAS": "3", "FETCH_WAIT": "1"}},
    )
    for name in ("frontend", "policy", "rewriter", "relay"):
        stack.extra_env.setdefault(name, {})["LOG_LEVEL"] = "WARNING"
    nodes = {n.name: n for n in stack.nats.nodes}
    marks: list[list] = []  # [phase name, start, note]: a phase lasts until the next one starts
    try:
        stack.start()
        load = Load(stack.ports.submission, clients).start()
        t0 = time.monotonic()

        def mark(name: str, note: str = "") -> list:
            marks.append([name, time.monotonic(), note])
            return marks[-1]

        def until(started: float, seconds: float) -> None:
            time.sleep(max(0.0, started + seconds - time.monotonic()))

        m = mark("all three nodes up")
        until(m[1], 8)
        first = leader(stack)
        m = mark(f"kill -9 of the queue's leader ({first})")
        nodes[first].stop(signal.SIGKILL)
        new_leader, took = wait_leader(stack, {first})
        m[2] = f"new leader {new_leader} seen after {took:.1f} s"
        until(m[1], 15)
        m = mark(f"{first} started again")
        nodes[first].start()
        until(m[1], 10)
        second = leader(stack) or new_leader
        m = mark(f"the leader {second} stopped (SIGTERM) for a while")
        nodes[second].stop()
        after, took2 = wait_leader(stack, {second})
        m[2] = f"new leader {after} seen after {took2:.1f} s"
        until(m[1], 15)
        m = mark(f"{second} started again")
        nodes[second].start()
        until(m[1], 10)
        current = leader(stack) or "n0"
        two = [current] + [n for n in nodes if n != current][:1]
        m = mark(f"two of three gone (kill -9 {', '.join(two)})")
        for name in two:
            nodes[name].stop(signal.SIGKILL)
        until(m[1], 15)
        m = mark("both started again")
        for name in two:
            nodes[name].start()
        recovered, took3 = wait_leader(stack, set())
        m[2] = f"leader {recovered} seen after {took3:.1f} s"
        until(m[1], 15)
        mark("end")
        load.finish()
        accepted, arrived, lost, duplicates = delivered(load, sink, 180)
        strays = set(arrived) - accepted  # delivered though the client saw no 250

        print(f"\nquorum: {clients} clients, 3 nats-server nodes, queue and KV buckets at 3 replicas "
              f"({time.monotonic() - t0:.0f} s)\n")
        print("| phase | seconds | 250 | 4xx | other | longest run without a 250 (s) | note |")
        print("|---|---|---|---|---|---|---|")
        for (name, start, note), (_, end, _) in zip(marks, marks[1:]):
            seen = load.between(start, end)
            ok = sum(o.code == 250 for o in seen)
            temp = sum(400 <= o.code < 500 for o in seen)
            other = len(seen) - ok - temp
            print(f"| {name} | {end - start:.1f} | {ok} | {temp} | {other} | {longest_failure_run(seen):.1f} | {note} |")
        by_token = {o.token: o for o in load.outcomes}
        print(f"\nanswered 250: {len(accepted)}; delivered: {len(set(arrived) & accepted)}; "
              f"duplicates at the next hop: {duplicates}; lost: {len(lost)}")
        if strays:
            seen_as = collections.Counter(by_token[t].code for t in strays if t in by_token)
            print(f"delivered though the client saw no 250 (it will send again: a duplicate for the "
                  f"recipient): {len(strays)}, replies seen {dict(seen_as)}, at "
                  + ", ".join(f"{by_token[t].at - t0:.1f} s" for t in sorted(strays, key=lambda t: by_token[t].at)))
        (gone,) = [(s_, e_) for (n_, s_, _), (_, e_, _) in zip(marks, marks[1:]) if n_.startswith("two of three")]
        during = load.between(gone[0] + 2, gone[1])  # (a publish acked as the nodes died may still be a 250)
        ok_during = sum(o.code == 250 for o in during)
        codes = collections.Counter(o.code for o in during)
        print(f"two of three nodes gone (from 2 s after): {ok_during} answered 250 (must be 0); replies {dict(codes)}")
        return 0 if not lost and ok_during == 0 else 1
    finally:
        stack.stop()
        sink.stop()


class Pool:
    """Extra service processes beside a Stack's (more frontends or relays), each with its own
    ports, the way more replicas of a Deployment would run; stopped as the kubelet stops a pod."""

    def __init__(self, stack: Stack, service: str, overrides=None) -> None:
        self.stack, self.service = stack, service
        self.overrides = overrides or {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, dict[str, int]] = {}

    def reserve(self, name: str) -> dict[str, int]:
        self.ports[name] = {"smtp": free_port(), "smtps": free_port(), "internal": free_port(), "http": free_port()}
        return self.ports[name]

    def start(self, name: str) -> None:
        ports = self.ports.get(name) or self.reserve(name)
        prefix = f"SUBMITD_{self.service.upper()}_"
        env = self.stack.service_env(self.service)
        env[prefix + "HTTP_LISTEN"] = f"127.0.0.1:{ports['http']}"
        if self.service == "frontend":
            env[prefix + "SUBMISSION_LISTEN"] = f"127.0.0.1:{ports['smtp']}"
            env[prefix + "SUBMISSIONS_LISTEN"] = f"127.0.0.1:{ports['smtps']}"
            env[prefix + "INTERNAL_SUBMISSION_LISTEN"] = f"127.0.0.1:{ports['internal']}"
        env.update({prefix + k: v for k, v in self.overrides.items()})
        env["OTEL_SERVICE_NAME"] = self.service
        with open(self.stack.root / "log" / f"{self.service}-{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen([sys.executable, "-m", f"submitd_{self.service}"], env=env,
                                                stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 30
        while not self.ready(name):
            if time.monotonic() > deadline or self.procs[name].poll() is not None:
                raise RuntimeError(f"{self.service} {name} did not become ready")
            time.sleep(0.1)

    def ready(self, name: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[name]['http']}/readyz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def metric(self, name: str, metric: str) -> float:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[name]['http']}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return 0.0
        m = re.search(rf"^{re.escape(metric)} ([0-9.e+-]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def stop(self, name: str, grace: float) -> tuple[int | None, float]:
        """SIGTERM, SIGKILL after ``grace`` (terminationGracePeriodSeconds): (exit code, seconds)."""
        proc = self.procs.pop(name)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        return code, time.monotonic() - started

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name, 20)


# HAProxy connects to the frontends from 127.0.0.1: the one peer whose PROXY header they believe
# (clients here come from 127.0.0.5 and up).
BALANCER = '["127.0.0.1/32"]'
UNTRUSTED_PEERS = 'submitd_smtp_proxy_refused_total{reason="untrusted_peer"}'


class HAProxy:
    """Debian's HAProxy in TCP mode: round robin over the frontends' submission ports with the
    PROXY protocol v2, each server up only while its /readyz answers 200 (as a Service's
    endpoints follow readiness), and a per-client connection limit in a stick table."""

    def __init__(self, work: Path, servers: dict[str, dict[str, int]], per_client: int) -> None:
        self.port = free_port()
        self.stats = work / "haproxy.sock"
        lines = [
            "global", f"  stats socket {self.stats} mode 600 level admin", "  maxconn 4000",
            "defaults", "  mode tcp", "  timeout connect 5s", "  timeout client 10m", "  timeout server 10m",
            "  timeout check 2s",
            "frontend submission", f"  bind 127.0.0.1:{self.port}",
            "  stick-table type ip size 100k expire 60s store conn_cur",
            "  tcp-request connection track-sc0 src",
            f"  tcp-request connection reject if {{ sc0_conn_cur gt {per_client} }}",
            "  default_backend frontends",
            "backend frontends", "  balance roundrobin", "  option httpchk GET /readyz",
            "  http-check expect status 200",
        ]
        for name, ports in servers.items():
            lines.append(f"  server {name} 127.0.0.1:{ports['smtp']} send-proxy-v2 check port {ports['http']} "
                         "inter 500ms fall 1 rise 2")
        self.conf = work / "haproxy.cfg"
        self.conf.write_text("\n".join(lines) + "\n")
        self.log = open(work / "haproxy.log", "ab")
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(self.conf)], stdout=self.log, stderr=self.log,
                                     start_new_session=True)
        if not wait_port("127.0.0.1", self.port, 10):
            raise RuntimeError(f"haproxy did not start; see {work / 'haproxy.log'}")

    def command(self, text: str) -> str:
        import socket

        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.stats))
            sock.sendall(text.encode() + b"\n")
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
        return out.decode()

    def up(self) -> set[str]:
        """The servers HAProxy sends new connections to now."""
        rows = self.command("show stat").splitlines()
        header = rows[0].lstrip("# ").split(",")
        out = set()
        for row in rows[1:]:
            cells = dict(zip(header, row.split(",")))
            if cells.get("pxname") == "frontends" and cells.get("svname") not in ("BACKEND", "FRONTEND", None):
                if cells.get("status", "").startswith("UP"):
                    out.add(cells["svname"])
        return out

    def wait_up(self, names: set[str], timeout: float = 20) -> float:
        started = time.monotonic()
        while self.up() != names:
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"haproxy sends to {self.up()}, not {names}")
            time.sleep(0.1)
        return time.monotonic() - started

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


def smtp_from(address: str, port: int) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(address, 0))
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client.starttls(context=context)
    client.ehlo()
    return client


def balancer(work: Path) -> int:
    """Three frontends behind HAProxy with PROXY v2: the policy sees each client's address."""
    sink = Sink().start()
    stack = Stack(
        work / "balancer", next_hop=("127.0.0.1", sink.port), users={USER: User(PASSWORD, [USER])},
        env={"policy": {"AUTH_FAILURE_DELAY": "0.1", "AUTH_FAILURES_PER_CLIENT": "6",
                        "AUTH_FAILURES_PER_LOGIN": "100", "LOG_LEVEL": "WARNING"},
             "relay": {"FETCH_WAIT": "1", "LOG_LEVEL": "WARNING"}, "rewriter": {"LOG_LEVEL": "WARNING"}},
    )
    frontends = Pool(stack, "frontend", {"PROXY_PROTOCOL": "true", "PROXY_TRUSTED_NETWORKS": BALANCER,
                                         "MAX_CONNECTIONS_PER_CLIENT": "2", "LOG_LEVEL": "WARNING"})
    names = ["f1", "f2", "f3"]
    lb = None
    failures = []

    def check(ok: bool, text: str) -> None:
        print(("  ok    " if ok else "  FAIL  ") + text)
        if not ok:
            failures.append(text)

    try:
        stack.start(services=("policy", "rewriter", "relay"))
        for name in names:
            frontends.start(name)
        lb = HAProxy(work, frontends.ports, per_client=4)
        lb.wait_up(set(names))
        print("\nload balancer: HAProxy (TCP, PROXY v2, round robin, health on /readyz) in front of 3 frontends")
        before = {n: frontends.metric(n, "submitd_smtp_sessions_total") for n in names}

        # AUTH failures from one client address add up across the three frontends.
        replies = []
        for i in range(7):
            with smtp_from("127.0.0.5", lb.port) as client:
                code, text = client.docmd("AUTH", "PLAIN " + base64.b64encode(
                    f"\0nobody{i}@example.test\0wrong".encode()).decode())
                replies.append(code)
        spread = {n: frontends.metric(n, "submitd_smtp_sessions_total") - before[n] for n in names}
        check(all(v >= 2 for v in spread.values()), f"7 sessions from 127.0.0.5 spread over the frontends: {spread}")
        check(replies[:6] == [535] * 6 and replies[6] == 421,
              f"AUTH failures counted per client across frontends: replies {replies} (limit 6, then 421)")
        codes = []
        for _ in range(3):  # one session on each frontend, round robin
            with smtp_from("127.0.0.5", lb.port) as client:
                code, _ = client.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode())
                codes.append(code)
        check(codes == [421] * 3, f"127.0.0.5 is locked out on every frontend, even with the right password: {codes}")
        with smtp_from("127.0.0.6", lb.port) as client:
            client.login(USER, PASSWORD)
            code, text = client.mail(USER)
        check(code == 250, "127.0.0.6 (another client behind the same balancer) logs in and sends: "
              "the policy sees each client's own address, not the balancer's")

        # Connections per client: the balancer's stick table holds the limit across frontends
        # (each frontend's own MAX_CONNECTIONS_PER_CLIENT=2 holds per replica only).
        held = []
        refused_at = None
        for i in range(6):
            try:
                c = smtplib.SMTP("127.0.0.1", lb.port, timeout=5, source_address=("127.0.0.7", 0))
                held.append(c)
            except (OSError, smtplib.SMTPException):
                refused_at = i + 1
                break
        check(refused_at == 5, f"connection {refused_at} from 127.0.0.7 refused by the balancer (limit 4 across "
              "the three frontends)")
        for c in held:
            _close(c)

        # A client's own PROXY header, after the balancer's, is a command like any other line.
        client = smtplib.SMTP("127.0.0.1", lb.port, timeout=10, source_address=("127.0.0.8", 0))
        code, text = client.docmd("PROXY TCP4 203.0.113.9 127.0.0.1 4444 587")
        client.close()
        check(500 <= code < 600, f"a PROXY line sent by the client through the balancer: {code} {text.decode()}")

        # Past the balancer, straight to a frontend's PROXY port: not a listed balancer, so the
        # connection is closed before its header is read, and counted.
        refused = frontends.metric("f1", UNTRUSTED_PEERS)
        direct = socket.create_connection(("127.0.0.1", frontends.ports["f1"]["smtp"]), timeout=5,
                                          source_address=("127.0.0.8", 0))
        try:
            direct.sendall(b"PROXY TCP4 203.0.113.9 127.0.0.1 4444 587\r\n")
            answer = direct.recv(100)
        except OSError:
            answer = b""
        direct.close()
        counted = frontends.metric("f1", UNTRUSTED_PEERS) - refused
        check(answer == b"" and counted == 1, f"a PROXY header sent to a frontend directly from 127.0.0.8: closed "
              f"without a greeting ({answer!r}), counted {counted:g}")
        return 1 if failures else 0
    finally:
        if lb:
            lb.stop()
        frontends.stop_all()
        stack.stop()
        sink.stop()


def chart_defaults() -> dict:
    """The chart's shutdown settings: the grace period, the drain, the frontend's drain delay."""
    import yaml

    values = yaml.safe_load((Path(__file__).resolve().parent.parent / "helm/submitd/values.yaml").read_text())
    return {**values["default"], "frontendDrainDelay": values["services"]["frontend"]["env"]["DRAIN_DELAY"]}


def desired(current: int, metric_per_pod: float, target: float, low: int, high: int) -> int:
    """The HPA's rule: ceil(current x metric / target), within min and max."""
    if current == 0:
        return low
    return max(low, min(high, -(-int(current * metric_per_pod * 1000) // int(target * 1000))))


@contextlib.contextmanager
def replicas(root: Path, env: dict, frontend_env: dict):
    """policy and rewriter from a Stack; frontends (f1-f3, ports reserved, none started) and
    relays as Pools; HAProxy in front of the frontends' slots (a server is up while it is ready)."""
    sink = Sink().start()
    quiet = {"LOG_LEVEL": os.environ.get("SCALE_LOG_LEVEL", "WARNING"), **env}
    stack = Stack(root, next_hop=("127.0.0.1", sink.port), users={USER: User(PASSWORD, [USER])},
                  env={"policy": quiet, "rewriter": quiet})
    frontends = Pool(stack, "frontend", {"PROXY_PROTOCOL": "true", "PROXY_TRUSTED_NETWORKS": BALANCER,
                                         "MAX_CONNECTIONS_PER_CLIENT": "200", **quiet, **frontend_env})
    relays = Pool(stack, "relay", {"FETCH_WAIT": "1", **quiet})
    for name in ("f1", "f2", "f3"):
        frontends.reserve(name)
    lb = None
    try:
        stack.start(services=("policy", "rewriter"))
        # The relays' provisioning (the queue, its consumer, their buckets), as each relay pod's init
        # container runs it: the frontends may start before any relay here.
        assert stack.provision("relay") == {"relay": 0}, stack.log_tail("relay")
        lb = HAProxy(root, frontends.ports, per_client=1000)
        yield stack, sink, frontends, relays, lb
    finally:
        if lb:
            lb.stop()
        frontends.stop_all()
        relays.stop_all()
        stack.stop()
        sink.stop()


def scaling(work: Path, clients: int) -> int:
    """20 clients submit without pause through HAProxy while a controller, reading the frontends'
    and relays' /metrics as an HPA reads its metrics, scales frontends 1 -> 3 -> 1 and relays
    1 -> 4 -> 1 (its target moved, as an operator would move the HPA's, to drive it)."""
    chart = chart_defaults()
    grace, drain = chart["terminationGracePeriodSeconds"], chart["drainSeconds"]
    delay = os.environ.get("SCALE_DRAIN_DELAY", chart["frontendDrainDelay"])
    events: list[tuple[float, str]] = []
    scale_downs: list[dict] = []
    with replicas(work / "scaling", {"DRAIN_SECONDS": str(drain)}, {"DRAIN_DELAY": delay}) as (stack, sink, frontends, relays, lb):
        frontends.start("f1")
        relays.start("r1")
        lb.wait_up({"f1"})
        load = Load(lb.port, clients, per_session=1).start()
        t0 = time.monotonic()
        print(f"\nscaling under load: {clients} clients through HAProxy, a new session per message; "
              f"terminationGracePeriodSeconds {grace}, drainSeconds {drain}, frontend DRAIN_DELAY {delay} s")

        def observe() -> tuple[float, float]:
            running = list(frontends.procs)
            sessions = sum(frontends.metric(n, "submitd_smtp_sessions_active") for n in running) / max(1, len(running))
            pending = sum(relays.metric(n, "submitd_consumer_ack_pending") for n in relays.procs) / max(1, len(relays.procs))
            return sessions, pending

        def scale_to(pool: Pool, want: int, prefix: str) -> None:
            have = sorted(pool.procs)
            if want > len(have):
                for i in range(1, 9):
                    name = f"{prefix}{i}"
                    if len(pool.procs) >= want:
                        break
                    if name not in pool.procs:
                        pool.start(name)
                        events.append((time.monotonic() - t0, f"{pool.service} {name} started"))
                if pool is frontends:
                    took = lb.wait_up(set(pool.procs))
                    events.append((time.monotonic() - t0, f"balancer sends to {sorted(pool.procs)} ({took:.1f} s after ready)"))
                return
            # As the HPA's scale-down deletes pods: all at once, each with its grace period.
            stopping = []
            for name in sorted(have, reverse=True)[: len(have) - want]:
                outcome = {"name": name, "service": pool.service, "started": time.monotonic()}
                thread = threading.Thread(
                    target=lambda n=name, o=outcome: o.update(zip(("exit", "seconds"), pool.stop(n, grace))))
                thread.start()
                stopping.append((outcome, thread))
            if pool is frontends:
                while any(o["name"] in lb.up() or "out_of_balancer" not in o for o, _ in stopping):
                    up = lb.up()
                    for o, _ in stopping:
                        if o["name"] not in up and "out_of_balancer" not in o:
                            o["out_of_balancer"] = time.monotonic() - o["started"]
                    time.sleep(0.05)
            for outcome, thread in stopping:
                thread.join()
                outcome["window"] = (outcome["started"], time.monotonic())
                scale_downs.append(outcome)
                events.append((time.monotonic() - t0, f"{pool.service} {outcome['name']} stopped: exit "
                                                      f"{outcome['exit']} after {outcome['seconds']:.1f} s"))

        # (target sessions per frontend, target unacknowledged messages per relay); as the HPA's
        # scale-down stabilization window would, the controller only adds until the last phase.
        schedule = [("load arrives", 12, 8.0, 50.0), ("relay lag", 20, 8.0, 0.5), ("load falls", 25, 40.0, 50.0)]
        for phase, seconds, session_target, pending_target in schedule:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                sessions, pending = observe()
                want_f = desired(len(frontends.procs), sessions, session_target, 1, 3)
                want_r = desired(len(relays.procs), max(pending, 0.01), pending_target, 1, 4)
                if phase == "relay lag":
                    want_r = 4 if pending > 0 else want_r  # any lag: up to the maximum, as KEDA's lag scaler would
                if phase != "load falls":
                    want_f, want_r = max(want_f, len(frontends.procs)), max(want_r, len(relays.procs))
                if want_f != len(frontends.procs):
                    events.append((time.monotonic() - t0, f"{phase}: {sessions:.1f} sessions per frontend, target "
                                                          f"{session_target:g} -> {want_f} frontends"))
                    scale_to(frontends, want_f, "f")
                if want_r != len(relays.procs):
                    events.append((time.monotonic() - t0, f"{phase}: {pending:.1f} unacknowledged per relay, target "
                                                          f"{pending_target:g} -> {want_r} relays"))
                    scale_to(relays, want_r, "r")
                time.sleep(1)
        load.finish()
        accepted, arrived, lost, duplicates = delivered(load, sink, 120)
        for at, text in events:
            print(f"  {at:6.1f} s  {text}")
        print("\n| scale-down | exit | seconds to exit | out of the balancer after (s) | client-visible replies meanwhile |")
        print("|---|---|---|---|---|")
        for d in scale_downs:
            seen = load.between(*d["window"])
            errors = collections.Counter(o.code for o in seen if o.code != 250)
            print(f"| {d['service']} {d['name']} | {d['exit']} | {d['seconds']:.1f} | "
                  f"{d.get('out_of_balancer', float('nan')):.1f} | {sum(errors.values())} not 250 {dict(errors)} "
                  f"of {len(seen)} |")
        if load.errors:
            print("connection-level failures (0 above): " + "; ".join(f"{n} x {t}" for t, n in load.errors.most_common(5)))
        total = collections.Counter(o.code for o in load.outcomes)
        print(f"\nreplies over the run: {dict(total)}; answered 250: {len(accepted)}; delivered: "
              f"{len(set(arrived) & accepted)}; duplicates: {duplicates}; lost: {len(lost)}")
        return 1 if lost else 0


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU of these processes so far (from /proc; exited ones count nothing)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def throughput(work: Path, clients: int, seconds: float) -> int:
    """Accepted messages per second with 1, 2 and 3 frontends and as many relays, behind
    HAProxy, each message a new session with STARTTLS and AUTH; CPU per message of every
    server process (the load generator's own CPU shown apart: it shares the two cores)."""
    rows = []
    with replicas(work / "throughput", {}, {}) as (stack, sink, frontends, relays, lb):
        for n in (1, 2, 3):
            for i in range(1, n + 1):
                if f"f{i}" not in frontends.procs:
                    frontends.start(f"f{i}")
                if f"r{i}" not in relays.procs:
                    relays.start(f"r{i}")
            lb.wait_up({f"f{i}" for i in range(1, n + 1)})
            load = Load(lb.port, clients, per_session=1).start()
            time.sleep(3)  # warm up
            pids = {"frontends": [p.pid for p in frontends.procs.values()], "relays": [p.pid for p in relays.procs.values()],
                    "policy": [stack.procs["policy"].pid], "rewriter": [stack.procs["rewriter"].pid],
                    "nats": [stack.nats.proc.pid], "haproxy": [lb.proc.pid], "load": [os.getpid()]}
            before = {k: cpu_seconds(v) for k, v in pids.items()}
            start = time.monotonic()
            time.sleep(seconds)
            took = time.monotonic() - start
            after = {k: cpu_seconds(v) for k, v in pids.items()}
            seen = load.between(start, start + took)
            load.finish()
            ok = sum(o.code == 250 for o in seen)
            cpu = {k: after[k] - before[k] for k in pids}
            server = sum(v for k, v in cpu.items() if k != "load")
            rows.append((n, ok / took, 1000 * server / max(ok, 1), {k: 1000 * v / max(ok, 1) for k, v in cpu.items()},
                         len(seen) - ok))
        print(f"\nthroughput: {clients} clients through HAProxy, a new session (STARTTLS, AUTH) per message, "
              f"{seconds:g} s per row, {os.cpu_count()} cores\n")
        print("| frontends and relays | accepted msg/s | server CPU ms/msg | frontends | relays | policy | rewriter | NATS | HAProxy | load generator (ms/msg) | not 250 |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for n, rate, per, split, bad in rows:
            print(f"| {n} | {rate:.0f} | {per:.2f} | {split['frontends']:.2f} | {split['relays']:.2f} | {split['policy']:.2f} | "
                  f"{split['rewriter']:.2f} | {split['nats']:.2f} | {split['haproxy']:.2f} | {split['load']:.2f} | {bad} |")
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["quorum", "balancer", "scaling", "throughput"], default=None)
    parser.add_argument("--seconds", type=float, default=20, help="measured seconds per throughput row")
    parser.add_argument("--clients", type=int, default=int(os.environ.get("SCALE_CLIENTS", "8")),
                        help="clients of the quorum run")
    parser.add_argument("--scale-clients", type=int, default=20, help="clients of the scaling run")
    args = parser.parse_args()
    keep = os.environ.get("SCALE_KEEP")  # a directory to keep the logs in
    with (contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory(prefix="submitd-scale-")) as tmp:
        failed = 0
        if args.only in (None, "quorum"):
            failed |= quorum(Path(tmp), args.clients)
        if args.only in (None, "balancer"):
            failed |= balancer(Path(tmp))
        if args.only in (None, "scaling"):
            failed |= scaling(Path(tmp), args.scale_clients)
        if args.only in (None, "throughput"):
            failed |= throughput(Path(tmp), args.scale_clients, args.seconds)
    print("\nscale test " + ("FAILED" if failed else "passed"))
    return failed


if __name__ == "__main__":
    sys.exit(main())
