"""The frontend sets up aiosmtpd's protocol state itself (see aiosmtpd_adapter.aiosmtpd_state). If an
aiosmtpd upgrade sets up anything more, or something else, these fail before a session does."""

import asyncio

from aiosmtpd.smtp import SMTP

from submitd_frontend.aiosmtpd_adapter import AIOSMTPD_ATTRIBUTES, aiosmtpd_state


async def test_the_adapter_sets_up_exactly_what_aiosmtpd_does():
    plain = vars(asyncio.StreamReaderProtocol(asyncio.StreamReader(), client_connected_cb=lambda r, w: None))
    theirs = SMTP(handler=None, hostname="h.example", ident="x", enable_SMTPUTF8=True, timeout=10)
    assert set(vars(theirs)) - set(plain) == AIOSMTPD_ATTRIBUTES

    ours = SMTP.__new__(SMTP)
    aiosmtpd_state(ours, hostname="h.example", ident="x", tls_context=None, data_size_limit=1000, timeout=10)
    assert set(vars(ours)) == set(vars(theirs))
    for name in ("_smtp_methods", "_auth_methods"):
        assert getattr(ours, name).keys() <= getattr(theirs, name).keys()
    assert ours._smtp_methods.keys() == theirs._smtp_methods.keys(), "every command is reachable"


async def test_implicit_tls_over_a_real_socket_with_octets_read_before_it():
    # start_tls relies on asyncio's SSLProtocol (call_connection_made, _incoming,
    # _app_transport) and the StreamReader's buffer: a real handshake over loopback, with the
    # first octets of the ClientHello already in the session's reader when TLS starts.
    import ssl
    import tempfile
    from pathlib import Path

    from submitd_devkit.certs import make_self_signed
    from submitd_devkit.testing.smtp import insecure_context
    from submitd_frontend.aiosmtpd_adapter import start_tls

    cert, key = make_self_signed(Path(tempfile.mkdtemp()))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    got: asyncio.Future = asyncio.get_running_loop().create_future()

    class Session(asyncio.StreamReaderProtocol):
        def __init__(self):
            self._reader = asyncio.StreamReader()
            super().__init__(self._reader)
            self.loop = asyncio.get_running_loop()

        def connection_made(self, transport):
            super().connection_made(transport)
            self.transport = transport
            self._writer = asyncio.StreamWriter(transport, self, self._reader, self.loop)
            self.loop.create_task(self.run())

        async def run(self):
            await self._reader.readexactly(5)  # "HELLO", then TLS, of which some is read too
            while not self._reader._buffer:
                await asyncio.sleep(0.01)
            await start_tls(self, server_ctx, 5)
            self._writer.write(b"220 over TLS\r\n")
            got.set_result(await self._reader.readline())

    server = await asyncio.get_running_loop().create_server(Session, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"HELLO")
    await writer.drain()
    await writer.start_tls(insecure_context(), server_hostname="localhost")
    assert await reader.readline() == b"220 over TLS\r\n"
    writer.write(b"QUIT\r\n")
    await writer.drain()
    assert await asyncio.wait_for(got, 5) == b"QUIT\r\n"
    writer.close()
    server.close()


def test_the_io_layer_uses_no_aiosmtpd_internal_the_adapter_does_not_name():
    # Every underscored name smtp.py and __main__.py use that they do not define themselves is
    # aiosmtpd's (or asyncio's under it), and is named in the adapter; every method smtp.py
    # replaces is one aiosmtpd has, and is named as replaced.
    import ast
    import inspect
    from pathlib import Path

    import submitd_frontend.smtp as smtp
    from submitd_frontend.aiosmtpd_adapter import OVERRIDDEN, RELIED_ON

    source = Path(smtp.__file__).read_text()
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SubmissionSMTP")
    methods = {n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assigned = {t.attr for n in ast.walk(cls) if isinstance(n, (ast.Assign, ast.AnnAssign))
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    used = set()
    for path in (Path(smtp.__file__), Path(smtp.__file__).with_name("__main__.py")):
        used |= {n.attr for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
                 and isinstance(n.value, ast.Name) and n.value.id in ("self", "s")}
    theirs = {name for name, _ in inspect.getmembers(SMTP)} | AIOSMTPD_ATTRIBUTES | {"_reader", "_writer"}
    replaced = {m for m in methods if m.startswith("_") and not m.startswith("__") and m in theirs}
    assert replaced == OVERRIDDEN
    internals = (used - (methods | assigned)) | replaced
    assert internals <= AIOSMTPD_ATTRIBUTES | RELIED_ON | OVERRIDDEN, sorted(internals - RELIED_ON - OVERRIDDEN)
    assert RELIED_ON | OVERRIDDEN <= internals, "the adapter names nothing smtp.py no longer uses"


async def test_aiosmtpd_runs_handle_client_with_reader_and_writer_and_its_timer_calls_timeout_cb():
    # The contract smtp.py relies on, over a real socket: a connection runs _handle_client
    # with _reader and _writer in place and session.peer set; _reset_timeout arms _timeout_cb.
    loop = asyncio.get_running_loop()
    seen: asyncio.Future = loop.create_future()
    timed_out: asyncio.Future = loop.create_future()

    class Probe(SMTP):
        async def _handle_client(self):
            line = await self._reader.readline()
            self._writer.write(b"250 " + line)
            await self._writer.drain()
            seen.set_result((line, self.session.peer[0], self._timeout_handle is not None))
            self._reset_timeout(0.05)

        def _timeout_cb(self):
            timed_out.set_result(True)
            self.transport.close()

    server = await loop.create_server(lambda: Probe(handler=None, timeout=30), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"NOOP\r\n")
    assert await asyncio.wait_for(reader.readline(), 5) == b"250 NOOP\r\n"
    assert await asyncio.wait_for(seen, 5) == (b"NOOP\r\n", "127.0.0.1", True)
    assert await asyncio.wait_for(timed_out, 5)
    writer.close()
    server.close()
    await server.wait_closed()
