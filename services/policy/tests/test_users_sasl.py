import pytest

from submitd_policy.sasl import Login, Plain, SaslMalformed
from submitd_common.users import User, UserDB


def user(*grants: str, login: str = "alice@example.net") -> User:
    return User(login=login, password_hash="x", send_as=frozenset(grants))


def test_login_address_may_send_as_itself_and_subaddresses():
    u = user()
    assert u.may_send_as("alice@example.net")
    assert u.may_send_as("alice@EXAMPLE.net")
    assert u.may_send_as("alice+list@example.net")
    assert not u.may_send_as("bob@example.net")
    assert not u.may_send_as("alice@example.org")


def test_domain_grant():
    u = user("@sales.example.net", login="alice")
    assert u.may_send_as("anyone@sales.example.net")
    assert not u.may_send_as("alice@example.net"), "a login that is not an address grants nothing"


def test_users_file_requires_hashes(tmp_path):
    path = tmp_path / "users.yaml"
    path.write_text("users:\n  alice: {send_as: [a@example.net]}\n")
    with pytest.raises(ValueError):
        UserDB.load(str(path))


def test_plain():
    assert Plain().start(None).challenge == b""
    creds = Plain().start(b"\x00alice\x00pw").credentials
    assert (creds.authzid, creds.login, creds.password) == ("", "alice", "pw")
    for bad in (b"alice\x00pw", b"\x00\x00pw", b"a\x00b\x00c\x00d"):
        with pytest.raises(SaslMalformed):
            Plain().start(bad)


def test_login():
    mech = Login()
    assert mech.start(None).challenge == b"Username:"
    assert mech.respond(b"alice").challenge == b"Password:"
    assert mech.respond(b"pw").credentials.password == "pw"
