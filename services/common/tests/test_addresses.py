import pytest

from submitd_common.addresses import AddressError, parse_mailbox, split_path


@pytest.mark.parametrize(
    "path,local,domain",
    [
        ("alice@example.net", "alice", "example.net"),
        ("Alice.B+tag@Example.NET", "Alice.B+tag", "example.net"),
        ('"john doe"@example.net', '"john doe"', "example.net"),
        ('"a\\"b"@example.net', '"a\\"b"', "example.net"),
        ("user@[192.0.2.1]", "user", "[192.0.2.1]"),
        ("user@[IPv6:2001:db8::1]", "user", "[ipv6:2001:db8::1]"),
        ("@relay.example,@other.example:user@example.net", "user", "example.net"),
    ],
)
def test_valid_mailboxes(path, local, domain):
    addr = parse_mailbox(path)
    assert (addr.local, addr.domain) == (local, domain)


@pytest.mark.parametrize(
    "path",
    [
        "",
        "alice",
        "@example.net",
        "alice@",
        "al ice@example.net",
        "alice..b@example.net",
        ".alice@example.net",
        "alice@exa_mple.net",
        "alice@-example.net",
        "alice@[999.0.0.1]",
        "a" * 65 + "@example.net",
        "alice@example.net\r\nRCPT TO:<x@y.z>",
        "alice\x00@example.net",
    ],
)
def test_invalid_mailboxes(path):
    with pytest.raises(AddressError):
        parse_mailbox(path)


def test_utf8_only_with_smtputf8():
    with pytest.raises(AddressError):
        parse_mailbox("jösé@exämple.net")
    addr = parse_mailbox("jösé@exämple.net", utf8=True)
    assert addr.domain == "exämple.net"


@pytest.mark.parametrize(
    "path,fqdn", [("a@example.net", True), ("a@sales", False), ("a@[192.0.2.1]", True), ("a@a.b.c", True)]
)
def test_fully_qualified(path, fqdn):
    assert parse_mailbox(path).fully_qualified is fqdn


def test_split_path_keeps_quoted_angle_bracket():
    assert split_path('<"a>b"@example.net> SIZE=10') == ('"a>b"@example.net', "SIZE=10")
    assert split_path("<> BODY=8BITMIME") == ("", "BODY=8BITMIME")
    with pytest.raises(AddressError):
        split_path("<alice@example.net")
