"""The frontend's one seam with aiosmtpd (and asyncio's StreamReader): every internal it
relies on is named here, and services/frontend/tests/test_aiosmtpd_adapter.py fails if an
upgrade changes one."""

from __future__ import annotations

import asyncio

from aiosmtpd.smtp import SMTP


# What aiosmtpd's SMTP.__init__ sets up, without what it costs on every connection: it looks
# its command and AUTH methods up with inspect.getmembers() and dir() each time (a fifth of a
# millisecond). This frontend has a fixed set of commands, does AUTH itself through policy and
# uses no handler, so the lookup is made once per class. tests/test_aiosmtpd_adapter.py fails
# if an aiosmtpd upgrade sets up anything this does not.
AIOSMTPD_ATTRIBUTES = frozenset({
    "__ident__", "loop", "event_handler", "data_size_limit", "enable_SMTPUTF8", "_decode_data",
    "hostname", "tls_context", "require_starttls", "_timeout_duration", "_timeout_handle",
    "_tls_handshake_okay", "_tls_protocol", "_original_transport", "session", "envelope",
    "transport", "_handler_coroutine", "_auth_require_tls", "_proxy_timeout", "_authenticator",
    "_auth_callback", "_auth_required", "_auth_methods", "_handle_hooks", "_ehlo_hook_ver",
    "_smtp_methods", "_enforce_call_limit",
})
_COMMANDS: dict[type, tuple[str, ...]] = {}

# aiosmtpd's connection handling the I/O layer (smtp.py) builds on, beyond the state above:
# connection_made starts a task running ``_handle_client`` (replaced: the session's own loop),
# ``_cb_client_connected`` keeps the stream ``_reader`` and ``_writer``, and
# ``_reset_timeout(seconds)`` arms ``_timeout_cb`` (replaced: 421 and close). The frontend reads
# and writes the session's ``_reader`` and ``_writer``; ``session.peer`` is the client's address.
# tests/test_aiosmtpd_adapter.py checks that aiosmtpd still behaves so, and that smtp.py uses
# no other internal.
OVERRIDDEN = frozenset({"_handle_client", "_timeout_cb"})
RELIED_ON = frozenset({"_reader", "_writer", "_reset_timeout"})


def aiosmtpd_state(protocol: SMTP, *, hostname: str, ident: str, tls_context, data_size_limit: int | None,
                   timeout: float) -> None:
    loop = asyncio.get_running_loop()
    asyncio.StreamReaderProtocol.__init__(
        protocol, asyncio.StreamReader(loop=loop, limit=protocol.line_length_limit),
        client_connected_cb=protocol._cb_client_connected, loop=loop,
    )
    names = _COMMANDS.get(type(protocol))
    if names is None:
        names = _COMMANDS[type(protocol)] = tuple(m for m in dir(type(protocol)) if m.startswith("smtp_"))
    protocol.__dict__.update({
        "__ident__": ident, "loop": loop, "event_handler": None, "data_size_limit": data_size_limit,
        "enable_SMTPUTF8": True, "_decode_data": False, "hostname": hostname, "tls_context": tls_context,
        "require_starttls": False, "_timeout_duration": timeout, "_timeout_handle": None,
        "_tls_handshake_okay": True, "_tls_protocol": None, "_original_transport": None, "session": None,
        "envelope": None, "transport": None, "_handler_coroutine": None, "_auth_require_tls": True,
        "_proxy_timeout": None, "_authenticator": None, "_auth_callback": None, "_auth_required": False,
        "_auth_methods": {}, "_handle_hooks": {}, "_ehlo_hook_ver": None,
        "_smtp_methods": {name[5:]: getattr(protocol, name) for name in names}, "_enforce_call_limit": False,
    })


def start_tls(protocol: SMTP, context, timeout: float) -> asyncio.Future:
    """TLS on a plain connection: port 465's at once (the connection is a session, counted
    against MAX_SESSIONS, from the moment it is accepted, and a PROXY header can come before
    the handshake), or after STARTTLS; done the way aiosmtpd does STARTTLS (asyncio's
    SSLProtocol between the socket and the session). What the session's reader already holds
    (the start of the ClientHello, after a PROXY header or simply read early) goes to TLS
    first: octets a client sent in the clear after STARTTLS can only break the handshake, never
    be read as commands. Returns the handshake's future; the session's transport, reader and
    writer are the TLS ones at once.

    Internals relied on (checked by services/frontend/tests/test_aiosmtpd_adapter.py):
    asyncio.sslproto.SSLProtocol (its ``_incoming`` BIO and ``_app_transport``), the
    StreamReader's ``_buffer`` and the reader's and writer's ``_transport``, and aiosmtpd's
    ``_tls_protocol`` and ``_original_transport`` (its connection_lost closes the latter)."""
    from asyncio import sslproto

    loop = protocol.loop
    waiter = loop.create_future()
    tls = sslproto.SSLProtocol(loop, protocol, context, waiter, server_side=True, call_connection_made=False,
                               ssl_handshake_timeout=timeout)
    reader = protocol._reader
    if reader._buffer:
        tls._incoming.write(bytes(reader._buffer))
        reader._buffer.clear()
    transport = protocol.transport
    transport.set_protocol(tls)
    protocol._original_transport = transport
    protocol._tls_protocol = tls
    protocol.transport = reader._transport = protocol._writer._transport = tls._app_transport
    tls.connection_made(transport)
    transport.resume_reading()  # in case the reader had paused it

    def established(done: asyncio.Future) -> None:
        if not done.cancelled() and done.exception() is None and protocol.session is not None:
            protocol.session.ssl = tls._extra  # what aiosmtpd's STARTTLS sets (its eof handling reads it)

    waiter.add_done_callback(established)
    return waiter


def abandon_tls(protocol: SMTP) -> None:
    """After a failed handshake: cut the connection and let go of everything that would keep
    the session alive (aiosmtpd's idle timer, the TLS layer), since asyncio will not call the
    session's connection_lost."""
    if protocol._timeout_handle is not None:
        protocol._timeout_handle.cancel()
        protocol._timeout_handle = None
    for transport in (protocol.transport, protocol._original_transport):
        if transport is not None:
            transport.abort()
    protocol.transport = protocol._original_transport = protocol._tls_protocol = None
