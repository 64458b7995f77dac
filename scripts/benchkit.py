"""The servers and loads `make bench` compares: a private Postfix, submitd's stack, a bare
aiosmtpd, Postfix's smtp-sink as every server's next hop and smtp-source as the load.

CPU is counted per server with a cgroup (cgroup v1 cpuacct, or v2 cpu.stat) that every process
of the server starts in, so the short-lived processes Postfix forks are counted too. Where no
cgroup can be made, the live processes of the server are summed instead (and the table says so).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import pwd
import shutil
import ssl
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from submitd_devkit.ports import free_port, wait_port

USER, PASSWORD = "bench@example.test", "bench password"
CLK = os.sysconf("SC_CLK_TCK")


# -- CPU accounting ----------------------------------------------------------------------

class CpuGroup:
    """The CPU time of every process started inside ``enter()``, and of their children."""

    V1 = Path("/sys/fs/cgroup/cpuacct")
    V2 = Path("/sys/fs/cgroup")

    def __init__(self, name: str) -> None:
        self.name = name
        self.path: Path | None = None
        self.pids: list[int] = []  # the fallback: top processes, summed with their descendants
        if (self.V1 / "cpuacct.usage").exists():
            base = self.V1
        elif "cpu" in (self.V2 / "cgroup.controllers").read_text().split() if (self.V2 / "cgroup.controllers").exists() else False:
            base = self.V2
        else:
            base = None
        if base is not None:
            path = base / f"submitd-bench-{os.getpid()}" / name
            try:
                path.mkdir(parents=True, exist_ok=True)
                (path / "cgroup.procs").read_text()
                self.path = path
            except OSError:
                self.path = None
        self.kind = "cgroup" if self.path else "process tree"

    @contextlib.contextmanager
    def enter(self):
        """Processes forked inside this block start (and their children stay) in the group."""
        if self.path is None:
            yield
            return
        (self.path / "cgroup.procs").write_text(str(os.getpid()))
        try:
            yield
        finally:
            (self.path.parent.parent / "cgroup.procs").write_text(str(os.getpid()))

    def seconds(self) -> float:
        if self.path is not None:
            usage = self.path / "cpuacct.usage"
            if usage.exists():
                return int(usage.read_text()) / 1e9
            for line in (self.path / "cpu.stat").read_text().splitlines():
                if line.startswith("usage_usec"):
                    return int(line.split()[1]) / 1e6
        return sum(tree_cpu(p) for p in self.pids)

    def remove(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.rmdir()
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()


def proc_cpu(pid: int, children: bool = False) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK


def tree_cpu(pid: int) -> float:
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += proc_cpu(p, children=True)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
    return total


# -- servers ------------------------------------------------------------------------------

def postfix_bin(name: str) -> str | None:
    for d in ("/usr/sbin", "/usr/bin"):
        if os.access(f"{d}/{name}", os.X_OK):
            return f"{d}/{name}"
    return shutil.which(name)


LARGE_LIMIT = 120_000_000  # message size limit of every server, for the large-message rounds


class SmtpSink:
    """Postfix's smtp-sink: accepts and discards, the next hop of every server here."""

    def __init__(self) -> None:
        self.port = free_port()
        binary = postfix_bin("smtp-sink")
        assert binary, "smtp-sink not found (Debian package postfix)"
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen([binary, *user, f"127.0.0.1:{self.port}", "256"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_port("127.0.0.1", self.port, 10):
            raise RuntimeError("smtp-sink did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


class Server:
    name: str
    port: int
    group: CpuGroup
    tls_port: int | None = None  # STARTTLS with AUTH, where the server offers it

    def drained(self) -> bool:
        return True

    def split(self) -> dict[str, float]:
        """CPU seconds by part (service), where the server has parts."""
        return {}

    def stop(self) -> None:
        raise NotImplementedError


class Postfix(Server):
    """A private Postfix: its own config, queue and data directories, relaying to a sink,
    durable queue with Postfix's default fsync. With ``milter``, OpenDKIM signs (RSA-2048)."""

    def __init__(self, name: str, work: Path, sink: SmtpSink, dkim_key: Path | None = None) -> None:
        self.name, self.work = name, work
        self.port = free_port()
        self.group = CpuGroup(name.replace(" ", "-").replace("+", ""))
        conf = work / "etc"
        conf.mkdir(parents=True, exist_ok=True)
        master = Path("/etc/postfix/master.cf").read_text().splitlines()
        out = []
        for line in master:
            fields = line.split()
            if fields and fields[0] == "smtp" and fields[1] == "inet":
                fields[0], fields[4] = f"127.0.0.1:{self.port}", "n"
                line = "  ".join(fields)
            elif len(fields) > 4 and not line.startswith((" ", "#")) and fields[4] == "y":
                fields[4] = "n"
                line = "  ".join(fields)
            out.append(line)
        (conf / "master.cf").write_text("\n".join(out) + "\n")
        data = work / "data"
        data.mkdir(exist_ok=True)
        pw = pwd.getpwnam("postfix")
        os.chown(data, pw.pw_uid, pw.pw_gid)
        data.chmod(0o700)
        (work / "queue").mkdir(exist_ok=True)
        main = {
            "compatibility_level": "3.6",
            "queue_directory": str(work / "queue"),
            "data_directory": str(data),
            "myhostname": "postfix.bench.localhost",
            "mydestination": "",
            "local_transport": "error:no local delivery",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relayhost": f"[127.0.0.1]:{sink.port}",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "default_process_limit": "100",
            "maillog_file": str(work / "maillog"),
            "maillog_file_prefixes": str(work),
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "alias_maps": "",
            "message_size_limit": str(LARGE_LIMIT),
            "alias_database": "",
        }
        self.milter = None
        if dkim_key is not None:
            self.milter = OpenDkim(work / "opendkim", dkim_key)
            main |= {"smtpd_milters": f"inet:127.0.0.1:{self.milter.port}", "milter_default_action": "tempfail"}
        (conf / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
        self.conf = conf
        with self.group.enter():
            if self.milter:
                self.milter.start()
            started = subprocess.run([postfix_bin("postfix"), "-c", str(conf), "start"], capture_output=True, text=True)
        if started.returncode != 0:
            raise RuntimeError(f"postfix did not start: {started.stderr.strip()[-1000:]}")
        if not wait_port("127.0.0.1", self.port, 20):
            raise RuntimeError(f"postfix did not start: {(work / 'maillog').read_text(errors='replace')[-2000:]}")
        pid = int((work / "queue" / "pid" / "master.pid").read_text().split()[0])
        self.group.pids = [pid] + ([self.milter.proc.pid] if self.milter else [])

    def drained(self) -> bool:
        queue = self.work / "queue"
        return not any(any(files) for d in ("maildrop", "incoming", "active", "deferred", "hold")
                       for _, _, files in os.walk(queue / d))

    def stop(self) -> None:
        subprocess.run([postfix_bin("postfix"), "-c", str(self.conf), "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self.milter:
            self.milter.stop()


class OpenDkim:
    def __init__(self, work: Path, key: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = work / "opendkim.conf"
        self.conf.write_text(
            f"Syslog no\nMode s\nDomain example.test\nSelector bench\nKeyFile {key}\n"
            f"Socket inet:{self.port}@127.0.0.1\nCanonicalization relaxed/relaxed\n"
            f"Background no\nPidFile {work}/pid\nUserID nobody\nRequireSafeKeys no\n"
        )
        os.chown(key, pwd.getpwnam("nobody").pw_uid, -1)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([postfix_bin("opendkim") or "opendkim", "-x", str(self.conf), "-f"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_port("127.0.0.1", self.port, 10):
            raise RuntimeError("opendkim did not start")

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait()


class Submitd(Server):
    """The whole stack (NATS, policy, rewriter, relay, frontend) as `make run` starts it, with
    logs at WARNING; trusted loopback for the plain rounds, STARTTLS + AUTH on the same port."""

    def __init__(self, name: str, work: Path, sink: SmtpSink, dkim: bool, env: dict | None = None) -> None:
        from submitd_devkit.stack import Stack, User

        self.name = name
        self.group = CpuGroup(name.replace(" ", "-").replace(",", ""))
        level = {"LOG_LEVEL": "WARNING"}
        envs = {s: dict(level) for s in ("frontend", "relay", "policy", "rewriter")}
        for s, extra in (env or {}).items():
            envs[s] |= extra
        self.stack = Stack(work, next_hop=("127.0.0.1", sink.port), users={USER: User(PASSWORD, [USER])},
                           trusted_networks=["127.0.0.0/8"], env=envs)
        if dkim:
            self.stack.make_dkim_keys("example.test")
            # Ed25519 only: the cost the goal names (RSA-2048 costs ~1 ms of CPU by itself).
            import yaml

            keys = yaml.safe_load(self.stack.dkim_keys_file.read_text())
            keys["keys"] = [k for k in keys["keys"] if "ed25519" in k["selector"]]
            self.stack.dkim_keys_file.write_text(yaml.safe_dump(keys))
        with self.group.enter():
            self.stack.start()
        self.port = self.tls_port = self.stack.ports.submission
        self.group.pids = list(self.pids().values())
        self._js = None

    def pids(self) -> dict[str, int]:
        out = {name: p.pid for name, p in self.stack.procs.items()}
        out["nats"] = self.stack.nats.proc.pid
        return out

    def split(self) -> dict[str, float]:
        return {name: proc_cpu(pid) for name, pid in self.pids().items()}

    def drained(self) -> bool:
        return asyncio.run(self._drained())

    async def _drained(self) -> bool:
        import nats

        from submitd_common import jetstream

        nc = await nats.connect(self.stack.nats.url)
        try:
            info = await nc.jetstream().consumer_info(jetstream.STREAM, "relay")
            return info.num_pending == 0 and info.num_ack_pending == 0
        finally:
            await nc.close()

    def stop(self) -> None:
        self.stack.stop()


BARE_SERVER = r"""
import asyncio, logging, ssl, sys, warnings
warnings.simplefilter("ignore")  # aiosmtpd deprecations
logging.getLogger("mail.log").setLevel(logging.ERROR)  # its login_data warning, once per AUTH
try:
    import uvloop; uvloop.install()
except ImportError:
    pass
from aiosmtpd.smtp import SMTP, AuthResult
class Discard:
    async def handle_DATA(self, server, session, envelope):
        return "250 2.0.0 Ok: discarded"
def accept_all(server, session, envelope, mechanism, auth_data):
    return AuthResult(success=True)
async def main(port, cert, key):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH); ctx.load_cert_chain(cert, key)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(Discard(), tls_context=ctx, authenticator=accept_all, auth_require_tls=True,
                     hostname="bare.localhost"), "127.0.0.1", port)
    async with server:
        await server.serve_forever()
asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
"""


class BareAiosmtpd(Server):
    """aiosmtpd with a handler that discards (uvloop, as submitd's frontend): the floor."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.name = "bare aiosmtpd"
        self.group = CpuGroup("bare")
        self.port = self.tls_port = free_port()
        with self.group.enter():
            self.proc = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(self.port), str(cert), str(key)])
        wait_port("127.0.0.1", self.port, 10)
        self.group.pids = [self.proc.pid]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


# -- loads ---------------------------------------------------------------------------------

class PeakMemory:
    """Peak RSS growth of processes over a load: the kernel's high-water mark (VmHWM), reset
    at the start (clear_refs 5), against the resident size just before."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.before = {name: _status_kb(pid, "VmRSS") for name, pid in pids.items()}
        for pid in pids.values():
            Path(f"/proc/{pid}/clear_refs").write_text("5")

    def growth_mb(self) -> dict[str, float]:
        return {name: (_status_kb(pid, "VmHWM") - self.before[name]) / 1024 for name, pid in self.pids.items()}


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


@dataclass
class Round:
    accepted: int = 0
    failed: int = 0
    accept_seconds: float = 0.0
    deliver_seconds: float = 0.0
    cpu: float = 0.0
    split: dict[str, float] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)


def smtp_source(port: int, messages: int, sessions: int, reuse: bool, size: int = 2048) -> int:
    binary = postfix_bin("smtp-source")
    assert binary, "smtp-source not found (Debian package postfix)"
    args = [binary, "-s", str(sessions), "-m", str(messages), "-l", str(size), "-f", USER, "-t", "bob@example.net"]
    if reuse:
        args.append("-d")
    proc = subprocess.run([*args, f"127.0.0.1:{port}"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {proc.stderr.strip()[-500:]}")
    return messages


def message(i: int, size: int = 2048) -> bytes:
    head = f"From: {USER}\r\nTo: bob@example.net\r\nSubject: bench {i}\r\n\r\n".encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def folded_message(header_size: int = 1 << 20) -> bytes:
    """A message whose header section is ``header_size`` octets, nearly all of it one Subject
    of continuation lines (issue 25: the rewriter parsed that in quadratic time, seconds)."""
    head = f"From: {USER}\r\nTo: bob@example.net\r\nSubject: folded\r\n".encode()
    return head + b" \r\n" * ((header_size - len(head)) // 3) + b"\r\nbody\r\n"


async def header_cpu(port: int, pid: int, calls: int = 10) -> float:
    """The rewriter's CPU (ms, from /proc) per message with a 1 MiB header of continuation lines,
    through its Rewrite stream in 256 KiB chunks, as the frontend sends a large message."""
    import grpc

    from submitd.v1 import common_pb2, rewriter_pb2, rewriter_pb2_grpc

    msg = folded_message()
    envelope = common_pb2.Envelope(queue_id="bench", return_path=USER)

    def requests():
        yield rewriter_pb2.RewriteRequest(envelope=envelope)
        for i in range(0, len(msg), 256 << 10):
            yield rewriter_pb2.RewriteRequest(chunk=msg[i : i + (256 << 10)])

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = rewriter_pb2_grpc.RewriterStub(ch)
        before = proc_cpu(pid)
        for _ in range(calls):
            parts = [r.WhichOneof("part") async for r in stub.Rewrite(requests())]
            assert "reject" not in parts and "prepend" in parts, parts
        return (proc_cpu(pid) - before) / calls * 1000


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readuntil(b"\r\n")
        if line[3:4] != b"-":
            return line


async def _transaction(reader, writer, i: int, result: Round) -> None:
    writer.write(f"MAIL FROM:<{USER}>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n".encode())
    replies = [await _reply(reader) for _ in range(3)]
    if not replies[2].startswith(b"354"):
        result.failed += 1
        writer.write(b"RSET\r\n")
        await _reply(reader)
        return
    writer.write(message(i) + b".\r\n")
    t0 = time.perf_counter()
    reply = await _reply(reader)
    result.latencies.append(time.perf_counter() - t0)
    if reply.startswith(b"250"):
        result.accepted += 1
    else:
        result.failed += 1


def client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def starttls_session(port: int, ctx: ssl.SSLContext, reader, writer) -> None:
    """The greeting, EHLO, STARTTLS and EHLO again, as a mail client begins."""
    await _reply(reader)
    writer.write(b"EHLO client.bench.localhost\r\n")
    await _reply(reader)
    writer.write(b"STARTTLS\r\n")
    await _reply(reader)
    await writer.start_tls(ctx, server_hostname="localhost")
    writer.write(b"EHLO client.bench.localhost\r\n")
    await _reply(reader)


async def _submission(port: int, i: int, ctx: ssl.SSLContext, result: Round) -> None:
    """What a mail client does to send one message: connect, STARTTLS, EHLO, AUTH, send, QUIT."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await starttls_session(port, ctx, reader, writer)
        writer.write(b"AUTH PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()) + b"\r\n")
        if not (await _reply(reader)).startswith(b"235"):
            result.failed += 1
            return
        await _transaction(reader, writer, i, result)
        writer.write(b"QUIT\r\n")
        await _reply(reader)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def auth_per_message(port: int, messages: int, concurrency: int, result: Round) -> None:
    async def run() -> None:
        ctx = client_tls()
        queue = iter(range(messages))

        async def worker() -> None:
            for i in queue:
                try:
                    await _submission(port, i, ctx, result)
                except (OSError, asyncio.IncompleteReadError):
                    result.failed += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    asyncio.run(run())


def paced(port: int, rate: float, seconds: float, sessions: int, result: Round) -> None:
    """Reused plain sessions offering ``rate`` messages a second in all, evenly spaced: the
    latency from end of data to the 250 when the server is not saturated."""

    async def run() -> None:
        interval = sessions / rate
        count = max(1, int(seconds * rate / sessions))

        async def one(k: int) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await _reply(reader)
            writer.write(b"EHLO client.bench.localhost\r\n")
            await _reply(reader)
            start = time.perf_counter() + k * interval / sessions
            for n in range(count):
                delay = start + n * interval - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await _transaction(reader, writer, n, result)
            writer.write(b"QUIT\r\n")
            await _reply(reader)
            writer.close()

        await asyncio.gather(*(one(k) for k in range(sessions)))

    asyncio.run(run())


def measure(server: Server, load) -> Round:
    """Run ``load(result)`` against ``server``; CPU counted until the server's queue is empty."""
    result = Round()
    cpu0, split0 = server.group.seconds(), server.split()
    t0 = time.perf_counter()
    load(result)
    result.accept_seconds = time.perf_counter() - t0
    deadline = time.monotonic() + 600
    while not server.drained():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name}: queue not empty after 600 s")
        time.sleep(0.05)
    result.deliver_seconds = time.perf_counter() - t0
    result.cpu = server.group.seconds() - cpu0
    result.split = {k: v - split0.get(k, 0.0) for k, v in server.split().items()}
    return result


def idle_cpu(servers: list[Server], seconds: float) -> dict[str, float]:
    """CPU milliseconds per second each server uses with no traffic at all."""
    before = {s.name: s.group.seconds() for s in servers}
    time.sleep(seconds)
    return {s.name: (s.group.seconds() - before[s.name]) / seconds * 1000 for s in servers}


def median_round(rounds: list[Round]) -> Round:
    """The round with the median accepted rate (its own CPU and split go with it)."""
    ordered = sorted(rounds, key=lambda r: r.accepted / r.accept_seconds if r.accept_seconds else 0)
    return ordered[len(ordered) // 2]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def stop_all(servers: list, sinks: list) -> None:
    for s in servers:
        with contextlib.suppress(Exception):
            s.stop()
        s.group.remove()
    for sink in sinks:
        sink.stop()
