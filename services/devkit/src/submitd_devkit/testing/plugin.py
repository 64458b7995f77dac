"""pytest fixtures for submitd: real servers on 127.0.0.1, stopped when the test ends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING
from pathlib import Path

import pytest

from submitd_devkit import zygote
from submitd_devkit.sink import Sink
from submitd_devkit.stack import NatsServer, Stack

from . import schedule
from .users import default_users

if TYPE_CHECKING:
    from .smtp import RawClient


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "starts_stacks: the test starts whole stacks of its own without "
                            "make_stack (scripts/run_local.py): it is handed out first, as the make_stack tests are")
    schedule.configure(config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests that start stacks of their own (the long ones) first, then those on a fixture
    their module shares (a stack, a slapd ...), then the rest: under ``-n`` the quick ones fill
    the workers' last minutes instead of one long test running alone at the end. The tests that
    share a module's fixture go to one worker together (schedule.py), which starts it once."""

    def rank(item: pytest.Item) -> int:
        if "make_stack" in getattr(item, "fixturenames", ()) or item.get_closest_marker("starts_stacks"):
            return 0
        return 1 if schedule.group_of(item) else 2

    items.sort(key=rank)
    schedule.write_groups(config, items)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server with JetStream and a temporary store."""
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture
def sink() -> Iterator[Sink]:
    """A real SMTP next hop that records what it receives."""
    s = Sink().start()
    yield s
    s.stop()


# OWASP's minimum for argon2id, a fifth of the CPU of the policy's default: the tests log in
# thousands of times. A test about what hashing costs (memory, timing) sets the policy's
# ARGON2_* itself.
TEST_ARGON2 = {"time_cost": 2, "memory_kib": 19456, "parallelism": 1}


# A relay stops within one pull request, and policy and rewriter give the frontends' long-lived
# streams DRAIN_SECONDS before they cut them: short ones keep the tests that stop a service short.
TEST_ENV = {"relay": {"FETCH_WAIT": "0.2"}, "policy": {"DRAIN_SECONDS": "3"}, "rewriter": {"DRAIN_SECONDS": "3"}}


def stack_options(**kwargs) -> dict:
    """Stack arguments for a test: ``kwargs`` over the tests' environment, hashing cost, service
    starts (forked from a zygote) and mutual TLS on every gRPC call, as the chart runs them (a
    certificate per service; a stack starts as fast with it as without)."""
    env = {name: dict(values) for name, values in (kwargs.get("env") or {}).items()}
    for name, values in TEST_ENV.items():
        for key, value in values.items():
            env.setdefault(name, {}).setdefault(key, value)
    defaults = {"reload_interval": 0.5, "argon2": TEST_ARGON2, "spawn": zygote.spawn, "grpc_tls": True}
    return defaults | kwargs | {"env": env}


def module_stack(root: Path, **kwargs) -> Iterator[Stack]:
    """A whole stack with its own next hop (``stack.sink``) for a module-scoped fixture to
    yield from: ``kwargs`` over the tests' options; stopped, and checked against its NATS
    grants, when the module is done."""
    next_hop = Sink().start()
    kwargs.setdefault("users", default_users())
    stack = Stack(root, **stack_options(next_hop=("127.0.0.1", next_hop.port), **kwargs))
    stack.sink = next_hop
    try:
        stack.start()
        yield stack
    finally:
        stack.stop(at_once=True)
        next_hop.stop()
    assert_within_grants(stack)


@pytest.fixture(scope="module")
def shared_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One stack for a whole test module, for tests that do not change it."""
    yield from module_stack(tmp_path_factory.mktemp("stack"))


def assert_within_grants(stack: Stack) -> None:
    """Every service did its work within its NATS grant (submitd_common.natsauth)."""
    violations = stack.nats.violations()
    assert not violations, "NATS permission violations:\n" + "\n".join(violations[:10])


def queued(stack: Stack) -> int:
    """Messages in the stack's queue stream (the relay's to deliver)."""
    import asyncio

    import nats

    from submitd_common import jetstream

    async def count() -> int:
        nc = await nats.connect(stack.nats.url)
        try:
            return (await nc.jetstream().stream_info(jetstream.STREAM)).state.messages
        finally:
            await nc.close()

    return asyncio.run(count())


def settled(stack: Stack) -> Stack:
    """A module's stack for its next test, when what the tests before it started has ended:
    their mail has reached the next hop (the queue is empty), no password check of theirs is
    still running in policy (a client that gave up on a slow one leaves it to finish), and
    policy holds none of their sessions; then the next hop forgets their mail. For module
    stacks whose tests count mail, hashes or sessions."""
    from .metrics import sample
    from .waiting import eventually

    eventually(lambda: queued(stack) == 0, timeout=30)
    eventually(lambda: sample(stack.ports.policy_http, "submitd_policy_password_hash_pending") == 0, timeout=30)
    # Their sessions forgotten by policy too (it hears of a session's end after the client has gone).
    eventually(lambda: sample(stack.ports.policy_http, "submitd_policy_sessions") == 0, timeout=30)
    stack.sink.handler.reset()
    return stack


@pytest.fixture
def stack(shared_stack: Stack) -> Stack:
    """The module's stack, its next hop emptied for this test."""
    shared_stack.sink.handler.reset()
    return shared_stack


@pytest.fixture
def make_stack(tmp_path: Path, sink: Sink) -> Iterator[Callable[..., Stack]]:
    """Start a whole stack delivering to ``sink``: ``make_stack(**Stack kwargs)``."""
    stacks: list[Stack] = []

    def factory(start: bool = True, **kwargs) -> Stack:
        kwargs.setdefault("users", default_users())
        kwargs.setdefault("next_hop", ("127.0.0.1", sink.port))
        stack = Stack(tmp_path / f"stack{len(stacks)}", **stack_options(**kwargs))
        stack.sink = sink
        stacks.append(stack)
        if start:
            try:
                stack.start()
            except Exception:
                stack.stop()
                raise
        return stack

    yield factory
    for stack in stacks:
        stack.stop(at_once=True)
    for stack in stacks:
        assert_within_grants(stack)


@pytest.fixture
def raw() -> Iterator[Callable[..., "RawClient"]]:
    """Raw SMTP sockets (``raw(port, tls=False, source=None)``), all closed when the test ends."""
    from .smtp import RawClient, insecure_context

    opened: list[RawClient] = []

    def factory(port: int, tls: bool = False, timeout: float = 10, source: str | None = None) -> RawClient:
        client = RawClient(port, timeout=timeout, source=source)
        opened.append(client)
        if tls:
            client.sock = insecure_context().wrap_socket(client.sock, server_hostname="localhost")
        return client

    yield factory
    for client in opened:
        client.close()


@pytest.fixture
def otlp():
    """A real OTLP/gRPC receiver; stacks started with ``env=otlp_env(otlp)`` export to it."""
    from .otlp import OtlpReceiver

    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


def otlp_env(receiver, **extra: dict[str, str]) -> dict[str, dict[str, str]]:
    """Per-service environment that exports every span to ``receiver`` without delay."""
    common = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    return {svc: {**common, **extra.get(svc, {})} for svc in ("frontend", "policy", "rewriter", "relay")}


