"""Services know who calls them (issue 25, item 4): under mutual TLS each service presents a
certificate that names it, and policy and the rewriter answer only the callers that need them,
the frontend, and the relay for the reports it has signed. Real services, real certificates from
the dev kit's CA, calls made here with another service's certificate."""

from __future__ import annotations

import json
import re
from pathlib import Path

import dkim as dkimpy
import grpc
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from submitd.v1 import common_pb2, policy_pb2, policy_pb2_grpc, rewriter_pb2, rewriter_pb2_grpc
from submitd_common.ids import new_queue_id
from submitd_devkit.certs import CertificateAuthority
from submitd_devkit.stack import Stack
from submitd_devkit.testing.users import ALICE, ALICE_PASSWORD
from submitd_devkit.testing.smtp import logged_in
from submitd_devkit.testing.waiting import eventually
from submitd_rewriter import dkim

MESSAGE = f"From: Alice <{ALICE}>\r\nTo: bob@example.net\r\nSubject: who calls\r\n\r\nhello\r\n".encode()


def login_at_policy(stack: Stack, credentials: grpc.ChannelCredentials) -> list[policy_pb2.Verdict]:
    """A session of our own on a Sessions stream: a connection from an address of our choosing
    and AUTH PLAIN with Alice's password, as the frontend would send them. The verdicts, or
    grpc.RpcError."""
    plain = f"\0{ALICE}\0{ALICE_PASSWORD}".encode()
    request = policy_pb2.SessionRequest(id=1, session_id="direct", events=[
        policy_pb2.SessionEvent(connect=policy_pb2.Connect(
            session_id="direct", peer_address="198.51.100.7", peer_port=40000, local_port=587,
            tls=policy_pb2.TlsInfo(version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256"))),
        policy_pb2.SessionEvent(auth_start=policy_pb2.AuthStart(
            mechanism="PLAIN", has_initial_response=True, initial_response=plain)),
    ])
    with grpc.secure_channel(f"127.0.0.1:{stack.ports.policy}", credentials) as ch:
        replies = policy_pb2_grpc.PolicyStub(ch).Sessions(iter([policy_pb2.SessionBatch(requests=[request])]), timeout=10)
        for batch in replies:
            return list(batch.replies[0].verdicts)
    raise AssertionError("policy ended the stream without a verdict")


def refusal(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def health(stack: Stack, port: int, credentials: grpc.ChannelCredentials) -> int:
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def rewrite(stack: Stack, credentials: grpc.ChannelCredentials, method: str, *, complete: bool = True):
    """One message through one of the rewriter's methods: ``Rewrite`` and ``RewriteWhole`` hand the
    signed message back, ``Submit`` and ``SubmitMany`` queue it. Returns what came back."""
    envelope = common_pb2.Envelope(queue_id=new_queue_id(), return_path=ALICE, authenticated_user=ALICE,
                                   recipients=[common_pb2.Recipient(address="bob@example.net")])
    requests = [rewriter_pb2.RewriteRequest(envelope=envelope), rewriter_pb2.RewriteRequest(chunk=MESSAGE)]
    with grpc.secure_channel(f"127.0.0.1:{stack.ports.rewriter}", credentials) as ch:
        stub = rewriter_pb2_grpc.RewriterStub(ch)
        whole = rewriter_pb2.WholeMessage(envelope=envelope, message=MESSAGE)
        if method == "Rewrite":
            return list(stub.Rewrite(iter(requests), timeout=10))
        if method == "Submit":  # (queued only once it is said to be whole)
            return stub.Submit(iter(requests + [rewriter_pb2.RewriteRequest(end=True)] * complete), timeout=10)
        if method == "SubmitMany":
            batch = rewriter_pb2.WholeBatch(items=[rewriter_pb2.WholeItem(id=1, message=whole)])
            return [r.result for b in stub.SubmitMany(iter([batch]), timeout=10) for r in b.replies]
        return stub.RewriteWhole(whole, timeout=10)


def refused_in_log(stack: Stack, service: str) -> list[tuple[str, str]]:
    lines = [json.loads(line) for line in stack.log_path(service).read_text().splitlines() if line.startswith("{")]
    return [(e["caller"], e["method"]) for e in lines if e.get("msg") == "gRPC caller refused"]


def test_policy_answers_the_frontend_and_no_other_service(make_stack):
    stack: Stack = make_stack()
    # The frontend's certificate: a real SMTP login and message through the stack.
    with logged_in(stack) as client:
        client.sendmail(ALICE, ["bob@example.net"], MESSAGE)
    stack.sink.handler.wait_for(1, 20)

    # The same session asked directly works only with the frontend's certificate: any other
    # service's could guess passwords with a new "client address" each time.
    verdicts = login_at_policy(stack, stack.grpc_credentials("frontend"))
    assert [v.accept for v in verdicts] == [True, True] and verdicts[1].authenticated_user == ALICE
    for other in ("relay", "rewriter"):
        code = refusal(lambda: login_at_policy(stack, stack.grpc_credentials(other)))
        assert code == grpc.StatusCode.PERMISSION_DENIED, other
    assert refused_in_log(stack, "policy") == [("relay", "/submitd.v1.Policy/Sessions"),
                                               ("rewriter", "/submitd.v1.Policy/Sessions")]
    # Health stays open to every certificate of the CA (peers and probes ask it).
    assert health(stack, stack.ports.policy, stack.grpc_credentials("relay")) == health_pb2.HealthCheckResponse.SERVING


def dkim_dns(stack: Stack):
    """The DNS answers for the stack's DKIM keys, as dkimpy asks them."""
    keydir = Path(stack.dkim_keys_file).parent
    records = {}
    for entry in yaml.safe_load(stack.dkim_keys_file.read_text())["keys"]:
        key = serialization.load_pem_private_key((keydir / entry["key_file"]).read_bytes(), password=None)
        records[f"{entry['selector']}._domainkey.{entry['domain']}."] = dkim.txt_value(key)
    return lambda name, timeout=5: records.get(name.decode(), b"")


def signatures_verify(message: bytes, dns) -> list[bool]:
    header = message.split(b"\r\n\r\n", 1)[0]  # not the signatures of a message a report carries
    count = len(re.findall(rb"(?mi)^DKIM-Signature:", header))
    d = dkimpy.DKIM(message)
    return [bool(d.verify(idx=i, dnsfunc=dns)) for i in range(count)]


def test_the_rewriter_signs_the_relays_reports_and_takes_nothing_else_from_it(make_stack):
    stack: Stack = make_stack(start=False, env={"relay": {"BOUNCE_FROM": "postmaster@example.test"}})
    stack.make_dkim_keys("example.test")
    stack.start()
    dns = dkim_dns(stack)
    stack.sink.handler.rcpt_replies["nobody@example.net"] = "550 5.1.1 no such user"
    with logged_in(stack) as client:  # the frontend's message, and the relay's report on it
        client.sendmail(ALICE, ["nobody@example.net", "bob@example.net"], MESSAGE)
    eventually(lambda: len(stack.sink.handler.messages) == 2, 30)
    by_sender = {m.mail_from: m for m in stack.sink.handler.messages}
    assert signatures_verify(by_sender[ALICE].data, dns) == [True, True]
    assert signatures_verify(by_sender[""].data, dns) == [True, True], "the report went out unsigned"

    # The relay may ask for Rewrite alone: a user's message through the frontend's methods, no.
    relay = stack.grpc_credentials("relay")
    for method in ("SubmitMany", "Submit", "RewriteWhole"):
        assert refusal(lambda: rewrite(stack, relay, method)) == grpc.StatusCode.PERMISSION_DENIED, method
    # The frontend may only have what it signs queued: never a signed message handed back to it.
    frontend = stack.grpc_credentials("frontend")
    for method in ("Rewrite", "RewriteWhole"):
        assert refusal(lambda: rewrite(stack, frontend, method)) == grpc.StatusCode.PERMISSION_DENIED, method
    # Policy never calls the rewriter; its certificate may not.
    assert refusal(lambda: rewrite(stack, stack.grpc_credentials("policy"), "Rewrite")) == grpc.StatusCode.PERMISSION_DENIED
    [answer] = rewrite(stack, frontend, "SubmitMany")  # the frontend's own call: queued
    assert answer.queued
    assert rewrite(stack, frontend, "Submit").queued
    cut = rewrite(stack, frontend, "Submit", complete=False)  # a stream that just stops is no message
    assert (cut.WhichOneof("result"), cut.reply.code) == ("reply", 451)
    assert refused_in_log(stack, "rewriter") == [
        ("relay", "/submitd.v1.Rewriter/SubmitMany"), ("relay", "/submitd.v1.Rewriter/Submit"),
        ("relay", "/submitd.v1.Rewriter/RewriteWhole"), ("frontend", "/submitd.v1.Rewriter/Rewrite"),
        ("frontend", "/submitd.v1.Rewriter/RewriteWhole"), ("policy", "/submitd.v1.Rewriter/Rewrite")]
    eventually(lambda: len(stack.sink.handler.messages) == 4, 30)  # and delivered


def test_a_certificate_from_another_ca_is_refused_at_the_handshake(make_stack, tmp_path):
    stack: Stack = make_stack()
    ca = stack.grpc_ca.path.read_bytes()  # the client trusts the servers: only its own certificate differs
    cert, key = CertificateAuthority(tmp_path / "other-ca").issue("frontend")
    impostor = grpc.ssl_channel_credentials(ca, key.read_bytes(), cert.read_bytes())
    assert refusal(lambda: login_at_policy(stack, impostor)) == grpc.StatusCode.UNAVAILABLE
    assert refusal(lambda: rewrite(stack, impostor, "SubmitMany")) == grpc.StatusCode.UNAVAILABLE
    assert refusal(lambda: health(stack, stack.ports.policy, impostor)) == grpc.StatusCode.UNAVAILABLE
    # The stack's own "frontend" certificate, on the same calls, is answered.
    assert login_at_policy(stack, stack.grpc_credentials("frontend"))[1].authenticated_user == ALICE
    assert rewrite(stack, stack.grpc_credentials("frontend"), "SubmitMany")[0].queued
