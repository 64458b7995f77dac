"""The relay streams DATA through aiosmtplib's protocol object (transaction.send_data): the parts
it uses are still there, and what a real SMTP server receives is the message, byte for byte,
however it was cut into chunks."""

import aiosmtplib
import pytest
from aiosmtplib.protocol import SMTPProtocol

from submitd_devkit.sink import Sink
from submitd_relay.transaction import AIOSMTPLIB_INTERNALS, send_data


async def test_the_internals_send_data_uses_exist():
    protocol = SMTPProtocol()
    missing = [name for name in AIOSMTPLIB_INTERNALS if not hasattr(protocol, name)]
    assert not missing, f"aiosmtplib changed: {missing}"


MESSAGE = b"Subject: dots\r\n\r\n.first\r\nmiddle\r\n..two\r\n.\r\nlast line\r\n"


@pytest.mark.parametrize("cuts", [[], [17], [18], [24], [25, 26], list(range(1, len(MESSAGE)))])
async def test_streamed_data_arrives_byte_for_byte_dot_stuffed_across_chunk_boundaries(cuts):
    sink = Sink().start()
    try:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, start_tls=False)
        await client.connect()
        await client.ehlo()

        async def chunks():
            for a, b in zip([0, *cuts], [*cuts, len(MESSAGE)]):
                yield MESSAGE[a:b]

        await client.mail("a@example.test")
        await client.rcpt("b@example.net")
        await send_data(client, chunks(), 10)
        await client.mail("a@example.test")  # the connection goes on after the message
        await client.rcpt("b@example.net")
        await send_data(client, chunks(), 10)
        await client.quit()
        got = sink.handler.wait_for(2, 10)
        assert [m.data for m in got] == [MESSAGE, MESSAGE]
    finally:
        sink.stop()


async def test_a_message_without_a_final_crlf_gets_one():
    sink = Sink().start()
    try:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, start_tls=False)
        await client.connect()
        await client.mail("a@example.test")
        await client.rcpt("b@example.net")

        async def chunks():
            yield b"Subject: x\r\n\r\nno end"

        await send_data(client, chunks(), 10)
        [msg] = sink.handler.wait_for(1, 10)
        assert msg.data == b"Subject: x\r\n\r\nno end\r\n"
        await client.quit()
    finally:
        sink.stop()
