"""Faults with real processes: NATS, relay, next hop and dependencies going away."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from submitd_devkit.sink import Sink
from submitd_devkit.stack import Stack
from submitd_devkit.testing.metrics import sample
from submitd_devkit.testing.users import ALICE
from submitd_devkit.testing.smtp import logged_in, reply_of
from submitd_devkit.testing.waiting import eventually

from relay_helpers import queue_depth

pytestmark = pytest.mark.timeout(120)


def message(n: int | str) -> bytes:
    return f"From: {ALICE}\r\nTo: bob@example.net\r\nSubject: message {n}\r\n\r\nbody {n}\r\n".encode()


def subjects(sink: Sink) -> list[str]:
    out = []
    for m in sink.handler.messages:
        for line in m.data.split(b"\r\n"):
            if line.startswith(b"Subject: "):
                out.append(line[9:].decode())
    return sorted(out)


def readyz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def grpc_status(stack: Stack, port: int) -> int:
    """grpc.health.v1 as a peer asks it (with a certificate of the stack's CA)."""
    with grpc.secure_channel(f"127.0.0.1:{port}", stack.grpc_credentials("devkit")) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status


def test_nats_lost_before_end_of_data_gives_451_then_retry_is_delivered_once(make_stack):
    stack: Stack = make_stack(env={"rewriter": {"PUBLISH_TIMEOUT": "2"}})
    with logged_in(stack) as client:
        client.mail(ALICE)
        client.rcpt("bob@example.net")
        assert client.docmd("DATA")[0] == 354
        client.send(message("first try")[:40])
        stack.nats.stop()
        client.send(message("first try")[40:] + b".\r\n")
        code, text = client.getreply()
        assert (code, text[:5]) == (451, b"4.3.0")
        # The session goes on, and a new attempt while NATS is away is refused up front.
        assert client.noop()[0] == 250
        client.mail(ALICE)
        client.rcpt("bob@example.net")
        assert reply_of(client, "DATA")[0] == 451
        client.rset()
        eventually(lambda: readyz(stack.ports.frontend_http)[0] == 503)

        stack.nats.start()
        eventually(lambda: readyz(stack.ports.frontend_http)[0] == 200)
        client.sendmail(ALICE, ["bob@example.net"], message("retry"))
    stack.sink.handler.wait_for(1, 20)
    time.sleep(2)  # room for a stray second copy to show up
    assert subjects(stack.sink) == ["message retry"], "the refused attempt must not be queued"


def test_messages_wait_while_relay_is_down_and_none_is_lost(make_stack):
    stack: Stack = make_stack()
    stack.stop_service("relay")
    with logged_in(stack) as client:
        for n in range(30):
            client.sendmail(ALICE, ["bob@example.net"], message(n))
    assert queue_depth(stack) == 30, "every accepted message waits in the queue"
    stack.start_service("relay")
    stack.sink.handler.wait_for(30, 30)
    time.sleep(1)
    assert subjects(stack.sink) == sorted(f"message {n}" for n in range(30))
    assert eventually(lambda: queue_depth(stack) == 0, 10), "delivered messages leave the queue"


def test_relay_killed_hard_mid_delivery_loses_nothing(make_stack):
    """kill -9 while the next hop is taking messages: what the relay had not acknowledged is
    delivered again after ACK_WAIT by the restarted relay (at least once, never lost)."""
    stack: Stack = make_stack(env={"relay": {"ACK_WAIT": "3"}})
    stack.sink.handler.data_delay = 2.0  # each delivery stays in flight for 2 s
    with logged_in(stack) as client:
        for n in range(10):
            client.sendmail(ALICE, ["bob@example.net"], message(n))
    eventually(lambda: stack.sink.handler.concurrent > 0, 15)
    delivered_before_the_kill = len(stack.sink.handler.messages)
    stack.stop_service("relay", sig=9)
    assert delivered_before_the_kill < 10, "the kill came mid-delivery"
    stack.sink.handler.data_delay = 0.0
    stack.start_service("relay")
    expected = {f"message {n}" for n in range(10)}
    eventually(lambda: set(subjects(stack.sink)) == expected, 40)
    time.sleep(1)
    # A message the next hop took while its relay died is sent again: at most once more for
    # each delivery that was in flight at one time.
    assert len(subjects(stack.sink)) <= 10 + stack.sink.handler.max_concurrent


def test_next_hop_temporary_failure_is_retried(make_stack):
    stack: Stack = make_stack(env={"relay": {"RETRY_SCHEDULE": "[0.5]"}})
    stack.sink.handler.data_replies.extend(["451 4.3.0 busy, try later", "421 4.4.2 closing"])
    with logged_in(stack) as client:
        client.sendmail(ALICE, ["bob@example.net"], message("deferred"))
    stack.sink.handler.wait_for(1, 20)
    assert subjects(stack.sink) == ["message deferred"]
    assert not stack.sink.handler.data_replies, "both failures were seen before the delivery"


def test_unreachable_next_hop_is_retried_until_it_comes_up(make_stack, tmp_path):
    from submitd_devkit.ports import free_port

    port = free_port()
    stack: Stack = make_stack(next_hop=("127.0.0.1", port), env={"relay": {"RETRY_SCHEDULE": "[0.5]"}})
    relay = stack.ports.relay_http
    with logged_in(stack) as client:
        client.sendmail(ALICE, ["bob@example.net"], message("later"))
    # Nothing listens yet: an attempt fails (deferred, not bounced) before the next hop comes up.
    eventually(lambda: sample(relay, "submitd_delivery_attempts_total", result="deferred") >= 1, timeout=20)
    late = Sink(port=port).start()
    try:
        late.handler.wait_for(1, 20)
        assert subjects(late) == ["message later"], "delivered, and no report of a failure went out"
    finally:
        late.stop()
    # (counted once the next hop has answered)
    eventually(lambda: sample(relay, "submitd_delivery_attempts_total", result="delivered") >= 1)
    assert sample(relay, "submitd_delivery_attempts_total", result="delivered") == 1
    assert sample(relay, "submitd_delivery_attempts_total", result="failed") == 0


def test_partial_failure_retries_only_the_deferred_recipient(make_stack):
    stack: Stack = make_stack(env={"relay": {"RETRY_SCHEDULE": "[0.5]"}})
    stack.sink.handler.rcpt_replies["carol@example.org"] = "450 4.2.1 mailbox busy"
    with logged_in(stack) as client:
        client.sendmail(ALICE, ["bob@example.net", "carol@example.org"], message("partial"))
    [first] = stack.sink.handler.wait_for(1, 20)
    assert first.rcpt_tos == ["bob@example.net"]
    del stack.sink.handler.rcpt_replies["carol@example.org"]
    msgs = stack.sink.handler.wait_for(2, 20)
    assert [m.rcpt_tos for m in msgs] == [["bob@example.net"], ["carol@example.org"]]
    time.sleep(1.5)
    assert len(stack.sink.handler.messages) == 2, "bob must not get a second copy"


def test_health_follows_nats(make_stack):
    stack: Stack = make_stack()
    p = stack.ports
    assert readyz(p.frontend_http)[0] == 200 and readyz(p.relay_http)[0] == 200
    assert grpc_status(stack, p.policy) == health_pb2.HealthCheckResponse.SERVING
    stack.nats.stop()
    # The rewriter writes the queue: unready without NATS, and the frontend (which has no NATS
    # of its own) unready because its rewriter is.
    eventually(lambda: readyz(p.rewriter_http)[0] == 503)
    assert readyz(p.rewriter_http)[1]["checks"]["nats"] is False
    eventually(lambda: readyz(p.frontend_http)[0] == 503)
    assert readyz(p.frontend_http)[1]["checks"]["rewriter"] is False
    eventually(lambda: readyz(p.relay_http)[0] == 503)
    eventually(lambda: grpc_status(stack, p.policy) == health_pb2.HealthCheckResponse.NOT_SERVING)
    stack.nats.start()
    eventually(lambda: readyz(p.rewriter_http)[0] == 200)
    eventually(lambda: readyz(p.frontend_http)[0] == 200)
    eventually(lambda: readyz(p.relay_http)[0] == 200)
    eventually(lambda: grpc_status(stack, p.policy) == health_pb2.HealthCheckResponse.SERVING)


@pytest.mark.parametrize("dependency", ["policy", "rewriter"])
def test_frontend_unready_without_its_grpc_dependency(make_stack, dependency):
    stack: Stack = make_stack()
    stack.stop_service(dependency)
    status, body = eventually(lambda: (r := readyz(stack.ports.frontend_http))[0] == 503 and r)
    assert body["checks"][dependency] is False
    stack.start_service(dependency)
    eventually(lambda: readyz(stack.ports.frontend_http)[0] == 200)


def test_policy_down_mid_session_is_a_4xx_never_5xx(make_stack):
    stack: Stack = make_stack(env={"policy": {"DRAIN_SECONDS": "1"}})
    with logged_in(stack) as client:
        stack.stop_service("policy")
        code, text = reply_of(client, f"MAIL FROM:<{ALICE}>")
    assert code == 421 and text.startswith("4.3.2")
    # A policy that comes back serves new sessions over new streams.
    stack.start_service("policy")
    stack.wait_ready("policy")
    with logged_in(stack) as client:
        client.sendmail(ALICE, ["bob@example.net"], message("after policy came back"))
    stack.sink.handler.wait_for(1, 20)


def test_rewriter_down_at_end_of_data_is_451(make_stack):
    stack: Stack = make_stack()
    with logged_in(stack) as client:
        client.mail(ALICE)
        client.rcpt("bob@example.net")
        stack.stop_service("rewriter")
        code, text = client.data(message("no rewriter"))
        assert (code, text[:5]) == (451, b"4.3.0")
        assert client.noop()[0] == 250, "the session survives"


def test_slow_policy_is_a_4xx(make_stack):
    import os
    import signal

    stack: Stack = make_stack(env={"frontend": {"POLICY_TIMEOUT": "1"}})
    with logged_in(stack) as client:
        os.kill(stack.procs["policy"].pid, signal.SIGSTOP)
        try:
            code, text = reply_of(client, f"MAIL FROM:<{ALICE}>")
        finally:
            os.kill(stack.procs["policy"].pid, signal.SIGCONT)
    assert code == 421 and text.startswith("4.3.2")
    with logged_in(stack) as client:  # the service recovers for the next session
        client.sendmail(ALICE, ["bob@example.net"], message("after a stall"))
    stack.sink.handler.wait_for(1, 20)


def test_full_queue_is_452_and_recovers(make_stack):
    stack: Stack = make_stack(env={"relay": {"QUEUE_MAX_BYTES": "6000"}})
    stack.stop_service("relay")
    accepted = []
    with logged_in(stack) as client:
        for n in range(20):
            client.mail(ALICE)
            client.rcpt("bob@example.net")
            code, text = client.data(message(n) + b"x" * 900 + b"\r\n")
            if code != 250:
                break
            accepted.append(n)
        assert (code, text[:5]) == (452, b"4.3.1"), "a full queue refuses new mail with 452"
        assert accepted, "some messages fit before the queue was full"
        assert client.noop()[0] == 250
    stack.start_service("relay")
    stack.sink.handler.wait_for(len(accepted), 30)
    assert subjects(stack.sink) == sorted(f"message {n}" for n in accepted), "nothing accepted was dropped"
    with logged_in(stack) as client:  # space freed: accepted again
        client.sendmail(ALICE, ["bob@example.net"], message("after"))
    stack.sink.handler.wait_for(len(accepted) + 1, 30)


def test_policy_restarts_with_changed_windows_on_the_same_nats(make_stack):
    stack: Stack = make_stack()
    stack.stop_service("policy")
    stack.extra_env["policy"] = {"RATE_WINDOW": "600", "AUTH_LOCKOUT_SECONDS": "60"}
    stack.start_service("policy")
    stack.wait_ready("policy")
    with logged_in(stack) as client:
        assert client.mail(ALICE)[0] == 250


def test_grpc_between_services_over_mutual_tls(make_stack):
    stack: Stack = make_stack(grpc_tls=True)
    with logged_in(stack) as client:  # AUTH (policy) and the message (rewriter) both over mTLS
        client.sendmail(ALICE, ["bob@example.net"], message("over mtls"))
    stack.sink.handler.wait_for(1, 20)
    assert subjects(stack.sink) == ["message over mtls"]
    # A client without a certificate is refused by the policy service.
    with grpc.insecure_channel(f"127.0.0.1:{stack.ports.policy}") as ch:
        with pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
    ca = stack.grpc_ca.path.read_bytes()  # trusts the server, but presents no client certificate
    with grpc.secure_channel(f"127.0.0.1:{stack.ports.policy}", grpc.ssl_channel_credentials(ca)) as ch:
        with pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
