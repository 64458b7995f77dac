"""RFC 6409 §6.3: the addresses a message says it is from (From), was sent by (Sender) and was
resent from and by (Resent-From, Resent-Sender) must be the user's, every instance of them,
whatever CHECK_HEADER_ADDRESSES says (it turns off the syntax checks, not this one)."""

import pytest
import yaml

from submitd.v1 import common_pb2, rewriter_pb2
from submitd_common.files import WatchedFile
from submitd_common.users import User, UserDB
from submitd_rewriter.message import Options, Refused, rewrite_header
from submitd_rewriter.service import RewriterService
from submitd_rewriter.settings import Settings

ALICE = "alice@example.net"
USERS = UserDB(
    {ALICE: User(ALICE, "x", send_as=frozenset({"@shared.example.net"}))},
    {"team@example.net": frozenset({ALICE})},
)
OWNED = {  # an address of each kind the user may use: her own, an alias, a granted domain
    "From": b"Team <team@example.net>",
    "Sender": ALICE.encode(),
    "Resent-From": b"anyone@shared.example.net",
    "Resent-Sender": b"<" + ALICE.encode() + b">",
}


def run(header: bytes, **opts) -> bytes:
    envelope = common_pb2.Envelope(authenticated_user=ALICE)
    return rewrite_header(header, envelope, USERS, Options(domain="mx.example.net", **opts)).header


def header(**values: bytes) -> bytes:
    fields = {**OWNED, **{name.replace("_", "-"): value for name, value in values.items()}}
    return b"".join(name.encode() + b": " + value + b"\r\n" for name, value in fields.items())


@pytest.mark.parametrize("check_addresses", [True, False], ids=["syntax-checked", "CHECK_HEADER_ADDRESSES=false"])
@pytest.mark.parametrize("name", OWNED)
def test_each_originator_field_must_be_owned_whatever_the_address_setting(name, check_addresses):
    assert run(header(), check_addresses=check_addresses).startswith(header()), "all owned: accepted as is"
    with pytest.raises(Refused) as err:
        run(header(**{name: b"Boss <ceo@example.net>"}), check_addresses=check_addresses)
    assert (err.value.reply.code, err.value.reply.enhanced) == (550, "5.7.1")
    assert err.value.reply.text == f"{name} header address <ceo@example.net> not owned by user {ALICE}"


def test_every_resent_block_is_checked_not_only_the_newest():
    older = b"Resent-From: ceo@example.net\r\nResent-Sender: " + ALICE.encode() + b"\r\n"
    with pytest.raises(Refused) as err:
        run(header() + older)
    assert err.value.reply.text.startswith("Resent-From header address <ceo@example.net>")


@pytest.mark.parametrize("name", ["From", "Resent-From"])
def test_an_unparseable_originator_is_554_560_when_its_owner_must_be_checked(name):
    # Without CHECK_HEADER_ADDRESSES the address is still needed for the ownership check: an
    # address that does not parse cannot be shown to be the user's.
    given = header(**{name: b"ceo@@example.net"})
    with pytest.raises(Refused) as err:
        run(given, check_addresses=False)
    assert (err.value.reply.code, err.value.reply.enhanced) == (554, "5.6.0")
    assert f"Invalid address in {name} header" in err.value.reply.text
    # No ownership check asked for: CHECK_HEADER_ADDRESSES=false lets it through, as it says.
    assert run(given, check_addresses=False, check_from=False).startswith(given)


def test_no_sender_is_added_when_the_user_is_the_from_whatever_the_address_setting():
    given = b"From: Alice <" + ALICE.encode() + b">\r\n"
    for check_addresses in (True, False):
        assert b"Sender:" not in run(given, check_addresses=check_addresses)
    assert b"\r\nSender: " + ALICE.encode() + b"\r\n" in run(b"From: team@example.net\r\n", check_addresses=False)


def test_the_rewriter_checks_resent_from_with_its_address_checks_turned_off(tmp_path):
    users = tmp_path / "users.yaml"
    users.write_text(yaml.safe_dump({"users": {ALICE: {"password": "x", "send_as": ["@shared.example.net"]}}}))
    service = RewriterService(Settings(message_id_domain="mx.example.net", check_header_addresses=False),
                              users=WatchedFile(str(users), UserDB.load))
    envelope = common_pb2.Envelope(authenticated_user=ALICE, return_path=ALICE)
    for resent, code in ((b"anyone@shared.example.net", 0), (b"ceo@example.net", 550)):
        message = b"From: " + ALICE.encode() + b"\r\nResent-From: " + resent + b"\r\n\r\nbody\r\n"
        result = service.rewrite_whole(rewriter_pb2.WholeMessage(envelope=envelope, message=message))
        assert result.reject.code == code
