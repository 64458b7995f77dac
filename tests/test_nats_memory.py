"""nats-server in `make run` and the bench gets what the chart gives it: GOMEMLIMIT at 90% of the
memory limit it runs under (its cgroup's, or one it is given), so its heap is collected before
the kernel kills it at the limit. The chart's side is in test_chart.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from submitd_devkit import stack as stack_module
from submitd_devkit.memlimit import cgroup_memory_limit
from submitd_devkit.stack import NatsServer


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest.mark.parametrize("from_cgroup, operator, expected", [
    (None, None, None),  # no limit anywhere: the Go runtime's default (none)
    (2 << 30, None, "1843MiB"),  # a cgroup limit of 2 GiB (a container's, say)
    (2 << 30, "500MiB", "500MiB"),  # the operator's own GOMEMLIMIT stays
])
def test_nats_server_runs_with_gomemlimit_below_the_limit_it_runs_under(tmp_path, monkeypatch, from_cgroup,
                                                                          operator, expected):
    monkeypatch.setattr(stack_module, "cgroup_memory_limit", lambda: from_cgroup)
    if operator:
        monkeypatch.setenv("GOMEMLIMIT", operator)
    else:
        monkeypatch.delenv("GOMEMLIMIT", raising=False)
    server = NatsServer(tmp_path).start()
    try:
        assert environ(server.proc.pid).get("GOMEMLIMIT") == expected
        assert server.gomemlimit == expected  # what make run prints
    finally:
        server.stop()


def test_a_limit_given_to_nats_server_wins(tmp_path, monkeypatch):
    """The bench's 1 GiB cgroup: the server is moved into it after it starts, so it is told."""
    monkeypatch.setenv("GOMEMLIMIT", "8GiB")
    server = NatsServer(tmp_path, memory_limit=1 << 30).start()
    try:
        assert environ(server.proc.pid)["GOMEMLIMIT"] == "921MiB"
    finally:
        server.stop()


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_memory_limit_is_the_smallest_on_the_way_up_the_cgroup_tree(tmp_path):
    # cgroup v1: a limit on the parent, none (the largest page-aligned number) on the leaf.
    v1 = tmp_path / "v1"
    write(v1 / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    write(v1 / "memory" / "pods" / "memory.limit_in_bytes", "3221225472\n")
    write(v1 / "memory" / "pods" / "nats" / "memory.limit_in_bytes", "9223372036854771712\n")
    write(tmp_path / "cgroup-v1", "4:memory:/pods/nats\n3:cpuset:/\n")
    assert cgroup_memory_limit(tmp_path / "cgroup-v1", v1) == 3 << 30
    write(v1 / "memory" / "pods" / "memory.limit_in_bytes", "9223372036854771712\n")
    assert cgroup_memory_limit(tmp_path / "cgroup-v1", v1) is None  # this machine's case: no limit
    # cgroup v2: "max" up the tree, a limit on the leaf; a container's namespace (path "/").
    v2 = tmp_path / "v2"
    write(v2 / "cgroup.controllers", "cpu memory pids\n")
    write(v2 / "app" / "memory.max", "max\n")
    write(v2 / "app" / "nats" / "memory.max", "1073741824\n")
    write(tmp_path / "cgroup-v2", "0::/app/nats\n")
    assert cgroup_memory_limit(tmp_path / "cgroup-v2", v2) == 1 << 30
    write(v2 / "memory.max", "536870912\n")
    write(tmp_path / "cgroup-ns", "0::/\n")
    assert cgroup_memory_limit(tmp_path / "cgroup-ns", v2) == 1 << 29
    write(v2 / "memory.max", "max\n")
    assert cgroup_memory_limit(tmp_path / "cgroup-ns", v2) is None
