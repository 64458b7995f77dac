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
