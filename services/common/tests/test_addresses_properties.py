"""Property-based tests of the envelope address parser."""

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from submitd_common.addresses import AddressError, parse_mailbox, split_path

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
atoms = st.text(ATEXT, min_size=1, max_size=10)
local_parts = st.lists(atoms, min_size=1, max_size=4).map(".".join).filter(lambda s: len(s) <= 64)
labels = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,20}[A-Za-z0-9])?", fullmatch=True)
domains = st.lists(labels, min_size=2, max_size=4).map(".".join)


@given(local_parts, domains)
def test_valid_addresses_parse_and_round_trip(local, domain):
    addr = parse_mailbox(f"{local}@{domain}")
    assert addr.local == local and addr.domain == domain.lower()
    assert str(addr) == f"{local}@{domain.lower()}"
    assert addr.fully_qualified


@given(local_parts, domains, st.sampled_from(["\r", "\n", "\x00", " ", "\t", "<", ">", "(", ","]), st.data())
def test_control_and_special_characters_never_pass(local, domain, bad, data):
    text = f"{local}@{domain}"
    at = data.draw(st.integers(0, len(text)))
    broken = text[:at] + bad + text[at:]
    try:
        addr = parse_mailbox(broken)
    except AddressError:
        return
    raise AssertionError(f"{broken!r} parsed as {addr!r}")


@settings(max_examples=300)
@given(st.text(max_size=80))
def test_parser_only_ever_raises_address_error(text):
    for utf8 in (False, True):
        try:
            addr = parse_mailbox(text, utf8=utf8)
        except AddressError:
            continue
        assert "\r" not in str(addr) and "\n" not in str(addr) and "\x00" not in str(addr)
        assert utf8 or str(addr).isascii()


@given(st.text(max_size=60))
def test_split_path_never_returns_an_unquoted_closing_bracket(text):
    try:
        path, rest = split_path(text)
    except AddressError:
        return
    if text.lstrip().startswith("<"):
        unquoted = path.replace('\\"', "").split('"')[::2]
        assert all(">" not in part for part in unquoted)
