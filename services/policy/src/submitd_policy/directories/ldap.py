"""Users from an LDAP directory (OpenLDAP, FreeIPA, Active Directory), through ``ldap3``.

Two modes (``ldap_mode``):
- *bind*: a service account searches the user's entry (``ldap_user_filter``, the login escaped
  per RFC 4515); ``check_password`` then binds as that entry's DN with the given password on a
  connection of its own. The directory never hands out a hash (``user.password_hash`` is "").
- *compare*: the entry's ``userPassword`` is read and returned as the hash; the caller checks it
  in its hashing pool, as for the users file.

ldap3 is synchronous: each request runs in a small thread pool (``ldap_pool_size`` threads), and
each thread keeps its own two connections (the service account's, and one for the users' binds),
so at most twice that many are open and a request reuses a warm (TLS) connection. A connection
the server has closed meanwhile is opened again once; a server that cannot be reached, or that
refuses the service account, is ``DirectoryUnavailable``, never "not found". An empty password
is never sent: to LDAP, a simple bind with a DN and no password is an unauthenticated bind, which
"succeeds" (RFC 4513 §5.1.2).
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ldap3
from ldap3.core.exceptions import LDAPException

from .base import Account, Directory, DirectoryUnavailable
from .ldap_entries import AttributeMap, fill

log = logging.getLogger("submitd.policy")

INVALID_CREDENTIALS = 49
# Result codes that say the server could not answer now (busy, unavailable, unwilling to bind
# because of its own state, an administrative limit): not a wrong password.
UNAVAILABLE_CODES = {51, 52, 80}


class _VerifiedTls(ldap3.Tls):
    """ldap3's TLS with a standard ``ssl`` context: the certificate is verified against the CA
    and must name the URL's host (ldap3's own name check uses ssl.match_hostname, deprecated
    since Python 3.7 and gone in 3.12)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(validate=ssl.CERT_REQUIRED)
        self.context = context

    def wrap_socket(self, connection, do_handshake=False):  # called by ldap3 (ldaps:// and StartTLS)
        connection.socket = self.context.wrap_socket(connection.socket, server_hostname=connection.server.host)


class LdapDirectory(Directory):
    name = "ldap"
    remote = True

    def __init__(self, urls: list[str], *, base_dn: str, user_filter: str, attributes: AttributeMap,
                 bind_dn: str = "", bind_password_file: str | None = None, mode: str = "bind",
                 starttls: bool = False, ca_file: str | None = None, group_base_dn: str = "",
                 group_filter: str = "", timeout: float = 5.0, pool_size: int = 4) -> None:
        if not urls:
            raise ValueError("ldap: SUBMITD_POLICY_LDAP_URL is required")
        if not base_dn:
            raise ValueError("ldap: SUBMITD_POLICY_LDAP_BASE_DN is required")
        if "{login}" not in user_filter:
            raise ValueError("ldap: SUBMITD_POLICY_LDAP_USER_FILTER must contain {login}")
        if bind_dn and not bind_password_file:
            raise ValueError("ldap: SUBMITD_POLICY_LDAP_BIND_DN needs SUBMITD_POLICY_LDAP_BIND_PASSWORD_FILE")
        if mode not in ("bind", "compare"):
            raise ValueError(f"ldap: unknown mode {mode!r} (bind, compare)")
        self.urls, self.mode = urls, mode
        self.base_dn, self.user_filter, self.attributes = base_dn, user_filter, attributes
        self.group_base_dn, self.group_filter = group_base_dn or base_dn, group_filter
        self.bind_dn, self.bind_password_file = bind_dn, bind_password_file
        self.starttls, self.timeout = starttls, timeout
        self.tls = _VerifiedTls(ssl.create_default_context(cafile=ca_file))
        if any(url.lower().startswith("ldap://") for url in urls) and not starttls:
            log.warning("ldap: %s without StartTLS: passwords cross the network in clear", " ".join(urls))
        self._executor = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="ldap")
        self._local = threading.local()  # each thread's connections: .service, .user
        self._open: set[ldap3.Connection] = set()
        self._lock = threading.Lock()
        self._ok = True
        self._closed = False

    # -- the Directory interface -------------------------------------------------------------

    async def lookup(self, login: str) -> Account | None:
        if not login:
            return None
        return await self._run("service", lambda conn: self._lookup(conn, login))

    async def check_password(self, account: Account, password: str) -> bool:
        if not password or not account.detail:
            return False  # never an unauthenticated bind
        return await self._run("user", lambda conn: self._bind_as(conn, account.detail, password))

    async def accounts(self, limit: int = 1000) -> list[Account]:
        def page(conn: ldap3.Connection) -> list[Account]:
            entries = self._search(conn, self.base_dn, self.user_filter.replace("{login}", "*"),
                                   self.attributes.requested(), limit)
            return [self._account(conn, dn, attributes, None) for dn, attributes in entries[:limit]]

        return await self._run("service", page)

    def ready(self) -> bool:
        return self._ok

    async def close(self) -> None:
        self._closed = True
        with self._lock:
            connections, self._open = list(self._open), set()
        await asyncio.get_running_loop().run_in_executor(None, _unbind_all, connections)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- requests, in the pool's threads ----------------------------------------------------

    async def _run(self, kind: str, request):
        if self._closed:
            raise DirectoryUnavailable("ldap: closed")
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._executor, self._with_connection, kind, request)
        except DirectoryUnavailable:
            self._ok = False
            raise
        self._ok = True
        return result

    def _with_connection(self, kind: str, request):
        """``request(connection)`` on this thread's connection of ``kind``; once more on a new
        connection when a kept one turns out closed (the server restarted, an idle timeout)."""
        conn = getattr(self._local, kind, None)
        for _ in range(2):
            fresh = conn is None
            if fresh:
                conn = self._connect(bind=kind == "service")
                setattr(self._local, kind, conn)
            try:
                return request(conn)
            except (LDAPException, OSError) as e:
                self._forget(kind, conn)
                conn = None
                if fresh:
                    raise DirectoryUnavailable(f"ldap: {type(e).__name__}") from None
        raise AssertionError("unreachable")

    def _connect(self, bind: bool) -> ldap3.Connection:
        """A new connection (TLS as configured), bound as the service account when ``bind``."""
        password = None
        if bind and self.bind_dn:
            try:
                password = Path(self.bind_password_file).read_text().rstrip("\r\n")
            except OSError as e:
                raise DirectoryUnavailable(f"ldap: the bind password file cannot be read ({e.strerror})") from None
        conn = ldap3.Connection(self._server(), user=self.bind_dn if bind and self.bind_dn else None, password=password,
                                read_only=True, receive_timeout=max(1, math.ceil(self.timeout)), raise_exceptions=False,
                                auto_referrals=False, return_empty_attributes=False)
        try:
            conn.open()
            if self.starttls and not conn.server.ssl:
                conn.start_tls()
            if bind and not conn.bind():
                code = conn.result.get("result")
                raise DirectoryUnavailable(f"ldap: the service account was refused ({code} {conn.result.get('description')})")
        except (LDAPException, OSError) as e:
            _unbind_all([conn])
            raise DirectoryUnavailable(f"ldap: {type(e).__name__} ({e}) ({' '.join(self.urls)})") from None
        except DirectoryUnavailable:
            _unbind_all([conn])
            raise
        finally:
            conn.password = None  # (ldap3 would keep it for a reconnect: we connect anew instead)
        with self._lock:
            self._open.add(conn)
        return conn

    def _server(self):
        """The server(s) for one new connection: an ldap3 Server keeps state of its own (the address
        it is connected to, addresses it found down in the last seconds) that its connections
        share without a lock, so threads never share one."""
        # Each server's connect may take a share of the chain's timeout: a next one is still tried within it.
        connect_timeout = self.timeout / (len(self.urls) + 1) if len(self.urls) > 1 else self.timeout
        servers = [ldap3.Server(url, tls=self.tls, get_info=ldap3.NONE, connect_timeout=connect_timeout)
                   for url in self.urls]
        return servers[0] if len(servers) == 1 else ldap3.ServerPool(servers, ldap3.FIRST, active=1, exhaust=False)

    def _forget(self, kind: str, conn: ldap3.Connection) -> None:
        setattr(self._local, kind, None)
        with self._lock:
            self._open.discard(conn)
        _unbind_all([conn])

    def _search(self, conn: ldap3.Connection, base: str, search_filter: str, attributes: list[str],
                size_limit: int) -> list[tuple[str, dict]]:
        """(dn, raw attributes) of each entry found. Any other result than success or "size limit
        exceeded" is a failure to answer (a base DN that does not exist too: a typo in the settings
        must not turn every login into "unknown")."""
        conn.search(base, search_filter, ldap3.SUBTREE, attributes=attributes or [ldap3.NO_ATTRIBUTES],
                    size_limit=size_limit, time_limit=max(1, math.ceil(self.timeout)))
        code = conn.result.get("result")
        if code not in (0, 4):  # success, sizeLimitExceeded (with the entries that came)
            raise DirectoryUnavailable(f"ldap: search failed ({code} {conn.result.get('description')})")
        return [(e["dn"], e.get("raw_attributes") or {}) for e in conn.response or [] if e.get("type") == "searchResEntry"]

    def _lookup(self, conn: ldap3.Connection, login: str) -> Account | None:
        found = self._search(conn, self.base_dn, fill(self.user_filter, login=login), self.attributes.requested(), 2)
        if len(found) > 1:
            log.warning("ldap: more than one entry matches login %r (%s, ...): refused", login[:80], found[0][0])
            return None
        if not found:
            return None
        dn, attributes = found[0]
        return self._account(conn, dn, attributes, login)

    def _account(self, conn: ldap3.Connection, dn: str, attributes: dict, login: str | None) -> Account:
        own = self.attributes.login
        login = login or next((v for k, v in attributes.items() if k.lower() == own and v), [b""])[0]
        if isinstance(login, bytes):
            login = login.decode("utf-8", "replace")
        shared: set[str] = set()
        if self.group_filter and self.attributes.group_addresses:
            groups = self._search(conn, self.group_base_dn, fill(self.group_filter, dn=dn, login=login),
                                  list(self.attributes.group_addresses), 0)
            shared = self.attributes.shared_addresses([a for _, a in groups])
        return Account(self.attributes.user(login, dn, attributes, shared), self.name, dn)

    def _bind_as(self, conn: ldap3.Connection, dn: str, password: str) -> bool:
        try:
            bound = conn.rebind(dn, password, ldap3.SIMPLE)
        finally:
            conn.password = None
        if bound:
            return True
        code = conn.result.get("result")
        if code in UNAVAILABLE_CODES:
            raise DirectoryUnavailable(f"ldap: bind refused for now ({code} {conn.result.get('description')})")
        if code != INVALID_CREDENTIALS:
            log.warning("ldap: a bind as %s was refused with %s %s", dn, code, conn.result.get("description"))
        return False


def _unbind_all(connections: list[ldap3.Connection]) -> None:
    for conn in connections:
        try:
            conn.unbind()
        except (LDAPException, OSError):
            pass
        if conn.socket is not None:  # (a connection that failed while opening keeps its socket)
            conn.socket.close()


def build(settings, users) -> LdapDirectory:
    return LdapDirectory(
        settings.ldap_url.split(),
        base_dn=settings.ldap_base_dn,
        user_filter=settings.ldap_user_filter,
        attributes=AttributeMap.from_settings(settings),
        bind_dn=settings.ldap_bind_dn,
        bind_password_file=settings.ldap_bind_password_file,
        mode=settings.ldap_mode,
        starttls=settings.ldap_starttls,
        ca_file=settings.ldap_ca_file,
        group_base_dn=settings.ldap_group_base_dn,
        group_filter=settings.ldap_group_filter,
        timeout=settings.directory_timeout,
        pool_size=settings.ldap_pool_size,
    )
