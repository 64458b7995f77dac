"""Logins from PostgreSQL (``SUBMITD_POLICY_DIRECTORIES='["sql"]'``): two configured queries.

``sql_user_query`` returns one row for a login (``$1``): its ``password`` hash (argon2id,
bcrypt, SHA512-CRYPT, bare or ``{SCHEME}``-prefixed: what ``verify_password`` reads; NULL or
empty: the login is known, no password matches) and optional columns for what the users file
says (``USER_COLUMNS``). ``sql_send_as_query`` returns the addresses and ``@domain``s it may send
as. ``sql_list_query`` pages logins for ``submitctl user ls``. The login is always a bind
parameter, never text pasted into a query.

The driver is asyncpg: PostgreSQL's own ``$1`` placeholders (the queries an operator writes run
as written in psql), a pool with a bounded size that opens connections when needed, statements
prepared once per connection, and no libpq to install. (psycopg 3 would need its pool package
and libpq, and writes parameters ``%s``.)

``start()`` connects, prepares the three queries and runs each once (for the empty login):
one PostgreSQL refuses (a syntax error, an unknown table or column, no privilege) or whose columns are not what is read here fails the
start (``QueryError``), rather than the first AUTH. PostgreSQL down at start is only logged.
Connection refused, a server gone, a query or a connection slower than ``sql_timeout``, every
connection of the pool busy: ``DirectoryUnavailable`` (454 4.7.0), never "not known".
Every session is read-only (``default_transaction_read_only``): a query can read, not change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg

from submitd_common.users import Limits, User, normalize

from .base import Account, Directory, DirectoryUnavailable

log = logging.getLogger("submitd.policy.directories.sql")

USER_COLUMNS = ("password", "suspended", "messages_per_hour", "recipients_per_hour", "allow_recipients",
                "deny_recipients", "act_as", "header_from_check")
TEXT_TYPES = {"text", "varchar", "bpchar", "name", "citext"}
INTEGER_TYPES = {"int2", "int4", "int8"}
NO_PASSWORD = "!"  # a NULL or empty password: verify_password matches nothing (an unknown scheme)
TRUE = {"t", "true", "y", "yes", "on", "1"}
FALSE = {"f", "false", "n", "no", "off", "0", ""}


class QueryError(ValueError):
    """A configured query PostgreSQL refuses, or whose parameters or columns are not what this
    directory reads: a configuration error, reported at start."""


class ConnectionLost(DirectoryUnavailable):
    """A pooled connection turned out closed (PostgreSQL restarted, the session terminated):
    the lookup is tried once more on a new one (the queries only read)."""


class RowError(ValueError):
    """A row whose value cannot be read (a limit that is no number ...)."""


class SqlDirectory(Directory):
    name = "sql"
    remote = True

    def __init__(self, dsn: str, *, password_file: str | None = None, tls: ssl.SSLContext | bool = False,
                 pool_size: int = 10, timeout: float = 3.0, user_query: str, send_as_query: str,
                 list_query: str) -> None:
        self.dsn, self.password_file, self.tls = dsn, password_file, tls
        self.pool_size, self.timeout = pool_size, timeout
        self.queries = {"sql_user_query": user_query, "sql_send_as_query": send_as_query,
                        "sql_list_query": list_query}
        where = urlsplit(dsn)
        self.detail = f"postgresql {where.hostname or 'localhost'}:{where.port or 5432}{where.path or ''}"
        self._pool: asyncpg.Pool | None = None
        self._checked = False
        self._ok = False

    # -- connections ----------------------------------------------------------------------

    def _password(self) -> str | None:
        """Read at each new connection: a rotated Secret is used without a restart."""
        if not self.password_file:
            return None
        try:
            return Path(self.password_file).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as e:
            raise DirectoryUnavailable(f"sql: cannot read sql_password_file: {e.strerror}") from None

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            # min_size 0: creating the pool connects nothing (PostgreSQL may be down at start).
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=0, max_size=self.pool_size, max_inactive_connection_lifetime=60,
                password=self._password, ssl=self.tls, timeout=self.timeout, command_timeout=self.timeout,
                server_settings={"application_name": "submitd-policy", "default_transaction_read_only": "on",
                                 "statement_timeout": str(max(1, int(self.timeout * 1000)))},
            )
        return self._pool

    @contextlib.asynccontextmanager
    async def _connection(self):
        """A connection of the pool, its queries checked once; what fails is DirectoryUnavailable."""
        pool = await self._get_pool()
        stage = "connect"
        try:
            async with pool.acquire(timeout=self.timeout) as conn:
                stage = "query"
                if not self._checked:
                    await self._check_queries(conn)
                yield conn
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            self._ok = False
            lost = stage == "query" and (isinstance(e, (ConnectionError, asyncpg.ConnectionDoesNotExistError))
                                         or str(getattr(e, "sqlstate", "")).startswith(("08", "57P")))
            raise (ConnectionLost if lost else DirectoryUnavailable)(f"sql: {self._why(e, stage, pool)}") from None
        except RowError as e:
            raise DirectoryUnavailable(f"sql: {e}") from None
        except (QueryError, DirectoryUnavailable):
            self._ok = False
            raise
        self._ok = True

    def _why(self, e: BaseException, stage: str, pool: asyncpg.Pool) -> str:
        if isinstance(e, TimeoutError):
            if stage == "query":
                return f"no answer to a query within {self.timeout:g} s"
            if pool.get_size() >= self.pool_size and pool.get_idle_size() == 0:
                return f"all {self.pool_size} connections of the pool busy for {self.timeout:g} s"
            return f"no connection within {self.timeout:g} s ({self.detail})"
        if isinstance(e, asyncpg.PostgresError):
            return f"PostgreSQL answered {e.sqlstate}: {e.message or str(e) or type(e).__name__}"
        if isinstance(e, OSError):
            return f"cannot reach {self.detail}: {type(e).__name__} {e.strerror or ''}".rstrip()
        return f"{type(e).__name__} ({self.detail})"

    async def start(self) -> None:
        """Connects and checks the queries: QueryError when one is wrong; PostgreSQL
        unavailable is logged (lookups answer 454 4.7.0 until it answers)."""
        try:
            async with self._connection():
                pass
        except DirectoryUnavailable as e:
            log.warning("%s; logins from SQL answer 454 4.7.0 until it answers", e)

    async def _check_queries(self, conn: asyncpg.Connection) -> None:
        user = await self._prepare(conn, "sql_user_query", "login")
        columns = [a.name for a in user.get_attributes()]
        if "password" not in columns:
            raise QueryError(f"sql_user_query returns no column named password (it returns {', '.join(columns)})")
        unknown = [c for c in columns if c not in USER_COLUMNS]
        if unknown:
            raise QueryError(f"sql_user_query returns columns this directory does not read: {', '.join(unknown)} "
                             f"(it reads {', '.join(USER_COLUMNS)})")
        send_as = await self._prepare(conn, "sql_send_as_query", "login")
        if len(send_as.get_attributes()) != 1:
            raise QueryError("sql_send_as_query must return one column (an address or @domain a row, or an array)")
        listing = await self._prepare(conn, "sql_list_query", "limit")
        if "login" not in [a.name for a in listing.get_attributes()]:
            raise QueryError("sql_list_query returns no column named login")
        self._checked = True

    async def _prepare(self, conn: asyncpg.Connection, setting: str, parameter: str):
        """The statement, its single parameter ``$1`` the login (text) or the limit (an integer)."""
        try:
            statement = await conn.prepare(self.queries[setting])
            parameters = statement.get_parameters()
            if len(parameters) != 1:
                raise QueryError(f"{setting} must take one parameter, $1 (the {parameter}); it takes {len(parameters)}")
            types, kind = (TEXT_TYPES, "text") if parameter == "login" else (INTEGER_TYPES, "an integer")
            if parameters[0].name not in types:
                raise QueryError(f"{setting} takes $1 as {parameters[0].name}; the {parameter} is {kind}")
            # Privileges are checked when a query runs: once, for a login nobody has (or 0 rows).
            await statement.fetch("" if parameter == "login" else 0)
        except asyncpg.PostgresError as e:
            if not str(e.sqlstate).startswith("42"):  # class 42: syntax error or access rule violation
                raise
            raise QueryError(f"{setting} is refused by PostgreSQL ({e.sqlstate}): {e.message}") from None
        return statement

    # -- lookups ------------------------------------------------------------------------------

    async def lookup(self, login: str) -> Account | None:
        try:
            async with self._connection() as conn:
                return await self._read(conn, login)
        except ConnectionLost:
            async with self._connection() as conn:
                return await self._read(conn, login)

    async def _read(self, conn: asyncpg.Connection, login: str) -> Account | None:
        rows = await conn.fetch(self.queries["sql_user_query"], login)
        if not rows:
            return None
        if len(rows) > 1:
            log.warning("sql: sql_user_query returned %d rows for login %r: it is refused (one row a login)",
                        len(rows), login)
            return None
        send_as = await conn.fetch(self.queries["sql_send_as_query"], login)
        return Account(user_from_row(login, rows[0], [r[0] for r in send_as]), self.name, self.detail)

    async def accounts(self, limit: int = 1000) -> list[Account]:
        async with self._connection() as conn:
            logins = [r["login"] for r in await conn.fetch(self.queries["sql_list_query"], limit)]
            found = [await self._read(conn, str(login)) for login in logins if login]
        return [a for a in found if a is not None]

    def ready(self) -> bool:
        return self._ok

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self.timeout)
        except TimeoutError:
            pool.terminate()


# -- rows -------------------------------------------------------------------------------------

def user_from_row(login: str, row, send_as: list) -> User:
    """The row of ``sql_user_query`` and the values of ``sql_send_as_query`` as a users-file
    entry. Absent columns take the file's defaults; a NULL recipients allow-list: any recipient."""
    get = row.get if hasattr(row, "get") else (lambda k, d=None: row[k] if k in row else d)
    addresses: list[str] = []
    for value in send_as:
        addresses.extend(_texts(value, "sql_send_as_query"))
    allow = get("allow_recipients")
    return User(
        login=login,
        password_hash=str(get("password") or "") or NO_PASSWORD,
        send_as=frozenset(normalize(a) for a in addresses),
        act_as=frozenset(_texts(get("act_as"), "act_as")),
        allow_recipients=None if allow is None else frozenset(normalize(a) for a in _texts(allow, "allow_recipients")),
        deny_recipients=frozenset(normalize(a) for a in _texts(get("deny_recipients"), "deny_recipients")),
        limits=Limits(_number(get("messages_per_hour"), "messages_per_hour"),
                      _number(get("recipients_per_hour"), "recipients_per_hour")),
        suspended=_flag(get("suspended"), False, "suspended"),
        header_from_check=_flag(get("header_from_check"), True, "header_from_check"),
    )


def _texts(value, column: str) -> list[str]:
    """An array, or text with commas (or spaces) between entries; NULL: none."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if v is not None and str(v).strip()]
    if isinstance(value, str):
        return [v for v in value.replace(",", " ").split() if v]
    raise RowError(f"{column}: neither an array nor text")


def _number(value, column: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise RowError(f"{column} is not a number") from None


def _flag(value, default: bool, column: str) -> bool:
    if value is None:
        return default
    if isinstance(value, (bool, int)):
        return bool(value)
    text = str(value).strip().lower()
    if text in TRUE | FALSE:
        return text in TRUE
    raise RowError(f"{column} is neither true nor false")


# -- settings -----------------------------------------------------------------------------------

def tls_context(sslmode: str, ca_file: str | None) -> ssl.SSLContext | bool:
    """``sql_sslmode`` as asyncpg takes it: False (disable) or a context that requires TLS."""
    if sslmode == "disable":
        return False
    context = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
    if sslmode in ("verify-ca", "require"):
        context.check_hostname = False
    if sslmode == "require":
        context.verify_mode = ssl.CERT_NONE
    return context


def check_dsn(dsn: str) -> None:
    """Refuses what belongs elsewhere; the DSN is never quoted back (it might hold a password)."""
    if not dsn:
        raise ValueError("directories names sql but SUBMITD_POLICY_SQL_DSN is empty")
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError("SUBMITD_POLICY_SQL_DSN is no postgresql:// URL")
    query = {k.lower() for k in parse_qs(parts.query)}
    if parts.password is not None or "password" in query:
        raise ValueError("SUBMITD_POLICY_SQL_DSN holds a password: put it in the file SUBMITD_POLICY_SQL_PASSWORD_FILE names")
    if query & {"sslmode", "ssl", "sslrootcert", "sslcert", "sslkey"}:
        raise ValueError("SUBMITD_POLICY_SQL_DSN holds TLS options: use SUBMITD_POLICY_SQL_SSLMODE and SQL_CA_FILE")


def build(settings, users=None) -> SqlDirectory:
    check_dsn(settings.sql_dsn)
    if settings.sql_password_file and not Path(settings.sql_password_file).is_file():
        raise ValueError(f"SUBMITD_POLICY_SQL_PASSWORD_FILE {settings.sql_password_file}: no such file")
    return SqlDirectory(
        settings.sql_dsn, password_file=settings.sql_password_file,
        tls=tls_context(settings.sql_sslmode, settings.sql_ca_file), pool_size=settings.sql_pool_size,
        timeout=settings.sql_timeout, user_query=settings.sql_user_query,
        send_as_query=settings.sql_send_as_query, list_query=settings.sql_list_query,
    )
