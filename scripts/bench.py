"""`make bench`: submitd's whole pipeline beside a bare aiosmtpd server, in the same run.

For each mode (trusted-network plain SMTP; STARTTLS + AUTH PLAIN) and each server, N messages of
2 KB are sent over S concurrent reused sessions. Printed per run: messages/s accepted, messages/s
delivered (the relay acknowledged the next hop's 250), p50/p99 from end of data to the 250, and
CPU seconds per 1,000 messages for every process. Where Postfix's smtp-source is found (on PATH or
unpacked under var/tools), a plain-SMTP round with it is added, so the load generator is C code.

    make bench BENCH_ARGS="--messages 2000 --sessions 20"
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import resource
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from submitd_common.dev.ports import free_port, wait_port
from submitd_common.dev.stack import Stack, User

ROOT = Path(__file__).resolve().parent.parent
USER, PASSWORD = "bench@example.test", "bench password"
CLK = os.sysconf("SC_CLK_TCK")

BARE_SERVER = r"""
import asyncio, ssl, sys
from aiosmtpd.smtp import SMTP, AuthResult
class Discard:
    async def handle_DATA(self, server, session, envelope):
        return "250 2.0.0 Ok: discarded"
def accept_all(server, session, envelope, mechanism, auth_data):
    return AuthResult(success=True)
async def main(port, cert, key):
    ctx = None
    if cert != "-":
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH); ctx.load_cert_chain(cert, key)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(Discard(), tls_context=ctx, authenticator=accept_all, auth_require_tls=True,
                     hostname="bare.localhost"), "127.0.0.1", port)
    async with server:
        await server.serve_forever()
asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
"""


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK


def message(i: int, size: int = 2048) -> bytes:
    head = f"From: {USER}\r\nTo: bob@example.net\r\nSubject: bench {i}\r\n\r\n".encode()
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


@dataclass
class Result:
    name: str
    messages: int = 0
    failures: int = 0
    seconds: float = 0.0
    delivered_seconds: float | None = None
    latencies: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)

    def row(self) -> str:
        rate = self.messages / self.seconds if self.seconds else 0
        dl = f"{self.messages / self.delivered_seconds:8.0f}" if self.delivered_seconds else "       -"
        if self.latencies:
            lat = sorted(self.latencies)
            p50 = statistics.median(lat) * 1000
            p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
            lats = f"{p50:7.1f} {p99:7.1f}"
        else:
            lats = "      -       -"
        cpu = "  ".join(f"{k}={v / max(self.messages, 1) * 1000:.2f}" for k, v in self.cpu.items())
        return f"{self.name:34s} {rate:8.0f} {dl} {lats}  {self.failures:5d}   {cpu}"


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readuntil(b"\r\n")
        if line[3:4] != b"-":
            return line


async def session(port: int, count: int, tls: ssl.SSLContext | None, auth: bool, result: Result, start_index: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await read_reply(reader)
    writer.write(b"EHLO bench.localhost\r\n")
    await read_reply(reader)
    if tls is not None:
        writer.write(b"STARTTLS\r\n")
        await read_reply(reader)
        await writer.start_tls(tls, server_hostname="localhost")
        writer.write(b"EHLO bench.localhost\r\n")
        await read_reply(reader)
    if auth:
        token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
        writer.write(b"AUTH PLAIN " + token + b"\r\n")
        reply = await read_reply(reader)
        if not reply.startswith(b"235"):
            raise RuntimeError(f"AUTH failed: {reply!r}")
    envelope = f"MAIL FROM:<{USER}>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n".encode()
    for i in range(count):
        body = message(start_index + i)
        writer.write(envelope)  # PIPELINING: MAIL, RCPT and DATA in one write
        replies = [await read_reply(reader) for _ in range(3)]
        if not replies[2].startswith(b"354"):
            result.failures += 1
            writer.write(b"RSET\r\n")
            await read_reply(reader)
            continue
        writer.write(body + b".\r\n")
        t0 = time.perf_counter()
        reply = await read_reply(reader)
        result.latencies.append(time.perf_counter() - t0)
        if reply.startswith(b"250"):
            result.messages += 1
        else:
            result.failures += 1
    writer.write(b"QUIT\r\n")
    await read_reply(reader)
    writer.close()


async def drive(port: int, messages: int, sessions: int, tls: bool, auth: bool, result: Result) -> None:
    ctx = None
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    per = [messages // sessions + (1 if i < messages % sessions else 0) for i in range(sessions)]
    starts = [sum(per[:i]) for i in range(sessions)]
    t0 = time.perf_counter()
    await asyncio.gather(*(session(port, n, ctx, auth, result, s) for n, s in zip(per, starts)))
    result.seconds = time.perf_counter() - t0


def find_smtp_source() -> tuple[str, dict] | None:
    found = shutil.which("smtp-source")
    if found:
        return found, {}
    tools = ROOT / "var" / "tools" / "postfix"
    binary = tools / "usr" / "sbin" / "smtp-source"
    if not binary.exists() and shutil.which("apt-get") and shutil.which("dpkg-deb"):
        # Unpack Debian's postfix package without installing (and so without starting) it.
        tools.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            got = subprocess.run(["apt-get", "download", "postfix"], cwd=tmp, capture_output=True)
            debs = list(Path(tmp).glob("postfix_*.deb"))
            if got.returncode == 0 and debs:
                subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tools)], check=False)
    if binary.exists():
        return str(binary), {"LD_LIBRARY_PATH": str(tools / "usr" / "lib" / "postfix")}
    return None


def run_smtp_source(tool: tuple[str, dict], port: int, messages: int, sessions: int, result: Result) -> None:
    binary, env = tool
    t0 = time.perf_counter()
    proc = subprocess.run(
        [binary, "-d", "-s", str(sessions), "-m", str(messages), "-l", "2048", "-f", USER, "-t", "bob@example.net",
         f"127.0.0.1:{port}"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    result.seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {proc.stderr.strip()}")
    result.messages = messages


class Pipeline:
    def __init__(self, root: Path) -> None:
        self.sink_port = free_port()
        self.stack = Stack(
            root,
            next_hop=("127.0.0.1", self.sink_port),
            users={USER: User(PASSWORD, [USER])},
            trusted_networks=["127.0.0.0/8"],
            env={"frontend": {"LOG_LEVEL": "WARNING"}, "relay": {"LOG_LEVEL": "WARNING"},
                 "policy": {"LOG_LEVEL": "WARNING"}, "rewriter": {"LOG_LEVEL": "WARNING"}},
        )
        # The next hop offers no STARTTLS: the relay's cost is then compared with a bare
        # server that does no TLS either.
        self.sink = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(self.sink_port), "-", "-"])
        wait_port("127.0.0.1", self.sink_port, 10)
        self.stack.start()

    def pids(self) -> dict[str, int]:
        out = {name: p.pid for name, p in self.stack.procs.items()}
        out["nats"] = self.stack.nats.proc.pid
        out["nexthop"] = self.sink.pid
        return out

    async def wait_delivered(self, timeout: float = 600) -> None:
        import nats

        from submitd_common import jetstream

        nc = await nats.connect(self.stack.nats.url)
        try:
            js = nc.jetstream()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                info = await js.consumer_info(jetstream.STREAM, "relay")
                if info.num_pending == 0 and info.num_ack_pending == 0:
                    return
                await asyncio.sleep(0.05)
            raise RuntimeError("messages not delivered in time")
        finally:
            await nc.close()

    def stop(self) -> None:
        self.stack.stop()
        self.sink.terminate()
        self.sink.wait()


def measure(name: str, pids: dict[str, int], run) -> Result:
    result = Result(name)
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    self_before = resource.getrusage(resource.RUSAGE_SELF)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run(result)
    self_after = resource.getrusage(resource.RUSAGE_SELF)
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result.cpu = {k: cpu_seconds(p) - before[k] for k, p in pids.items()}
    client = (self_after.ru_utime + self_after.ru_stime) - (self_before.ru_utime + self_before.ru_stime)
    client += (children_after.ru_utime + children_after.ru_stime) - (
        children_before.ru_utime + children_before.ru_stime
    )
    result.cpu["client"] = client
    return result


def bench_rewriter(messages: int, work: Path) -> None:
    """The rewriter alone over gRPC (20 concurrent calls), with and without DKIM, beside
    dkimpy signing alone, all in this run."""
    import dkim as dkimpy
    import grpc
    import yaml

    from submitd.v1 import common_pb2, rewriter_pb2, rewriter_pb2_grpc
    from submitd_rewriter import dkim

    work.mkdir(parents=True, exist_ok=True)
    msg = message(0)
    keyfiles = {}
    for alg in ("rsa", "ed25519"):
        key = dkim.generate_key(alg)
        (work / f"{alg}.pem").write_bytes(dkim.private_pem(key))
        (work / f"{alg}.yaml").write_text(yaml.safe_dump(
            {"keys": [{"domain": "example.test", "selector": alg, "key_file": str(work / f"{alg}.pem")}]}))
        keyfiles[alg] = work / f"{alg}.yaml"
    rows = []
    for label, keys in (("rewriter, no DKIM", None), ("rewriter + DKIM RSA-2048", "rsa"),
                        ("rewriter + DKIM Ed25519", "ed25519")):
        port = free_port()
        env = {**os.environ, "SUBMITD_REWRITER_LISTEN": f"127.0.0.1:{port}", "SUBMITD_REWRITER_LOG_LEVEL": "WARNING",
               "SUBMITD_REWRITER_HTTP_LISTEN": f"127.0.0.1:{free_port()}",
               "SUBMITD_REWRITER_MESSAGE_ID_DOMAIN": "bench.localhost"}
        if keys:
            env["SUBMITD_REWRITER_DKIM_KEYS_FILE"] = str(keyfiles[keys])
        proc = subprocess.Popen([sys.executable, "-m", "submitd_rewriter"], env=env)
        try:
            wait_port("127.0.0.1", port, 20)

            async def drive_rewriter() -> float:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                    stub = rewriter_pb2_grpc.RewriterStub(ch)
                    request = rewriter_pb2.WholeMessage(
                        envelope=common_pb2.Envelope(queue_id="bench", return_path=USER), message=msg)
                    await stub.RewriteWhole(request)  # warm up
                    per = messages // 20

                    async def worker() -> None:
                        for _ in range(per):
                            result = await stub.RewriteWhole(request)
                            assert result.WhichOneof("result") == "accepted"

                    t0 = time.perf_counter()
                    await asyncio.gather(*(worker() for _ in range(20)))
                    return time.perf_counter() - t0

            cpu0 = cpu_seconds(proc.pid)
            seconds = asyncio.run(drive_rewriter())
            cpu = cpu_seconds(proc.pid) - cpu0
            done = (messages // 20) * 20
            rows.append((label, done / seconds, cpu / done * 1000))
        finally:
            proc.terminate()
            proc.wait()
    for alg in ("rsa", "ed25519"):
        pem = (work / f"{alg}.pem").read_bytes()
        if alg == "ed25519":  # dkimpy takes the raw 32-byte seed, base64, for Ed25519
            from cryptography.hazmat.primitives import serialization

            raw = serialization.load_pem_private_key(pem, None).private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
            pem = base64.b64encode(raw)
        count = max(messages // 10, 50)
        t0 = time.process_time()
        for _ in range(count):
            dkimpy.sign(msg, alg.encode(), b"example.test", pem,
                        signature_algorithm=b"rsa-sha256" if alg == "rsa" else b"ed25519-sha256")
        cpu = time.process_time() - t0
        rows.append((f"dkimpy.sign alone, {'RSA-2048' if alg == 'rsa' else 'Ed25519'}", count / cpu, cpu / count * 1000))
    print(f"\nrewriter: {messages} messages of 2 KB, 20 concurrent gRPC calls (dkimpy: one thread, CPU-bound)")
    print(f"{'run':34s} {'msg/s':>8s} {'CPU ms/msg':>11s}")
    for label, rate, cpu_ms in rows:
        print(f"{label:34s} {rate:8.0f} {cpu_ms:11.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--only", choices=["smtp", "rewriter"], help="run one part only")
    args = parser.parse_args()
    n, s = args.messages, args.sessions
    if args.only != "smtp":
        bench_rewriter(min(n, 4000), Path(tempfile.mkdtemp(prefix="submitd-bench-rw-")))
        if args.only == "rewriter":
            return
    work = Path(tempfile.mkdtemp(prefix="submitd-bench-"))
    results: list[Result] = []
    tool = find_smtp_source()

    pipeline = Pipeline(work / "stack")
    bare_port = free_port()
    bare = subprocess.Popen(
        [sys.executable, "-c", BARE_SERVER, str(bare_port), str(pipeline.stack.cert), str(pipeline.stack.key)]
    )
    wait_port("127.0.0.1", bare_port, 10)
    try:
        for mode, tls, auth in (("plain, trusted network", False, False), ("STARTTLS + AUTH PLAIN", True, True)):
            results.append(
                measure(f"bare aiosmtpd, {mode}", {"server": bare.pid},
                        lambda r: asyncio.run(drive(bare_port, n, s, tls, auth, r)))
            )

            def piped(r: Result, tls=tls, auth=auth) -> None:
                asyncio.run(drive(pipeline.stack.ports.submission, n, s, tls, auth, r))
                asyncio.run(pipeline.wait_delivered())
                r.delivered_seconds = None

            def timed(r: Result) -> None:
                t0 = time.perf_counter()
                piped(r)
                r.delivered_seconds = time.perf_counter() - t0

            results.append(measure(f"submitd pipeline, {mode}", pipeline.pids(), timed))
        if tool:
            results.append(
                measure("bare aiosmtpd, smtp-source", {"server": bare.pid},
                        lambda r: run_smtp_source(tool, bare_port, n, s, r))
            )

            def sourced(r: Result) -> None:
                t0 = time.perf_counter()
                run_smtp_source(tool, pipeline.stack.ports.submission, n, s, r)
                asyncio.run(pipeline.wait_delivered())
                r.delivered_seconds = time.perf_counter() - t0

            results.append(measure("submitd pipeline, smtp-source", pipeline.pids(), sourced))
    finally:
        bare.terminate()
        bare.wait()
        pipeline.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{n} messages of 2 KB over {s} reused sessions; {os.cpu_count()} CPUs; loopback")
    print(f"{'run':34s} {'acc/s':>8s} {'dlv/s':>8s} {'p50 ms':>7s} {'p99 ms':>7s}  {'fail':>5s}   CPU s per 1000 msgs")
    for r in results:
        print(r.row())
    print("\nratios, pipeline / bare (accepted msg/s; delivered msg/s):")
    for i in range(0, len(results), 2):
        bare_r, pipe_r = results[i], results[i + 1]
        acc = (pipe_r.messages / pipe_r.seconds) / (bare_r.messages / bare_r.seconds)
        dlv = (pipe_r.messages / pipe_r.delivered_seconds) / (bare_r.messages / bare_r.seconds)
        print(f"  {pipe_r.name.split(', ', 1)[1]:28s} accepted {acc:.2f}x   delivered {dlv:.2f}x")


if __name__ == "__main__":
    main()
