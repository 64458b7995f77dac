"""`make bench`: submitd side by side with Postfix, Haraka and a bare aiosmtpd, in one run.

Every server delivers to its own smtp-sink; Postfix's smtp-source is the load (C code, so the
client is not the bottleneck). For each mode, the median of ROUNDS rotated rounds:

- new connection per message, and 20 reused sessions (`smtp-source -d`), 2 KB messages, plain
  SMTP from a trusted loopback network: accepted msg/s (load finished), delivered msg/s (queue
  empty again) and server CPU ms per message (all processes of the server, from a cgroup),
  each as a ratio to Postfix's and to Haraka's (scripts/bench_haraka.py; installed with npm
  by `make bench`, left out with the reason printed where that failed);
- STARTTLS + AUTH PLAIN with a new connection per message, as mail clients submit: submitd
  beside a bare aiosmtpd doing the same TLS and AUTH;
- idle CPU (ms per second with no traffic) and end of data -> 250 latency at half of submitd's
  own maximum rate;
- the rewriter alone over gRPC, with and without DKIM, beside dkimpy, and its CPU for one
  message whose header is 1 MiB of continuation lines (``--only rewriter``);
- the frontend's CPU per TLS handshake on port 465: full with ECDSA P-256, full with RSA-2048,
  and resumed (a session ticket) in TLS 1.3 and 1.2 (``--only tls``);
- an AUTH with each directory (users file, LDAP, SQL, JWT), cold and cached: policy CPU and
  AUTH latency (``--only auth``, scripts/bench_auth.py);
- direct delivery to MX hosts with DANE and with MTA-STS against opportunistic TLS, relays side by
  side at the same time: msg/s and relay CPU per message (``--only outbound``, scripts/bench_outbound.py);
- 60 x 24 MB at once with STARTTLS + AUTH, nats-server under a 1 GiB memory limit: killed or
  not, each message accepted and delivered or refused 452 4.3.1, its peak RSS, MB/s (``--only
  large-bounded``, scripts/bench_nats_memory.py).

    make bench BENCH_ARGS="--messages 3000 --rounds 1"
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import (  # noqa: E402
    LARGE_LIMIT,
    USER,
    BareAiosmtpd,
    PeakMemory,
    Postfix,
    Round,
    SmtpSink,
    Submitd,
    auth_per_message,
    header_cpu,
    idle_cpu,
    measure,
    median_round,
    message,
    p50,
    paced,
    percentile,
    postfix_bin,
    proc_cpu,
    smtp_source,
    stop_all,
)
from submitd_devkit.ports import free_port, wait_port  # noqa: E402

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
    # The rewriter is the queue's writer and starts only with the queue there; RewriteWhole, measured
    # here, hands the message back and writes nothing.
    from submitd_common import jetstream
    from submitd_devkit.stack import NatsServer

    nats_server = NatsServer(work / "nats").start()
    asyncio.run(nats_server.provision(queue=jetstream.QueueConfig()))
    nats_env = {f"SUBMITD_REWRITER_{k}": v for k, v in nats_server.credentials("rewriter").items()}
    nats_env["SUBMITD_REWRITER_NATS_URL"] = nats_server.service_url
    for label, keys in (("rewriter, no DKIM", None), ("rewriter + DKIM RSA-2048", "rsa"),
                        ("rewriter + DKIM Ed25519", "ed25519")):
        port = free_port()
        env = {**os.environ, "SUBMITD_REWRITER_LISTEN": f"127.0.0.1:{port}", "SUBMITD_REWRITER_LOG_LEVEL": "WARNING",
               "SUBMITD_REWRITER_HTTP_LISTEN": f"127.0.0.1:{free_port()}",
               "SUBMITD_REWRITER_MESSAGE_ID_DOMAIN": "bench.localhost", **nats_env}
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

            cpu0 = proc_cpu(proc.pid)
            seconds = asyncio.run(drive_rewriter())
            cpu = proc_cpu(proc.pid) - cpu0
            done = (messages // 20) * 20
            rows.append((label, done / seconds, cpu / done * 1000))
            if keys == "ed25519":
                folded_ms = asyncio.run(header_cpu(port, proc.pid))
        finally:
            proc.terminate()
            proc.wait()
    nats_server.stop()
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
    print(f"rewriter + DKIM Ed25519, one 1 MiB header of continuation lines: {folded_ms:.1f} ms CPU (goal < 50)")


def bench_wire(megabytes: int = 25) -> float:
    """The frontend's checks on DATA content alone (end of data, dot-unstuffing, NUL, bare CR
    or LF, line length, size): CPU ms per MB, on 64 KiB reads as they come off a socket."""
    from submitd_frontend.wire import DataReader

    line = b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\r\n"
    data = line * (megabytes * 1_000_000 // len(line)) + b".\r\n"
    blocks = [data[i : i + (64 << 10)] for i in range(0, len(data), 64 << 10)]
    best = float("inf")
    for _ in range(3):
        reader = DataReader(None)
        t0 = time.process_time()
        for block in blocks:
            reader.feed(block)
        best = min(best, time.process_time() - t0)
    assert reader.problem is None
    return best * 1000 / megabytes


def bench_large(servers: list, sessions: int, size: int, label: str) -> dict[str, dict]:
    """``sessions`` clients at once, one message of ``size`` octets each (smtp-source), per
    server: MB/s accepted and delivered, CPU per MB, and peak memory growth of each service."""
    out: dict[str, dict] = {}
    megabytes = sessions * size / 1e6
    print(f"\n{label}: {sessions} session(s) at once, one message of {size / 1e6:.0f} MB each")
    print(f"{'server':34s} {'acc MB/s':>9s} {'dlv MB/s':>9s} {'CPU ms/MB':>10s}")
    for server in servers:
        pids = server.pids() if isinstance(server, Submitd) else {}
        peak = PeakMemory(pids)
        r = measure(server, lambda r, s=server: setattr(r, "accepted", smtp_source(s.port, sessions, sessions, False, size)))
        growth = peak.growth_mb()
        acc, dlv = megabytes / r.accept_seconds, megabytes / r.deliver_seconds
        print(f"{server.name:34s} {acc:9.1f} {dlv:9.1f} {r.cpu * 1000 / megabytes:10.1f}")
        if r.split:
            print(f"{'':34s}   per service, CPU ms/MB: " + "  ".join(
                f"{k} {v * 1000 / megabytes:.1f}" for k, v in sorted(r.split.items(), key=lambda kv: -kv[1])))
        if growth:
            print(f"{'':34s}   peak RSS growth, MB: " + "  ".join(f"{k} {v:.1f}" for k, v in growth.items()))
        out[server.name] = {"accepted": acc, "delivered": dlv, "growth": growth}
    return out


def rate(r: Round) -> float:
    return r.accepted / r.accept_seconds if r.accept_seconds else 0.0


def table(title: str, rows: list[tuple[str, Round]], per_service: bool = True,
          refs: tuple[str, ...] = ("postfix", "haraka")) -> None:
    """One row per server; against each reference server in the table, its accepted rate and
    CPU per message as ratios (``x postfix``: this server's msg/s over Postfix's)."""
    refs = tuple(ref for ref in refs if any(name == ref for name, _ in rows))
    by_name = dict(rows)
    print(f"\n{title}")
    print(f"{'server':34s} {'acc/s':>7s} {'dlv/s':>7s} {'CPU ms/msg':>10s} {'fail':>5s}"
          + "".join(f" {'msg/s x ' + ref:>16s} {'CPU x ' + ref:>14s}" for ref in refs))
    for name, r in rows:
        dlv = r.accepted / r.deliver_seconds if r.deliver_seconds else 0
        cpu = r.cpu / max(r.accepted, 1) * 1000
        line = f"{name:34s} {rate(r):7.0f} {dlv:7.0f} {cpu:10.2f} {r.failed:5d}"
        for ref in refs:
            ref_r = by_name[ref]
            ref_cpu = ref_r.cpu / max(ref_r.accepted, 1) * 1000
            line += f" {rate(r) / max(rate(ref_r), 1e-9):15.2f}x {cpu / max(ref_cpu, 1e-9):13.2f}x"
        print(line)
        if per_service and r.split:
            parts = "  ".join(f"{k} {v / max(r.accepted, 1) * 1000:.2f}" for k, v in sorted(r.split.items(), key=lambda kv: -kv[1]))
            print(f"{'':34s}   per service, CPU ms/msg: {parts}")


def large_part(args, servers: list) -> None:
    """Issue 13: large messages stream; memory does not follow their size."""
    big = bench_large(servers, args.large_sessions, args.large_size, "large messages")
    huge = bench_large([s for s in servers if isinstance(s, Submitd)], 1, args.huge_size, "one huge message")
    print("\nratios and goals (issue 13):")
    names = list(big)
    if len(names) == 2:
        p, s = big[names[0]], big[names[1]]
        print(f"  large messages vs {names[0]}: accepted {s['accepted'] / p['accepted']:.2f}x, "
              f"delivered {s['delivered'] / p['delivered']:.2f}x (goal >= 1)")
    for name, row in big.items():
        if row["growth"]:
            worst = max(row["growth"].items(), key=lambda kv: kv[1])
            print(f"  {name}: largest peak growth {worst[0]} {worst[1]:.1f} MB with {args.large_sessions} x "
                  f"{args.large_size / 1e6:.0f} MB (goal < 64 MB per service)")
    for name, row in huge.items():
        worst = max(row["growth"].items(), key=lambda kv: kv[1])
        print(f"  {name}: largest peak growth {worst[0]} {worst[1]:.1f} MB with one {args.huge_size / 1e6:.0f} MB message")
    print(f"  frontend checks on DATA content: {bench_wire():.2f} ms CPU per MB (goal < 2)")


def bench_tls(work: Path, handshakes: int = 400) -> None:
    """Frontend CPU per handshake (implicit TLS, then the banner and QUIT), from /proc."""
    import socket
    import ssl

    from submitd_devkit.certs import make_self_signed
    from submitd_devkit.testing.smtp import insecure_context as client

    cert, key = make_self_signed(work / "rsa", "localhost", "rsa")
    sink = SmtpSink()
    server = Submitd("submitd", work / "submitd-tls", sink, dkim=False,
                     env={"frontend": {"TLS_SECOND_CERT": str(cert), "TLS_SECOND_KEY": str(key)}})
    try:
        pid = server.stack.procs["frontend"].pid
        port = server.stack.ports.submissions

        def one(ctx, session=None):
            with socket.create_connection(("127.0.0.1", port)) as raw, \
                    ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:
                s.recv(100)
                s.sendall(b"QUIT\r\n")
                s.recv(100)
                return s.session, s.session_reused

        cases = [
            ("TLS 1.3, ECDSA P-256, full", client(ssl.TLSVersion.TLSv1_3), False),
            ("TLS 1.2, RSA-2048, full", client(ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-GCM-SHA256"), False),
            ("TLS 1.2, ECDSA P-256, full", client(ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-GCM-SHA256"), False),
            ("TLS 1.3, resumed (ticket)", client(ssl.TLSVersion.TLSv1_3), True),
            ("TLS 1.2, resumed (ticket)", client(ssl.TLSVersion.TLSv1_2), True),
        ]
        print(f"\nfrontend CPU per TLS handshake on 465 ({handshakes} each; the banner and QUIT included)")
        for label, ctx, resume in cases:
            session, _ = one(ctx)
            before, reused = proc_cpu(pid), 0
            for _ in range(handshakes):
                new, was = one(ctx, session if resume else None)
                reused += was
                if resume:
                    session = new
            ms = (proc_cpu(pid) - before) / handshakes * 1000
            print(f"  {label:30s} {ms:5.2f} ms   (resumed {reused}/{handshakes})")
    finally:
        stop_all([server], [sink])


def peers(args, work: Path, sink, stack) -> list:
    """Haraka, or the reason it is left out (printed)."""
    from bench_haraka import Haraka, haraka_missing

    if args.no_haraka:
        return []
    reason = haraka_missing()
    if reason is None:
        try:
            return [Haraka(work / "haraka", sink(), stack.cert, stack.key, nodes=args.haraka_nodes)]
        except (RuntimeError, OSError) as e:
            reason = str(e)
    print(f"\nHaraka left out: {reason}")
    return []


def large_bounded(args) -> None:
    """Issue 29: 60 x 24 MB in flight with nats-server under a 1 GiB memory limit (bench_nats_memory.py)."""
    from bench_nats_memory import bench_large_bounded

    work = Path(tempfile.mkdtemp(prefix="submitd-bench-bounded-"))
    try:
        bench_large_bounded(work, args.bounded_messages, args.large_size, args.nats_memory, args.bounded_seconds,
                            go_limit=not args.no_gomemlimit)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=10_000, help="messages per smtp-source round")
    parser.add_argument("--auth-messages", type=int, default=2_000, help="messages per STARTTLS + AUTH round")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["smtp", "rewriter", "large", "tls", "auth", "outbound", "large-bounded"],
                        help="run one part only")
    parser.add_argument("--outbound-messages", type=int,
                        help="messages per relay and outbound round (default 2000 with --only outbound, else 1000)")
    parser.add_argument("--outbound-rounds", type=int,
                        help="outbound rounds (default two per destination with --only outbound, else one)")
    parser.add_argument("--large-sessions", type=int, default=20, help="clients at once in the large-message round")
    parser.add_argument("--large-size", type=int, default=24_000_000, help="octets per large message")
    parser.add_argument("--huge-size", type=int, default=100_000_000, help="octets of the one huge message")
    parser.add_argument("--bounded-messages", type=int, default=60, help="messages at once, NATS memory bounded")
    parser.add_argument("--bounded-seconds", type=float, default=150, help="time bound of that load and its deliveries")
    parser.add_argument("--nats-memory", type=int, default=1 << 30, help="nats-server's memory limit there, octets")
    parser.add_argument("--no-gomemlimit", action="store_true", help="there, GOMEMLIMIT off (to see what it does)")
    parser.add_argument("--no-postfix", action="store_true", help="leave Postfix out")
    parser.add_argument("--no-haraka", action="store_true", help="leave Haraka out")
    parser.add_argument("--haraka-nodes", default="cpus", help="Haraka's worker processes (smtp.ini nodes)")
    args = parser.parse_args()
    if args.only == "large-bounded":
        large_bounded(args)
        return
    if args.only in (None, "auth"):
        from bench_auth import bench_auth

        bench_auth(Path(tempfile.mkdtemp(prefix="submitd-bench-auth-")))
        if args.only == "auth":
            return
    if args.only in (None, "outbound"):
        from bench_outbound import bench_outbound

        alone = args.only == "outbound"  # the whole bench takes a shorter run (about 45 s)
        bench_outbound(Path(tempfile.mkdtemp(prefix="submitd-bench-outbound-")),
                       args.outbound_messages or (2000 if alone else 1000),
                       args.outbound_rounds or (8 if alone else 4))
        if args.only == "outbound":
            return
    if args.only in (None, "tls"):
        bench_tls(Path(tempfile.mkdtemp(prefix="submitd-bench-tls-")))
        if args.only == "tls":
            return
    if args.only not in ("smtp", "large"):
        bench_rewriter(min(args.messages, 4000), Path(tempfile.mkdtemp(prefix="submitd-bench-rw-")))
        if args.only == "rewriter":
            return
    if not postfix_bin("smtp-source"):
        sys.exit("make bench needs Postfix's smtp-source and smtp-sink: apt-get install postfix")
    work = Path(tempfile.mkdtemp(prefix="submitd-bench-"))
    work.chmod(0o755)  # Postfix's daemons (user postfix) walk into it
    servers, sinks = [], []
    try:
        def sink() -> SmtpSink:
            sinks.append(SmtpSink())
            return sinks[-1]

        large = {"frontend": {"MAX_MESSAGE_SIZE": str(LARGE_LIMIT)}}
        submitd = Submitd("submitd", work / "submitd", sink(), dkim=False, env=large)
        signed = Submitd("submitd, DKIM Ed25519", work / "submitd-dkim", sink(), dkim=True, env=large)
        bare = BareAiosmtpd(submitd.stack.cert, submitd.stack.key)
        servers += [submitd, signed, bare]
        postfixes = []
        if not args.no_postfix and postfix_bin("postfix"):
            postfixes.append(Postfix("postfix", work / "postfix", sink()))
            if postfix_bin("opendkim"):
                from submitd_rewriter import dkim

                key = work / "opendkim.pem"
                key.write_bytes(dkim.private_pem(dkim.generate_key("rsa")))
                postfixes.append(Postfix("postfix + OpenDKIM RSA-2048", work / "postfix-dkim", sink(), dkim_key=key))
        servers = postfixes + servers
        if args.only != "large":
            servers += peers(args, work, sink, submitd.stack)
        cpu_kind = {s.group.kind for s in servers}
        print(f"\nCPU counted by {', '.join(sorted(cpu_kind))}; {os.cpu_count()} CPUs; loopback; "
              f"{args.rounds} round(s), median shown")

        time.sleep(3)  # let start-up work settle
        if args.only == "large":
            large_part(args, postfixes[:1] + [signed])
            return
        idle = idle_cpu(servers, 10)
        print("\nidle, no traffic (CPU ms per second): " + "  ".join(f"{k} {v:.1f}" for k, v in idle.items()))

        results: dict[tuple[str, str], list[Round]] = {}
        modes = (("new connection per message", False), ("20 reused sessions (-d)", True))
        for i in range(args.rounds):
            for mode, reuse in modes:
                order = servers[i % len(servers):] + servers[: i % len(servers)]
                for server in order:
                    r = measure(server, lambda r, s=server, reuse=reuse: setattr(
                        r, "accepted", smtp_source(s.port, args.messages, args.sessions, reuse)))
                    results.setdefault((mode, server.name), []).append(r)
                    print(f"  round {i + 1}, {mode}, {server.name}: {rate(r):.0f} msg/s, "
                          f"{r.cpu / max(r.accepted, 1) * 1000:.2f} ms/msg", flush=True)
            for server in ([submitd, bare] if i % 2 == 0 else [bare, submitd]):
                r = measure(server, lambda r, s=server: auth_per_message(s.tls_port, args.auth_messages, args.sessions, r))
                results.setdefault(("auth", server.name), []).append(r)
                print(f"  round {i + 1}, STARTTLS + AUTH, {server.name}: {rate(r):.0f} msg/s", flush=True)

        medians = {k: median_round(v) for k, v in results.items()}
        for mode, _ in modes:
            table(f"smtp-source -s {args.sessions} -m {args.messages} -l 2048, {mode}",
                  [(s.name, medians[(mode, s.name)]) for s in servers])
        table(f"STARTTLS + AUTH PLAIN, new connection per message, {args.sessions} concurrent clients, "
              f"{args.auth_messages} messages", [(s.name, medians[("auth", s.name)]) for s in (submitd, bare)])

        # Latency when not saturated: half of submitd's own maximum (reused sessions).
        target = rate(medians[(modes[1][0], "submitd")]) / 2
        lat_rows = []
        for server in [submitd] + postfixes[:1]:
            r = measure(server, lambda r, s=server: paced(s.port, target, 15, args.sessions, r))
            lat_rows.append((server.name, r))
        print(f"\nend of data -> 250 at {target:.0f} msg/s (half of submitd's maximum, reused sessions)")
        for name, r in lat_rows:
            print(f"{name:34s} p50 {p50(r.latencies) * 1000:6.2f} ms   p99 {percentile(r.latencies, 0.99) * 1000:6.2f} ms")

        print("\nratios and goals (issue 11):")
        for mode, _ in modes:
            s_r = medians[(mode, "submitd")]
            line = f"  {mode:28s} submitd CPU {s_r.cpu / s_r.accepted * 1000:.2f} ms/msg"
            for peer in [n for n in ("postfix", "haraka") if (mode, n) in medians]:
                p_r = medians[(mode, peer)]
                acc = rate(s_r) / rate(p_r)
                dlv = (s_r.accepted / s_r.deliver_seconds) / (p_r.accepted / p_r.deliver_seconds)
                cpu = (s_r.cpu / s_r.accepted) / (p_r.cpu / p_r.accepted)
                line += f"; vs {peer}: accepted {acc:.2f}x, delivered {dlv:.2f}x, CPU/msg {cpu:.2f}x"
            d_r = medians[(mode, signed.name)]
            line += f"; DKIM Ed25519 adds {(d_r.cpu / d_r.accepted - s_r.cpu / s_r.accepted) * 1000:+.2f} ms/msg"
            print(line)
        a_s, a_b = medians[("auth", "submitd")], medians[("auth", bare.name)]
        print(f"  STARTTLS + AUTH per message: submitd {rate(a_s) / rate(a_b):.2f}x bare aiosmtpd")
        print(f"  idle: submitd {idle['submitd']:.1f} ms/s")
        print(f"  p99 at half rate: submitd {percentile(lat_rows[0][1].latencies, 0.99) * 1000:.2f} ms")
        large_part(args, postfixes[:1] + [signed])
    finally:
        stop_all(servers, sinks)
        shutil.rmtree(work, ignore_errors=True)
    if args.only is None:
        large_bounded(args)


if __name__ == "__main__":
    main()
