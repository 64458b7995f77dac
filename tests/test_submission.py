"""A message submitted by a real client travels the whole stack to a real next hop."""

from __future__ import annotations

import email
import json
import time
import smtplib

import pytest

from submitd_devkit.testing.users import ALICE
from submitd_devkit.testing.smtp import connect, logged_in, reply_of
from submitd_devkit.testing.trace import without_received
from submitd_devkit.testing.waiting import eventually

pytestmark = pytest.mark.timeout(90)

# Odd but legal bytes the stack must not touch: a leading dot (stuffed on the wire),
# 8-bit text, trailing spaces, a tab, an empty line and a line of 998 octets.
BODY = (
    b"First line\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b"caf\xc3\xa9 8-bit \t trailing   \r\n"
    b"\r\n"
    + b"x" * 998 + b"\r\n"
    b"last line\r\n"
)
HEADER = b"From: Alice <alice@example.test>\r\nTo: bob@example.net\r\nSubject: backbone\r\n"


@pytest.mark.parametrize("implicit_tls", [False, True], ids=["starttls-587", "implicit-tls-465"])
def test_submission_arrives_completed_and_byte_identical(stack, implicit_tls):
    with logged_in(stack, implicit_tls=implicit_tls) as client:
        client.sendmail(ALICE, ["bob@example.net", "carol@example.org"], HEADER + b"\r\n" + BODY, mail_options=["BODY=8BITMIME"])
        code, text = client.noop()
        assert code == 250
    [msg] = stack.sink.handler.wait_for(1, 20)
    assert msg.mail_from == ALICE
    assert msg.rcpt_tos == ["bob@example.net", "carol@example.org"]
    header, _, body = without_received(msg.data).partition(b"\r\n\r\n")
    assert body == BODY, "the body must leave exactly as it came"
    assert header.startswith(HEADER.rstrip(b"\r\n")), "existing header fields are untouched"
    parsed = email.message_from_bytes(msg.data)
    assert email.utils.parsedate_to_datetime(parsed["Date"]) is not None
    assert parsed["Message-ID"].startswith("<") and parsed["Message-ID"].endswith("@submitd.localhost>")


def test_reply_names_the_queue_id(stack):
    with logged_in(stack) as client:
        client.mail(ALICE)
        client.rcpt("bob@example.net")
        code, text = client.data(HEADER + b"\r\nhi\r\n")
    assert code == 250
    assert text.decode().startswith("2.0.0 Ok: queued as ")
    assert stack.sink.handler.wait_for(1, 20)


def test_existing_date_and_message_id_are_kept(stack):
    msg = HEADER + b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMessage-ID: <given@example.test>\r\n\r\nbody\r\n"
    with logged_in(stack) as client:
        client.sendmail(ALICE, ["bob@example.net"], msg)
    [got] = stack.sink.handler.wait_for(1, 20)
    assert without_received(got.data) == msg


def test_mail_before_auth_is_530(stack):
    with connect(stack) as client:
        assert reply_of(client, f"MAIL FROM:<{ALICE}>") == (530, "5.7.0 Authentication required")


def test_wrong_password_is_535_and_session_goes_on(stack):
    with connect(stack) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as err:
            client.login(ALICE, "wrong")
        assert err.value.smtp_code == 535
        assert err.value.smtp_error.startswith(b"5.7.8")
        client.login(ALICE, "correct horse battery staple")
        client.sendmail(ALICE, ["bob@example.net"], HEADER + b"\r\nafter a failed login\r\n")
    assert stack.sink.handler.wait_for(1, 20)


def test_unknown_user_gets_the_same_535(stack):
    with connect(stack) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as err:
            client.login("mallory@example.test", "whatever")
    assert (err.value.smtp_code, err.value.smtp_error) == (535, b"5.7.8 Authentication credentials invalid")


def test_auth_login_mechanism(stack):
    with connect(stack) as client:
        client.user, client.password = ALICE, "correct horse battery staple"
        code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
        assert code == 235
        client.sendmail(ALICE, ["bob@example.net"], HEADER + b"\r\nvia LOGIN\r\n")
    assert stack.sink.handler.wait_for(1, 20)


def test_auth_is_not_offered_before_tls(stack):
    with connect(stack, starttls=False) as client:
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        assert reply_of(client, "AUTH PLAIN AGFsaWNlAHB3") [0] == 538


def test_extensions_never_include_etrn(stack):
    with connect(stack) as client:
        assert not client.has_extn("etrn")
        for ext in ("pipelining", "enhancedstatuscodes", "8bitmime", "size", "dsn", "smtputf8", "auth"):
            assert client.has_extn(ext), ext
        assert not client.has_extn("starttls"), "STARTTLS is not offered under TLS"


def test_sender_not_owned_is_550_571(stack):
    with logged_in(stack) as client:
        code, text = reply_of(client, "MAIL FROM:<bob@example.net>")
    assert code == 550 and text.startswith("5.7.1")


def test_send_as_grants_domain_and_subaddress(stack):
    with logged_in(stack) as client:
        assert client.mail("anyone@alias.example.test")[0] == 250
        client.rset()
        assert client.mail("alice+lists@example.test")[0] == 250


def test_null_return_path_is_accepted(stack):
    with logged_in(stack) as client:
        assert reply_of(client, "MAIL FROM:<>")[0] == 250
        assert client.rcpt("bob@example.net")[0] == 250
        assert client.data(HEADER + b"\r\nnull sender\r\n")[0] == 250
    [msg] = stack.sink.handler.wait_for(1, 20)
    assert msg.mail_from == ""


def test_trusted_network_submits_without_auth(make_stack):
    stack = make_stack(trusted_networks=["127.0.0.0/8"])
    with connect(stack, starttls=False) as client:
        client.sendmail("anyone@example.net", ["bob@example.net"], HEADER + b"\r\ntrusted\r\n")
    [msg] = stack.sink.handler.wait_for(1, 20)
    assert msg.mail_from == "anyone@example.net"


def body_chunks_stored(stack) -> tuple[int, int]:
    """(chunks ever stored, chunks stored now) in the body Object Store's stream."""
    import asyncio

    import nats

    from submitd_common import jetstream
    from submitd_common.bodies import stream_name

    async def go():
        nc = await nats.connect(stack.nats.url)
        try:
            await nc.jetstream().object_store(jetstream.BODY_BUCKET)  # exists once the frontend started
            info = await nc.jetstream().stream_info(stream_name(jetstream.BODY_BUCKET))
            return info.state.last_seq, info.state.messages
        finally:
            await nc.close()

    return asyncio.run(go())


def test_large_message_goes_through_the_object_store(stack):
    line = b"0123456789" * 7 + b"\r\n"
    body = line * (1_000_000 // len(line))  # about 1 MB: far above the 64 KiB a queue entry holds
    before, _ = body_chunks_stored(stack)
    with logged_in(stack) as client:
        client.sendmail(ALICE, ["bob@example.net"], HEADER + b"\r\n" + body)
    [msg] = stack.sink.handler.wait_for(1, 30)
    assert msg.data.endswith(b"\r\n\r\n" + body)
    after, _ = body_chunks_stored(stack)
    assert after - before >= len(body) // (256 << 10), "the body went through the Object Store in chunks"
    # and once delivered, the relay removes it
    eventually(lambda: body_chunks_stored(stack)[1] == 0, 10)


def test_users_file_changes_apply_without_restart(make_stack):
    from submitd_devkit.stack import User

    stack = make_stack()
    stack.users["newbie@example.test"] = User("fresh password", ["newbie@example.test"])
    stack.write_users()

    def login_works() -> bool:
        try:
            with connect(stack) as client:
                client.login("newbie@example.test", "fresh password")
            return True
        except smtplib.SMTPAuthenticationError:
            return False

    deadline = time.monotonic() + 10
    while not login_works():
        assert time.monotonic() < deadline, "the new user never became valid"
        time.sleep(0.3)


def test_a_long_session_logs_how_many_it_queued_and_keeps_only_the_last_ids(stack):
    # A client may keep one session for as many messages as it likes: the frontend keeps the
    # queue ids its closing log line names to the last 100 (it kept every one: ~100 bytes a
    # message, so a session of a million messages held ~100 MB), and counts them all.
    from submitd_frontend.session import LOGGED_QUEUE_IDS

    count = LOGGED_QUEUE_IDS + 20
    ids = []
    with logged_in(stack) as client:
        for n in range(count):
            client.mail(ALICE)
            client.rcpt("bob@example.net")
            code, text = client.data(HEADER + f"\r\nlong session {n}\r\n".encode())
            assert code == 250
            ids.append(text.decode().removeprefix("2.0.0 Ok: queued as "))

    def closing() -> dict | None:
        for line in reversed(stack.log_path("frontend").read_text().splitlines()):
            if line.startswith("{") and '"session closed"' in line:
                entry = json.loads(line)
                if entry.get("queued_count") == count:
                    return entry
        return None

    eventually(lambda: closing() is not None)
    assert closing()["queued"] == ids[-LOGGED_QUEUE_IDS:], "the last ids, in order"
    assert len(stack.sink.handler.wait_for(count, 30)) >= count
