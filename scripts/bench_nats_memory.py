"""`make bench BENCH_ARGS="--only large-bounded"` (or `make bench-nats-memory`): NATS memory
bounded. The whole local stack with nats-server under a hard memory limit of 1 GiB and
GOMEMLIMIT at 90% of it (as the chart sets it), 60 messages of 24 MB submitted at once with
STARTTLS + AUTH PLAIN: is nats-server killed, is every message either accepted and delivered or
refused with 452 4.3.1, what is its peak RSS, what throughput.

The limit is a memory cgroup made for nats-server alone, a child of this process's own memory
cgroup (so whatever limits that one has still hold): cgroup v1 (memory.limit_in_bytes, and
memsw where swap is accounted) or v2 (memory.max, memory.swap.max 0). Where no cgroup can be
made, RLIMIT_AS by prlimit instead, which is not the same thing (Go reserves address space it
never touches): the report says which it was. Time bound: ``--bounded-seconds`` for the load
and the deliveries together (default 150; the start of the stack comes on top).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import resource
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchkit import LARGE_LIMIT, PASSWORD, USER, _reply, _status_kb, client_tls, postfix_bin, starttls_session
from submitd_devkit.memlimit import gomemlimit
from submitd_devkit.ports import free_port, wait_port


class MemoryLimit:
    """A hard memory limit for one process (``add(pid)``), with its peak and OOM kills."""

    ROOT = Path("/sys/fs/cgroup")

    def __init__(self, name: str, limit: int) -> None:
        self.limit = limit
        self.path: Path | None = None
        self.version = 0
        self.pid: int | None = None
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            number, controllers, own = line.split(":", 2)
            if "memory" in controllers.split(","):
                base, version = self.ROOT / "memory", 1
            elif number == "0" and controllers == "" and (self.ROOT / "cgroup.controllers").exists():
                base, version = self.ROOT, 2
            else:
                continue
            # Under this process's own cgroup; else at the hierarchy's root (a container's own
            # cgroup mounted there; or v2, where a parent holding processes cannot enable the
            # memory controller for a child, and the root can).
            for parent in (base / own.lstrip("/"), base):
                if self._make(parent / name, version):
                    break
            if self.path:
                break
        self.kind = {1: "cgroup v1", 2: "cgroup v2"}.get(
            self.version, "prlimit: address space growth (RLIMIT_AS), no memory cgroup could be made here")

    def _make(self, path: Path, version: int) -> bool:
        try:
            path.mkdir(exist_ok=True)
            if version == 1:
                (path / "memory.limit_in_bytes").write_text(str(self.limit))
                with contextlib.suppress(OSError):  # no swap accounting: nothing to bound
                    (path / "memory.memsw.limit_in_bytes").write_text(str(self.limit))
                with contextlib.suppress(OSError):  # what it has already allocated moves with it
                    (path / "memory.move_charge_at_immigrate").write_text("3")
            else:
                (path / "memory.max").write_text(str(self.limit))
                with contextlib.suppress(OSError):
                    (path / "memory.swap.max").write_text("0")
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
            return False
        self.path, self.version = path, version
        return True

    def add(self, pid: int) -> None:
        self.pid = pid
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(pid))
        else:
            # A weaker stand-in: Go reserves address space it never touches (a nats-server at
            # rest has ~1.2 GB of it), so only growth past what it has now is bounded.
            size = _status_kb(pid, "VmSize") * 1024 + self.limit
            resource.prlimit(pid, resource.RLIMIT_AS, (size, size))

    def peak(self) -> int | None:
        """The cgroup's peak usage (the process's memory and the page cache charged to it)."""
        name = {1: "memory.max_usage_in_bytes", 2: "memory.peak"}.get(self.version)
        with contextlib.suppress(OSError, TypeError, ValueError):
            return int((self.path / name).read_text())
        return None

    def oom_kills(self) -> int | None:
        name = {1: "memory.oom_control", 2: "memory.events"}.get(self.version)
        with contextlib.suppress(OSError, TypeError):
            found = re.search(r"^oom_kill (\d+)", (self.path / name).read_text(), re.M)
            return int(found.group(1)) if found else None
        return None

    def remove(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.rmdir()


class CountingSink:
    """Postfix's smtp-sink with its running count (``-c``): how many messages it was given."""

    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.out = work / "sink.out"
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen([postfix_bin("smtp-sink"), "-c", *user, f"127.0.0.1:{self.port}", "256"],
                                         stdout=out, stderr=subprocess.DEVNULL)
        if not wait_port("127.0.0.1", self.port, 10):
            raise RuntimeError("smtp-sink did not start")

    def messages(self) -> int:
        found = re.findall(rb"mesg=(\d+)", self.out.read_bytes())
        return int(found[-1]) if found else 0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


@dataclass
class Outcome:
    accepted: int = 0
    refused_full: int = 0  # 452 4.3.1
    other: list[str] = field(default_factory=list)
    last_accept: float = 0.0


def body(size: int) -> bytes:
    head = f"From: {USER}\r\nTo: bob@example.net\r\nSubject: large, bounded\r\n\r\n".encode()
    line = b"y" * 998 + b"\r\n"
    return head + line * ((size - len(head)) // len(line)) + b".\r\n"


async def submit(port: int, data: bytes, ctx: ssl.SSLContext, t0: float, out: Outcome) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await starttls_session(port, ctx, reader, writer)
        writer.write(b"AUTH PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()) + b"\r\n")
        if not (reply := await _reply(reader)).startswith(b"235"):
            out.other.append(reply.decode(errors="replace").strip())
            return
        writer.write(f"MAIL FROM:<{USER}> SIZE={len(data)}\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n".encode())
        replies = [await _reply(reader) for _ in range(3)]
        if not replies[2].startswith(b"354"):
            reply = next(r for r in replies if not r.startswith((b"250", b"354")))
            if reply.startswith(b"452") and b"4.3.1" in reply:
                out.refused_full += 1
            else:
                out.other.append(reply.decode(errors="replace").strip())
            return
        view = memoryview(data)
        for i in range(0, len(data), 1 << 20):
            writer.write(view[i : i + (1 << 20)])
            await writer.drain()
        reply = await _reply(reader)
        if reply.startswith(b"250"):
            out.accepted += 1
            out.last_accept = time.perf_counter() - t0
        elif reply.startswith(b"452") and b"4.3.1" in reply:
            out.refused_full += 1
        else:
            out.other.append(reply.decode(errors="replace").strip())
        writer.write(b"QUIT\r\n")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_reply(reader), 5)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def load(port: int, messages: int, size: int, seconds: float, t0: float, out: Outcome) -> None:
    data, ctx = body(size), client_tls()

    async def one() -> None:
        try:
            await submit(port, data, ctx, t0, out)
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError) as e:
            out.other.append(f"connection: {e!r}"[:120])

    tasks = [asyncio.create_task(one()) for _ in range(messages)]
    done, pending = await asyncio.wait(tasks, timeout=seconds)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    out.other += ["unfinished at the time bound"] * len(pending)


class RssWatch(threading.Thread):
    """nats-server's largest resident size, sampled (it may not live to tell its VmHWM)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_kb, self.done = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            with contextlib.suppress(OSError):
                self.peak_kb = max(self.peak_kb, _status_kb(self.pid, "VmHWM"), _status_kb(self.pid, "VmRSS"))


def bench_large_bounded(work: Path, messages: int = 60, size: int = 24_000_000, limit: int = 1 << 30,
                        seconds: float = 150.0, go_limit: bool = True) -> bool:
    """``go_limit=False``: the same with GOMEMLIMIT off, to see what it is for."""
    from submitd_devkit.stack import Stack, User

    work.mkdir(parents=True, exist_ok=True)
    sink = CountingSink(work)
    memory = MemoryLimit(f"submitd-bench-nats-{os.getpid()}", limit)
    level = {"LOG_LEVEL": "WARNING"}
    env = {s: dict(level) for s in ("frontend", "relay", "policy", "rewriter")}
    env["frontend"] |= {"MAX_MESSAGE_SIZE": str(LARGE_LIMIT), "MAX_CONNECTIONS_PER_CLIENT": str(messages + 10)}
    stack = Stack(work / "stack", next_hop=("127.0.0.1", sink.port), users={USER: User(PASSWORD, [USER])}, env=env)
    stack.nats.memory_limit = limit  # GOMEMLIMIT: it is moved into the limit once started
    watch = None
    try:
        with contextlib.ExitStack() as undo:
            if not go_limit:
                stack.nats.memory_limit = None
                before = os.environ.get("GOMEMLIMIT")
                os.environ["GOMEMLIMIT"] = "off"  # read by NatsServer.start() only
                undo.callback(lambda: os.environ.pop("GOMEMLIMIT") if before is None
                              else os.environ.update(GOMEMLIMIT=before))
            stack.nats.start()
        memory.add(stack.nats.proc.pid)
        stack.start()
        nats_pid = stack.nats.proc.pid
        rss0 = _status_kb(nats_pid, "VmRSS")
        watch = RssWatch(nats_pid)
        watch.start()
        out = Outcome()
        t0 = time.perf_counter()
        asyncio.run(load(stack.ports.submission, messages, size, seconds, t0, out))
        accept_seconds = time.perf_counter() - t0
        while sink.messages() < out.accepted and time.perf_counter() - t0 < seconds and stack.nats.proc.poll() is None:
            time.sleep(0.1)
        delivered, deliver_seconds = sink.messages(), time.perf_counter() - t0
        watch.done.set()
        watch.join()
        status = stack.nats.proc.poll()
        kills, peak = memory.oom_kills(), memory.peak()
        killed = bool(kills) or status is not None  # killed, or out of address space (prlimit)
    finally:
        if watch:
            watch.done.set()
        stack.stop(at_once=True)
        sink.stop()
        memory.remove()
    mb = size / 1e6
    print(f"\nlarge messages, NATS memory bounded: {messages} x {mb:.0f} MB at once, STARTTLS + AUTH PLAIN, "
          f"the whole local stack")
    print(f"  nats-server limit         {limit >> 20} MiB by {memory.kind}, "
          f"GOMEMLIMIT={gomemlimit(limit) if go_limit else 'off'}")
    print(f"  accepted (250)            {out.accepted}")
    print(f"  refused 452 4.3.1         {out.refused_full}")
    print(f"  other outcomes            {len(out.other)}" + (f"  {sorted(set(out.other))[:5]}" if out.other else ""))
    print(f"  delivered to the sink     {delivered} (of {out.accepted} accepted)")
    print(f"  nats-server OOM-killed    {'YES' if killed else 'no'} (oom_kill {kills}, "
          f"{'still running' if status is None else f'exit status {status}'})")
    print(f"  nats-server peak RSS      {watch.peak_kb / 1024:.0f} MiB (from {rss0 / 1024:.0f} MiB before the load)"
          + (f"; the cgroup's peak, with the page cache charged to it, {peak / 2**20:.0f} MiB" if peak else ""))
    print(f"  throughput                accepted {out.accepted * mb / max(out.last_accept, 1e-9):.1f} MB/s "
          f"({out.accepted * mb:.0f} MB by {out.last_accept:.1f} s; load done at {accept_seconds:.1f} s), "
          f"delivered {delivered * mb / deliver_seconds:.1f} MB/s (by {deliver_seconds:.1f} s)")
    held = (not killed and not out.other and out.accepted + out.refused_full == messages
            and delivered == out.accepted)
    print(f"  goal (issue 29): not killed, each message accepted and delivered or refused 452 4.3.1: "
          f"{'met' if held else 'NOT met'}")
    return held
