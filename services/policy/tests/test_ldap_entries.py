"""What the ldap directory makes of an entry, without a server: the filter escaping (RFC 4515),
the addresses among attribute values (AD's prefixes), and the userPassword forms compare mode
accepts. (Against slapd: test_ldap_directory.py.)"""

from __future__ import annotations

import pytest
from argon2 import PasswordHasher
from passlib.hash import bcrypt, sha512_crypt

from submitd_common.users import verify_password
from submitd_policy.directories.ldap_entries import UNUSABLE_HASH, addresses, escape, fill, password_hash


@pytest.mark.parametrize("value,escaped", [
    # RFC 4515 §4's examples, and NUL
    ("Parens R Us (for all your parenthetical needs)", r"Parens R Us \28for all your parenthetical needs\29"),
    ("*", r"\2a"),
    (r"C:\MyFile", r"C:\5cMyFile"),
    ("a\0b", r"a\00b"),
    ("Lučić", "Lučić"),  # UTF-8 stays as it is
])
def test_filter_values_are_escaped_as_rfc_4515_says(value, escaped):
    assert escape(value) == escaped


def test_a_template_gets_each_placeholder_escaped_and_nothing_else():
    template = "(&(objectClass=groupOfNames)(member={dn})(cn={login}))"
    assert fill(template, dn="cn=Smith\\, J (ops),dc=x", login="*") == \
        r"(&(objectClass=groupOfNames)(member=cn=Smith\5c, J \28ops\29,dc=x)(cn=\2a))"


def test_addresses_keep_smtp_values_without_their_prefix_and_drop_other_prefixes():
    values = ["SMTP:Erin@Example.TEST", "smtp:e.jones@example.test", "X500:/o=Example/cn=erin", "sip:erin@example.test",
              "plain@example.test", "not an address"]
    assert addresses(values) == {"Erin@example.test", "e.jones@example.test", "plain@example.test"}


FAST_ARGON2 = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)


STORED = {  # as userPassword holds them (made when the test runs: the salts differ per process)
    "argon2": lambda: "{ARGON2}" + FAST_ARGON2.hash("pw"),  # OpenLDAP's argon2 module
    "crypt-sha512": lambda: "{CRYPT}" + sha512_crypt.using(rounds=5000).hash("pw"),
    "crypt-bcrypt": lambda: "{CRYPT}" + bcrypt.using(ident="2b", rounds=4).hash("pw"),
    "blf-crypt": lambda: "{BLF-CRYPT}" + bcrypt.using(ident="2y", rounds=4).hash("pw"),  # Dovecot's name
    "lowercase-scheme": lambda: "{crypt}" + sha512_crypt.using(rounds=5000).hash("pw"),  # names are case-insensitive
}


@pytest.mark.parametrize("form", sorted(STORED))
def test_compare_mode_reads_the_hashes_submitd_can_verify(form):
    hashed = password_hash([STORED[form]()])
    assert verify_password(hashed, "pw") and not verify_password(hashed, "pw2")


@pytest.mark.parametrize("stored", [
    ["pw"],  # cleartext in the directory: never compared
    ["{SSHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g="],
    ["{CRYPT}$1$saltsalt$6SNdNaZLKst2LlSm7oPPL1"],  # MD5-crypt: too weak to accept
    [],
], ids=["cleartext", "ssha", "md5-crypt", "none"])
def test_other_hashes_match_no_password(stored):
    assert password_hash(stored) == UNUSABLE_HASH
    assert not verify_password(password_hash(stored), "pw")


def test_the_first_usable_of_several_values_is_taken():
    good = "{CRYPT}" + sha512_crypt.using(rounds=5000).hash("pw")
    assert verify_password(password_hash(["{SSHA}xyz", good]), "pw")
