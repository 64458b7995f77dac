from __future__ import annotations

import os
import random
import re
import socket

_handed_out: set[int] = set()


def _range() -> tuple[int, int]:
    """20000-32000; parallel test workers (pytest-xdist gwN) each get their own slice of it,
    so two of them can never hand out the same port."""
    low, high = 20000, 32000
    worker = re.fullmatch(r"gw(\d+)", os.environ.get("PYTEST_XDIST_WORKER", ""))
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if worker and count > 1:
        size = (high - low) // count
        low += int(worker.group(1)) * size
        high = low + size - 1
    return low, high


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody uses right now (the caller binds it soon after).

    Chosen below the ephemeral range, where the kernel never picks the source ports of
    outgoing connections, so a client socket cannot take it before the server binds it.
    """
    for _ in range(200):
        port = random.randint(*_range())
        if port in _handed_out:  # reserved by an earlier caller that may not have bound it yet
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port found")


def wait_port(host: str, port: int, timeout: float) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False
