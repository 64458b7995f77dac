"""A real OpenLDAP server (Debian's ``slapd``) for tests and local runs: started as a process on
127.0.0.1 free ports with a generated ``slapd.conf`` in its own directory, the schemas from
/etc/ldap/schema and one of its own (``SCHEMA``: the attributes submitd reads that no standard
schema has — mailAlternateAddress, limits, recipient rules, and Active Directory's
proxyAddresses and userAccountControl), and a small test directory (``PEOPLE``, ``GROUPS``).

    with Slapd(tmp_path / "ldap") as slapd:
        slapd.url, slapd.ldaps_url, slapd.ca_file          # plain/StartTLS, LDAPS, the CA to trust
        slapd.set_password("alice", "new one")             # ldapmodify, as an admin would
        slapd.replace("alice", "mail", ["a@example.test"])
        slapd.stop(); slapd.start()                         # the data stays

To try submitd's LDAP directory by hand (``make run`` with the settings it prints):

    .venv/bin/python -m submitd_devkit.ldap var/ldap     # 127.0.0.1:2389 (StartTLS), :2636 (LDAPS)

Every user's password is ``password_of(uid)``; their hashes are in the form the entry says
(``{ARGON2}``, ``{CRYPT}$6$``, ``{CRYPT}$2b$``), which slapd itself checks on a bind too.
Needs ``slapd`` and ``ldap-utils`` (.ci/run installs them).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .certs import make_self_signed
from .ports import free_port, wait_port

SLAPD = "/usr/sbin/slapd"
SYSTEM_SCHEMAS = ("core", "cosine", "inetorgperson", "nis")
BASE = "dc=example,dc=test"
PEOPLE_DN = f"ou=people,{BASE}"
GROUPS_DN = f"ou=groups,{BASE}"
ADMIN_DN, ADMIN_PASSWORD = f"cn=admin,{BASE}", "admin secret"
# The service accounts: one that may search (bind mode), one that may also read userPassword.
SEARCH_DN, SEARCH_PASSWORD = f"cn=submitd,ou=services,{BASE}", "search secret"
HASHES_DN, HASHES_PASSWORD = f"cn=submitd-hashes,ou=services,{BASE}", "hashes secret"

# 1.3.6.1.4.1.4203.666 is OpenLDAP's arc for experiments; the AD attributes keep their own OIDs.
SCHEMA = """\
attributetype ( 1.3.6.1.4.1.4203.666.27.1.1 NAME 'mailAlternateAddress'
  DESC 'another address the user may send as' EQUALITY caseIgnoreIA5Match
  SUBSTR caseIgnoreIA5SubstringsMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.26{256} )
attributetype ( 1.3.6.1.4.1.4203.666.27.1.2 NAME 'submitdSuspended'
  DESC 'TRUE: submitd refuses the login' EQUALITY booleanMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.7 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.4203.666.27.1.3 NAME 'submitdMessagesPerHour'
  EQUALITY integerMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.4203.666.27.1.4 NAME 'submitdRecipientsPerHour'
  EQUALITY integerMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.4203.666.27.1.5 NAME 'submitdAllowRecipients'
  DESC 'the only recipients (addresses or @domains) the user may send to'
  EQUALITY caseIgnoreIA5Match SYNTAX 1.3.6.1.4.1.1466.115.121.1.26{256} )
attributetype ( 1.3.6.1.4.1.4203.666.27.1.6 NAME 'submitdDenyRecipients'
  DESC 'recipients (addresses or @domains) the user may never send to'
  EQUALITY caseIgnoreIA5Match SYNTAX 1.3.6.1.4.1.1466.115.121.1.26{256} )
objectclass ( 1.3.6.1.4.1.4203.666.27.2.1 NAME 'submitdUser' SUP top AUXILIARY
  MAY ( mailAlternateAddress $ submitdSuspended $ submitdMessagesPerHour $
        submitdRecipientsPerHour $ submitdAllowRecipients $ submitdDenyRecipients ) )
attributetype ( 1.2.840.113556.1.4.221 NAME 'sAMAccountName'
  EQUALITY caseIgnoreMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.2.210 NAME 'proxyAddresses'
  EQUALITY caseIgnoreMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )
attributetype ( 1.2.840.113556.1.4.8 NAME 'userAccountControl'
  EQUALITY integerMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.4.782 NAME 'objectCategory'
  DESC 'a DN in AD, which a filter may name by its short name: person' EQUALITY caseIgnoreMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
objectclass ( 1.2.840.113556.1.5.9 NAME 'user' DESC 'an Active Directory user, as far as submitd reads it'
  SUP top AUXILIARY MAY ( sAMAccountName $ proxyAddresses $ userAccountControl $ objectCategory ) )
objectclass ( 1.2.840.113556.1.5.8 NAME 'group' DESC 'an Active Directory group, as far as submitd reads it'
  SUP top AUXILIARY MAY ( mail $ proxyAddresses ) )
"""


def password_of(uid: str) -> str:
    return f"{uid}'s LDAP passphrase"


@dataclass
class Person:
    """A user entry under ou=people: ``attributes`` beyond the inetOrgPerson basics (lists)."""

    uid: str
    scheme: str = "argon2"  # how userPassword is hashed: argon2, sha512-crypt, bcrypt
    mail: list[str] = field(default_factory=list)
    attributes: dict[str, list[str]] = field(default_factory=dict)
    ou: str = "people"


PEOPLE = [
    Person("alice", "argon2", ["alice@example.test"], {"mailAlternateAddress": ["alice.smith@example.test"]}),
    Person("bob", "sha512-crypt", ["bob@example.test"],
           {"submitdMessagesPerHour": ["7"], "submitdDenyRecipients": ["ceo@example.test"]}),
    Person("carol", "bcrypt", ["carol@example.test"], {"submitdAllowRecipients": ["@example.test"]}),
    Person("dave", "argon2", ["dave@example.test"], {"submitdSuspended": ["TRUE"]}),
    # Active Directory's ways: SMTP:/smtp: addresses among others, the disabled bit (0x2).
    Person("erin", "sha512-crypt", ["erin@example.test"], {
        "sAMAccountName": ["erin"], "userAccountControl": ["512"], "objectCategory": ["person"],
        "proxyAddresses": ["SMTP:erin@example.test", "smtp:e.jones@example.test", "X500:/o=Example/cn=erin",
                           "sip:erin.phone@example.test"]}),
    Person("frank", "sha512-crypt", ["frank@example.test"],
           {"sAMAccountName": ["frank"], "userAccountControl": ["514"], "objectCategory": ["person"]}),
    # The same uid twice (a second tree): a lookup must refuse rather than pick one.
    Person("twin", "argon2", ["twin@example.test"]),
    Person("twin", "argon2", ["twin2@example.test"], ou="contractors"),
]
# A group's mail: its members may send as it (groupOfNames, and AD's group).
GROUPS = {"sales": ("sales@example.test", ["alice", "bob"]), "support": ("support@example.test", ["bob", "erin"])}


def hash_password(password: str, scheme: str) -> str:
    """A userPassword value slapd checks itself (its argon2 module, libc's crypt)."""
    if scheme == "argon2":
        from argon2 import PasswordHasher

        return "{ARGON2}" + PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1).hash(password)
    from passlib.hash import bcrypt, sha512_crypt

    if scheme == "sha512-crypt":
        return "{CRYPT}" + sha512_crypt.using(rounds=5000).hash(password)
    if scheme == "bcrypt":
        return "{CRYPT}" + bcrypt.using(ident="2b", rounds=6).hash(password)
    raise ValueError(f"unknown scheme {scheme!r}")


def dn_of(uid: str, ou: str = "people") -> str:
    return f"uid={uid},ou={ou},{BASE}"


def _ldif(entries: list[dict[str, list[str]]]) -> str:
    blocks = []
    for entry in entries:
        lines = [f"dn: {entry['dn'][0]}"]
        lines += [f"{name}: {value}" for name, values in entry.items() if name != "dn" for value in values]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def directory_entries() -> list[dict[str, list[str]]]:
    """The test directory as entries (attribute -> values)."""
    ous = ["people", "groups", "services", "contractors"]
    entries = [{"dn": [BASE], "objectClass": ["dcObject", "organization"], "dc": ["example"], "o": ["Example"]}]
    entries += [{"dn": [f"ou={ou},{BASE}"], "objectClass": ["organizationalUnit"], "ou": [ou]} for ou in ous]
    for dn, password in ((SEARCH_DN, SEARCH_PASSWORD), (HASHES_DN, HASHES_PASSWORD)):
        entries.append({"dn": [dn], "objectClass": ["organizationalRole", "simpleSecurityObject"],
                        "cn": [dn.split(",")[0][3:]], "userPassword": [hash_password(password, "sha512-crypt")]})
    for p in PEOPLE:
        classes = ["inetOrgPerson", "submitdUser"] + (["user"] if "sAMAccountName" in p.attributes else [])
        entries.append({"dn": [dn_of(p.uid, p.ou)], "objectClass": classes, "uid": [p.uid], "cn": [p.uid.title()],
                        "sn": [p.uid.title()], "mail": p.mail,
                        "userPassword": [hash_password(password_of(p.uid), p.scheme)], **p.attributes})
    for name, (mail, members) in GROUPS.items():
        entries.append({"dn": [f"cn={name},{GROUPS_DN}"], "objectClass": ["groupOfNames", "group"],
                        "cn": [name], "mail": [mail], "member": [dn_of(m) for m in members]})
    return entries


class Slapd:
    """``slapd`` on ``port`` (ldap://, StartTLS offered) and ``ldaps_port`` (ldaps://), its
    certificate from the dev kit (``ca_file`` verifies it; valid for localhost and 127.0.0.1)."""

    def __init__(self, root: Path, port: int = 0, ldaps_port: int = 0) -> None:
        if not Path(SLAPD).exists() or not shutil.which("ldapmodify"):
            raise RuntimeError("slapd and ldap-utils are needed: apt-get install slapd ldap-utils")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port, self.ldaps_port = port or free_port(), ldaps_port or free_port()
        self.cert, self.key = make_self_signed(self.root / "tls", "localhost")
        self.ca_file = self.cert
        self.conf = self.root / "slapd.conf"
        self.data = self.root / "data"
        self.log = self.root / "slapd.log"
        self.admin_password_file = self.root / "admin-password"
        self.proc: subprocess.Popen | None = None
        self._write_config()

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://localhost:{self.ldaps_port}"

    def _write_config(self) -> None:
        (self.root / "submitd.schema").write_text(SCHEMA)
        self.admin_password_file.write_text(ADMIN_PASSWORD)  # (ldapmodify -y reads it as is)
        includes = "".join(f"include /etc/ldap/schema/{name}.schema\n" for name in SYSTEM_SCHEMAS)
        self.conf.write_text(
            includes + f"include {self.root / 'submitd.schema'}\n"
            f"pidfile {self.root / 'slapd.pid'}\nargsfile {self.root / 'slapd.args'}\n"
            "modulepath /usr/lib/ldap\nmoduleload back_mdb\nmoduleload argon2\n"
            f"TLSCertificateFile {self.cert}\nTLSCertificateKeyFile {self.key}\n"
            "database mdb\nmaxsize 67108864\n"
            f'suffix "{BASE}"\nrootdn "{ADMIN_DN}"\nrootpw "{ADMIN_PASSWORD}"\ndirectory {self.data}\n'
            "index uid,mail,member eq\n"
            # Hashes only to the account of compare mode; binds are checked by slapd itself.
            f'access to attrs=userPassword\n  by dn.exact="{HASHES_DN}" read\n  by anonymous auth\n  by * none\n'
            "access to *\n  by users read\n  by * none\n"
        )

    def start(self) -> "Slapd":
        """Loads the test directory on the first start (slapadd), then serves it."""
        if not self.data.exists():
            self.data.mkdir()
            with tempfile.NamedTemporaryFile("w", suffix=".ldif", dir=self.root, delete=False) as f:
                f.write(_ldif(directory_entries()))
            self._run(["/usr/sbin/slapadd", "-q", "-f", str(self.conf), "-l", f.name])
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [SLAPD, "-h", f"{self.url}/ ldaps://127.0.0.1:{self.ldaps_port}/", "-f", str(self.conf), "-d", "0"],
                stdout=log, stderr=log, start_new_session=True)
        if not (wait_port("127.0.0.1", self.port, 15) and wait_port("127.0.0.1", self.ldaps_port, 5)):
            self.stop()
            raise RuntimeError(f"slapd did not start; see {self.log}:\n{self.log.read_text(errors='replace')[-1500:]}")
        return self

    def stop(self) -> None:
        """SIGTERM, and wait: slapd closes its database before it exits (killed after 10 s)."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> "Slapd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- changes, as an administrator makes them (ldapmodify over the network) --------------

    def modify(self, ldif: str) -> None:
        self._run(["ldapmodify", "-x", "-H", self.url, "-D", ADMIN_DN, "-y", str(self.admin_password_file)], ldif)

    def replace(self, uid_or_dn: str, attribute: str, values: list[str]) -> None:
        """The attribute's values (none: the attribute removed) of a user (uid) or any entry (DN)."""
        dn = uid_or_dn if "=" in uid_or_dn else dn_of(uid_or_dn)
        body = "".join(f"{attribute}: {v}\n" for v in values)
        self.modify(f"dn: {dn}\nchangetype: modify\nreplace: {attribute}\n{body}-\n")

    def set_password(self, uid: str, password: str, scheme: str = "sha512-crypt") -> None:
        self.replace(uid, "userPassword", [hash_password(password, scheme)])

    def add(self, *entries: dict[str, list[str]]) -> None:
        """New entries (attribute -> values, the DN under ``dn``), in one ldapadd."""
        self._run(["ldapadd", "-x", "-H", self.url, "-D", ADMIN_DN, "-y", str(self.admin_password_file)],
                  _ldif(list(entries)))

    def _run(self, command: list[str], stdin: str | None = None) -> None:
        done = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} failed ({done.returncode}): {done.stderr.strip()}")


def main() -> None:
    parser = argparse.ArgumentParser(description="A test slapd with the dev kit's directory, for trying the ldap directory")
    parser.add_argument("directory", type=Path, help="where its config, data and certificate live (kept)")
    parser.add_argument("--port", type=int, default=2389, help="ldap:// with StartTLS")
    parser.add_argument("--ldaps-port", type=int, default=2636)
    args = parser.parse_args()
    slapd = Slapd(args.directory, args.port, args.ldaps_port).start()
    password_file = args.directory / "bind-password"
    password_file.write_text(SEARCH_PASSWORD + "\n")
    settings = {"DIRECTORIES": '["ldap", "file"]', "LDAP_URL": slapd.url, "LDAP_STARTTLS": "true",
                "LDAP_CA_FILE": slapd.ca_file, "LDAP_BASE_DN": BASE, "LDAP_BIND_DN": SEARCH_DN,
                "LDAP_BIND_PASSWORD_FILE": password_file}
    print("slapd on", slapd.url, "and", slapd.ldaps_url, "; policy's settings:")
    print("\n".join(f"SUBMITD_POLICY_{k}='{v}'" for k, v in settings.items()))
    print("users:", ", ".join(sorted({p.uid for p in PEOPLE})), f"(password: {password_of('<uid>')!r}); Ctrl-C stops")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        slapd.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        slapd.stop()


if __name__ == "__main__":
    main()
