"""RFC 8689 on the submission side, through the real stack: REQUIRETLS offered and taken only
under TLS, and what the sender asked for (MAIL FROM ... REQUIRETLS, or a "TLS-Required: No"
header field) on the queue entry the relay reads. The relay's side (delivery only to a next hop
that offers REQUIRETLS over verified TLS) has tests of its own; the dev kit's next hop that
offers REQUIRETLS is checked here."""

from __future__ import annotations

import asyncio
import email
import smtplib
import ssl

import nats
import pytest

from submitd.v1 import common_pb2, queue_pb2
from submitd_common import jetstream
from submitd_devkit.certs import make_self_signed
from submitd_devkit.sink import Sink
from submitd_devkit.stack import Stack
from submitd_devkit.testing.smtp import connect, insecure_context, logged_in, reply_of
from submitd_devkit.testing.users import ALICE

pytestmark = pytest.mark.timeout(90)

HEADER = f"From: {ALICE}\r\nTo: bob@example.net\r\nSubject: secret\r\n".encode()
NEEDS_TLS = "5.7.10 REQUIRETLS needs an encrypted session: send STARTTLS first"


def test_requiretls_is_offered_after_starttls_and_refused_in_the_clear(stack):
    with connect(stack, starttls=False) as client:
        assert client.has_extn("starttls") and not client.has_extn("requiretls")
        # The frontend refuses it before anything else is asked (AUTH needs TLS here too).
        assert reply_of(client, f"MAIL FROM:<{ALICE}> REQUIRETLS") == (530, NEEDS_TLS)
        client.starttls(context=insecure_context())
        client.ehlo("client.example.test")
        assert client.has_extn("requiretls")
    with connect(stack, implicit_tls=True) as client:
        assert client.has_extn("requiretls")


def submit(stack: Stack, message: bytes, mail_options: tuple[str, ...] = ()) -> str:
    """One message over STARTTLS and AUTH; its queue id."""
    with logged_in(stack) as client:
        assert client.mail(ALICE, list(mail_options))[0] == 250
        assert client.rcpt("bob@example.net")[0] == 250
        code, text = client.data(message)
    assert code == 250, text
    return text.decode().rsplit(" ", 1)[1]


async def queued_envelope(stack: Stack, message: bytes, mail_options: tuple[str, ...] = ()) -> common_pb2.Envelope:
    """Submit ``message`` and return the envelope of its queue entry as the relay reads it (a
    plain NATS subscriber to the queue's subject sees every entry the frontend publishes)."""
    nc = await nats.connect(stack.nats.url)
    try:
        entries = await nc.subscribe(jetstream.SUBMIT_SUBJECT)
        queue_id = await asyncio.to_thread(submit, stack, message, mail_options)
        while True:
            entry = queue_pb2.QueuedMessage.FromString((await entries.next_msg(timeout=20)).data)
            if entry.envelope.queue_id == queue_id:
                return entry.envelope
    finally:
        await nc.close()


@pytest.mark.parametrize("header, flags", [
    (HEADER, (True, False)),
    (HEADER + b"TLS-Required: No\r\n", (True, False)),  # RFC 8689 §4.1: REQUIRETLS wins
], ids=["requiretls", "requiretls-and-tls-required-no"])
async def test_mail_from_requiretls_under_tls_is_queued_with_require_tls(stack, header, flags):
    envelope = await queued_envelope(stack, header + b"\r\nfor your eyes only\r\n", ("REQUIRETLS",))
    assert (envelope.require_tls, envelope.tls_optional) == flags


async def test_tls_required_no_is_queued_with_tls_optional_and_the_field_is_kept(stack):
    envelope = await queued_envelope(stack, HEADER + b"TLS-Required: No\r\n\r\nnot secret\r\n")
    assert (envelope.require_tls, envelope.tls_optional) == (False, True)
    handler = stack.sink.handler
    assert await asyncio.to_thread(handler.wait_until, lambda h: any(b"not secret" in m.data for m in h.messages), 20)
    [got] = [m for m in handler.messages if b"not secret" in m.data]
    assert email.message_from_bytes(got.data)["TLS-Required"] == "No", "the field travels on"
    plain = await queued_envelope(stack, HEADER + b"\r\nordinary\r\n")
    assert (plain.require_tls, plain.tls_optional) == (False, False)


def test_the_dev_kit_next_hop_offers_requiretls_only_when_told_and_only_after_starttls(tmp_path):
    cert, key = make_self_signed(tmp_path / "hop-tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    for requiretls in (True, False):
        hop = Sink(tls_context=context, requiretls=requiretls).start()
        try:
            with smtplib.SMTP("127.0.0.1", hop.port, timeout=10) as client:
                client.ehlo("relay.example.test")
                assert not client.has_extn("requiretls")
                assert client.mail("alice@example.test", ["REQUIRETLS"])[0] == 555, "not in the clear"
                client.rset()
                client.starttls(context=insecure_context())
                client.ehlo("relay.example.test")
                assert client.has_extn("requiretls") is requiretls
                code, _ = client.mail("alice@example.test", ["REQUIRETLS"])
                if not requiretls:
                    assert code == 555, "an unknown parameter"
                    continue
                assert code == 250
                client.rcpt("bob@example.net")
                client.data(HEADER + b"\r\nhi\r\n")
            [got] = hop.handler.wait_for(1, 10)
            assert got.mail_options == ["REQUIRETLS"]
        finally:
            hop.stop()
