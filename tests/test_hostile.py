"""Hostile clients against the real frontend, bounded in count and time."""

from __future__ import annotations

import resource
import socket
import time

from submitd_common.testing.plugin import ALICE
from submitd_common.testing.smtp import logged_in


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_idle_connections_cost_the_frontend_little_and_the_policy_nothing(make_stack):
    # Connections that never say a word (from 8 addresses, under the per-client limit): no
    # policy state at all before EHLO, a few KB each in the frontend (14 KB measured; 10,000 of
    # them took a frontend from 72 to 211 MB), and a normal client is served meanwhile.
    n = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 200:  # this process holds the connections too
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * n), hard))
    stack = make_stack(env={"frontend": {"MAX_CONNECTIONS_PER_CLIENT": str(n), "MAX_SESSIONS": str(2 * n)}})
    frontend, policy = stack.procs["frontend"].pid, stack.procs["policy"].pid
    with logged_in(stack) as client:  # everything warmed up once
        client.sendmail(ALICE, ["bob@example.net"], b"Subject: warm\r\n\r\nx\r\n")
    f0, p0 = rss_mb(frontend), rss_mb(policy)
    idle = []
    try:
        for i in range(n):
            idle.append(socket.create_connection(("127.0.0.1", stack.ports.submission), timeout=10,
                                                 source_address=(f"127.0.9.{i % 8 + 1}", 0)))
        for s in idle[:: n // 20]:
            assert s.recv(100).startswith(b"220 "), "each is greeted"
        time.sleep(1)
        started = time.monotonic()
        with logged_in(stack) as client:
            client.sendmail(ALICE, ["bob@example.net"], b"Subject: meanwhile\r\n\r\nx\r\n")
        assert time.monotonic() - started < 2, "a normal client is served while they sit there"
        grown_kb = (rss_mb(frontend) - f0) * 1024 / n
        assert grown_kb < 32, f"{grown_kb:.1f} KB of frontend memory per idle connection"
        assert rss_mb(policy) - p0 < 5, "policy holds nothing for a client that has not sent EHLO"
    finally:
        for s in idle:
            s.close()
    assert len(stack.sink.handler.wait_for(2, 20)) == 2
