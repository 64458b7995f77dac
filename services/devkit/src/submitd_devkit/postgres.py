"""A real PostgreSQL cluster for the SQL directory's tests and ``make run``: Debian's
``postgresql`` binaries, a cluster made with initdb in a temporary directory, a free port on
127.0.0.1 and its socket directory in the same temporary directory. Never a system service.

PostgreSQL refuses to run as root: when the dev kit runs as root (CI, these machines), every
PostgreSQL program runs as the ``postgres`` user the Debian package creates, in a directory that
user owns. Durability is switched off (fsync, full pages, synchronous commit): a test cluster
starts in about a second and dies with its test.

The cluster has a role ``submitd`` with a password (over TCP: scram-sha-256, as a site's would
be), which may only read, and a database ``mail`` with the example schema of the README's
"Users from SQL" (``EXAMPLE_SCHEMA``). The superuser reaches it over the socket (``sql``)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from .ports import free_port

# The README's "Users from SQL" shows this schema; the policy's default queries read it.
EXAMPLE_SCHEMA = """\
CREATE TABLE users (
    login               text PRIMARY KEY,
    password            text,                   -- argon2id, bcrypt or SHA512-CRYPT hash
    suspended           boolean NOT NULL DEFAULT false,
    messages_per_hour   integer,                -- NULL: the site's default
    recipients_per_hour integer,
    allow_recipients    text[],                 -- NULL: any recipient
    deny_recipients     text[]
);
CREATE TABLE send_as (                          -- addresses and @domains a login may send as
    login   text NOT NULL REFERENCES users ON DELETE CASCADE ON UPDATE CASCADE,
    address text NOT NULL,
    PRIMARY KEY (login, address)
);
CREATE TABLE shared_addresses (                 -- an address several logins may send as
    address text NOT NULL,
    login   text NOT NULL REFERENCES users ON DELETE CASCADE ON UPDATE CASCADE,
    PRIMARY KEY (address, login)
);
"""

ROLE = "submitd"
DATABASE = "mail"


def bin_dir() -> Path:
    """Debian's PostgreSQL programs (15, or the newest installed); ``SUBMITD_PG_BIN`` overrides."""
    if os.environ.get("SUBMITD_PG_BIN"):
        return Path(os.environ["SUBMITD_PG_BIN"])
    preferred = Path("/usr/lib/postgresql/15/bin")
    if (preferred / "postgres").exists():
        return preferred
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    if not found:
        raise RuntimeError("PostgreSQL not found: apt-get install postgresql (its programs are in /usr/lib/postgresql/*/bin)")
    return found[-1].parent


def available() -> bool:
    try:
        bin_dir()
    except RuntimeError:
        return False
    return True


class Postgres:
    """``Postgres().start()``; ``stop()`` and ``start()`` again on the same port and data;
    ``close()`` stops it and removes its directory. ``tls``: a certificate and key (PEM) the
    server presents (then clients may use TLS; plain connections stay allowed)."""

    def __init__(self, *, tls: tuple[Path, Path] | None = None, port: int = 0) -> None:
        self.bin = bin_dir()
        self.as_postgres = os.geteuid() == 0  # PostgreSQL refuses root
        # Not under pytest's tmp_path: its directories are root's alone, and the server runs as postgres.
        self.root = Path(tempfile.mkdtemp(prefix="submitd-pg-"))
        self.data, self.sockets = self.root / "data", self.root / "run"
        self.sockets.mkdir()
        self.port = port or free_port()
        self.password = secrets.token_urlsafe(18)
        self.password_file = self.root / "submitd-password"  # as a mounted Secret: the policy reads it
        self.password_file.write_text(self.password + "\n")
        self.password_file.chmod(0o600)
        self.tls = tls
        self.log = self.root / "postgres.log"
        self.proc: subprocess.Popen | None = None
        self._owned(self.root, self.sockets)
        self._initdb()

    # -- where clients connect ----------------------------------------------------------

    @property
    def dsn(self) -> str:
        """The submitd role's DSN, without its password (that is ``password_file``'s)."""
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{DATABASE}"

    def policy_env(self, **more: str) -> dict[str, str]:
        """The policy's settings for this cluster (by field name, for ``Stack(env={"policy": ...})``)."""
        return {"SQL_DSN": self.dsn, "SQL_PASSWORD_FILE": str(self.password_file),
                "SQL_SSLMODE": "disable", **more}

    # -- processes ----------------------------------------------------------------------

    def _run(self, args: list[str], input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(args, input=input, capture_output=True, text=True, check=False, cwd=self.root,
                              user="postgres" if self.as_postgres else None, timeout=60)

    def _owned(self, *paths: Path) -> None:
        if self.as_postgres:
            for path in paths:
                shutil.chown(path, "postgres", "postgres")

    def _initdb(self) -> None:
        done = self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-E", "UTF8",
                          "--locale=C.UTF-8", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync",
                          "--no-instructions"])
        if done.returncode:
            raise RuntimeError(f"initdb failed: {done.stderr or done.stdout}")
        if self.tls:
            cert, key = self.data / "server.crt", self.data / "server.key"
            shutil.copyfile(self.tls[0], cert)
            shutil.copyfile(self.tls[1], key)
            key.chmod(0o600)  # PostgreSQL refuses a key others may read
            self._owned(cert, key)

    def start(self, timeout: float = 30) -> "Postgres":
        if self.proc is not None and self.proc.poll() is None:
            return self
        options = {
            "listen_addresses": "127.0.0.1", "unix_socket_directories": str(self.sockets),
            "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
            "shared_buffers": "16MB", "max_connections": "40", "max_wal_senders": "0", "wal_level": "minimal",
            "log_min_messages": "warning", "log_connections": "off",
        }
        if self.tls:
            options |= {"ssl": "on", "ssl_cert_file": "server.crt", "ssl_key_file": "server.key"}
        args = [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        for name, value in options.items():
            args += ["-c", f"{name}={value}"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, cwd=self.root, start_new_session=True,
                                         user="postgres" if self.as_postgres else None)
        deadline = time.monotonic() + timeout
        while not self.accepting():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"PostgreSQL did not start; see {self.log}:\n{self.log_tail()}")
            time.sleep(0.05)
        if not self._prepared():
            self._prepare()
        return self

    def accepting(self) -> bool:
        return self._run([str(self.bin / "pg_isready"), "-q", "-h", str(self.sockets), "-p", str(self.port)]).returncode == 0

    def stop(self, timeout: float = 20) -> None:
        """A fast shutdown (SIGINT: sessions cut, as when a server goes away); killed after ``timeout``."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Postgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- SQL as the superuser -----------------------------------------------------------

    def sql(self, statements: str, database: str = DATABASE, **variables: object) -> list[list[str]]:
        """Runs ``statements`` as the superuser over the socket; the rows of the last one.
        ``variables`` are psql's, quoted by psql where the SQL writes ``:'name'`` (a literal),
        never pasted into the text: ``sql("UPDATE users SET suspended = true WHERE login = :'l'", l=login)``."""
        args = [str(self.bin / "psql"), "-X", "-q", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1",
                "-h", str(self.sockets), "-p", str(self.port), "-U", "postgres", "-d", database]
        for name, value in variables.items():
            args += ["-v", f"{name}={value}"]
        done = self._run(args, input=statements)
        if done.returncode:
            raise RuntimeError(f"psql failed: {done.stderr.strip()}")
        return [line.split("\t") for line in done.stdout.splitlines() if line]

    def _prepared(self) -> bool:
        return bool(self.sql("SELECT 1 FROM pg_database WHERE datname = :'db'", "postgres", db=DATABASE))

    def _prepare(self) -> None:
        self.sql(f"CREATE ROLE {ROLE} LOGIN PASSWORD :'password'", "postgres", password=self.password)
        self.sql(f"CREATE DATABASE {DATABASE}", "postgres")
        self.sql(EXAMPLE_SCHEMA + f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {ROLE};")

    def rotate_password(self) -> str:
        """A new password for the submitd role, written to ``password_file`` (as a Secret is
        updated); sessions already open stay (``disconnect`` ends them)."""
        self.password = secrets.token_urlsafe(18)
        self.sql(f"ALTER ROLE {ROLE} PASSWORD :'password'", "postgres", password=self.password)
        tmp = self.password_file.with_suffix(".tmp")
        tmp.write_text(self.password + "\n")
        tmp.chmod(0o600)
        tmp.replace(self.password_file)
        return self.password

    def disconnect(self) -> int:
        """Ends the submitd role's sessions (as a failover or a restart would); how many."""
        rows = self.sql(f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = '{ROLE}'")
        return int(rows[0][0])

    # -- the example schema's users ---------------------------------------------------------

    def add_user(self, login: str, password_hash: str | None, send_as: Iterable[str] = (), *,
                 suspended: bool = False, messages_per_hour: int | None = None,
                 recipients_per_hour: int | None = None, allow_recipients: Iterable[str] | None = None,
                 deny_recipients: Iterable[str] | None = None) -> None:
        """A row in ``users`` and its ``send_as`` rows (replacing any the login had)."""
        def array(name: str, values: Iterable[str] | None) -> str:
            # psql quotes the joined text; the server splits it (test addresses hold no newline)
            return "NULL" if values is None else f"string_to_array(:'{name}', E'\\n')"

        def number(value: int | None) -> str:
            return "NULL" if value is None else str(int(value))

        self.sql(
            "DELETE FROM users WHERE login = :'login';"
            "INSERT INTO users VALUES (:'login', " + (":'hash'" if password_hash is not None else "NULL")
            + f", {'true' if suspended else 'false'}, {number(messages_per_hour)}, {number(recipients_per_hour)}, "
            f"{array('allow', allow_recipients)}, {array('deny', deny_recipients)});",
            login=login, hash=password_hash or "",
            allow="\n".join(allow_recipients or ()), deny="\n".join(deny_recipients or ()),
        )
        for address in send_as:
            self.sql("INSERT INTO send_as VALUES (:'login', :'address')", login=login, address=address)

    def set_password(self, login: str, password_hash: str) -> None:
        self.sql("UPDATE users SET password = :'hash' WHERE login = :'login'", login=login, hash=password_hash)

    def suspend(self, login: str, suspended: bool = True) -> None:
        self.sql(f"UPDATE users SET suspended = {'true' if suspended else 'false'} WHERE login = :'login'", login=login)

    def add_send_as(self, login: str, address: str) -> None:
        self.sql("INSERT INTO send_as VALUES (:'login', :'address')", login=login, address=address)

    def share(self, address: str, *logins: str) -> None:
        for login in logins:
            self.sql("INSERT INTO shared_addresses VALUES (:'address', :'login')", address=address, login=login)
