"""SQL directory settings (SUBMITD_POLICY_SQL_*): PostgreSQL, read with asyncpg
(``directories.sql``). The default queries read the README's example schema."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

DEFAULT_USER_QUERY = (
    "SELECT password, suspended, messages_per_hour, recipients_per_hour, allow_recipients, deny_recipients "
    "FROM users WHERE login = $1"
)
DEFAULT_SEND_AS_QUERY = (
    "SELECT address FROM send_as WHERE login = $1 UNION SELECT address FROM shared_addresses WHERE login = $1"
)
DEFAULT_LIST_QUERY = "SELECT login FROM users ORDER BY login LIMIT $1"


class SqlSettings(BaseModel):
    sql_dsn: str = Field(
        "", description="PostgreSQL to read logins from (directories: sql), e.g. postgresql://submitd@db:5432/mail; "
        "without the password (sql_password_file) and without TLS options (sql_sslmode, sql_ca_file)"
    )
    sql_password_file: str | None = Field(
        None, description="File holding the role's password (a mounted Secret), read at each new connection"
    )
    sql_sslmode: Literal["disable", "require", "verify-ca", "verify-full"] = Field(
        "verify-full", description="TLS to PostgreSQL: verify-full (certificate and host name checked against "
        "sql_ca_file or the system CAs), verify-ca (certificate only), require (encrypted, unchecked), disable; "
        "libpq's prefer/allow are not offered (an attacker in the path could turn TLS off)"
    )
    sql_ca_file: str | None = Field(None, description="CA certificates (PEM) for verify-ca/verify-full; unset: the system's")
    sql_pool_size: int = Field(10, ge=1, description="Most connections to PostgreSQL at once (opened when needed)")
    sql_timeout: float = Field(
        3.0, gt=0, description="Seconds to connect, to wait for a free connection of the pool and for a query "
        "(also the server's statement_timeout); past it the lookup answers 454 4.7.0"
    )
    sql_user_query: str = Field(
        DEFAULT_USER_QUERY, description="One row for the login ($1): password (a hash), and optionally suspended, "
        "messages_per_hour, recipients_per_hour, allow_recipients, deny_recipients, act_as (arrays or "
        "comma-separated text), header_from_check; no row: not known here; several rows: refused"
    )
    sql_send_as_query: str = Field(
        DEFAULT_SEND_AS_QUERY, description="The addresses and @domains the login ($1) may send as: one column, "
        "a row each (or an array); a login that is an address may always send as itself"
    )
    sql_list_query: str = Field(
        DEFAULT_LIST_QUERY, description="Logins for submitctl user ls: a column login, at most $1 rows; each is then "
        "read with the two queries above"
    )

