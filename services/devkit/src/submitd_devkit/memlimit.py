"""The memory limit a process runs under (its cgroup's), and the GOMEMLIMIT that goes with it:
`make run` and the bench give nats-server what the chart gives it (templates/nats.yaml).

GOMEMLIMIT is a soft limit on what the Go runtime manages (heap, stacks, its own structures):
as the total nears it, the collector runs more often instead of letting the heap double. It is
90% of the hard limit, as in the chart: the rest is for what the runtime does not count or has
freed but not yet returned to the kernel, and for the page cache of JetStream's files that the
cgroup charges to the same limit (the kernel reclaims that before it kills anything).
"""

from __future__ import annotations

from pathlib import Path

MIB = 1 << 20
SHARE_PERCENT = 90
# cgroup v1 says "no limit" with the largest page-aligned 64-bit number; v2 says "max".
NO_LIMIT = 1 << 62


def gomemlimit(limit: int) -> str:
    """GOMEMLIMIT for a hard limit of ``limit`` octets: 90% of it, in whole MiB (rounded down)."""
    return f"{limit * SHARE_PERCENT // 100 // MIB}MiB"


def cgroup_memory_limit(cgroup_file: Path = Path("/proc/self/cgroup"),
                        root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The smallest memory limit on the way from the process's cgroup up to the hierarchy's root
    (v2 ``memory.max``, v1 ``memory.limit_in_bytes``), or None where there is none."""
    try:
        lines = cgroup_file.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        number, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base, name = root / "memory", "memory.limit_in_bytes"  # v1
        elif number == "0" and controllers == "" and (root / "cgroup.controllers").exists():
            base, name = root, "memory.max"  # v2
        else:
            continue
        here = base / path.lstrip("/")
        if not here.is_dir():
            here = base  # a container's own cgroup, mounted at the root of its namespace
        limits = []
        for directory in [here, *here.parents]:
            if not directory.is_relative_to(base):
                break
            try:
                text = (directory / name).read_text().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < NO_LIMIT:
                limits.append(int(text))
        return min(limits) if limits else None
    return None
