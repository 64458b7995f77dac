"""submitd-rewriter: the gRPC message completion and signing service, and the queue's writer.

    submitd-rewriter                                   run the service
    submitd-rewriter dkim-keygen DOMAIN SELECTOR [--algorithm rsa|ed25519] --out KEY.pem
    submitd-rewriter dkim-txt DOMAIN SELECTOR KEY.pem  print the DNS TXT record for a key
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from submitd.v1 import rewriter_pb2, rewriter_pb2_grpc
from submitd_common import jetstream, lifecycle
from submitd_common.files import WatchedFile
from submitd_common.health import Health
from submitd_common.logs import setup_logging
from submitd_common.telemetry import setup_telemetry
from submitd_common.users import UserDB

from . import dkim
from .rules import load_rules
from .queue import QueueWriter
from .service import RewriterService
from .settings import Settings

log = logging.getLogger("submitd.rewriter")
SERVICE = rewriter_pb2.DESCRIPTOR.services_by_name["Rewriter"]
SERVICE_NAME = SERVICE.full_name


async def amain() -> None:
    settings = Settings()
    setup_logging("rewriter", settings.log_level)
    provider = setup_telemetry("rewriter")
    stops = []
    users = keys = None
    if settings.users_file:
        users = WatchedFile(
            settings.users_file, lambda p: UserDB.load(p, settings.dovecot_passwd_file), settings.reload_interval,
            name="users",
        )
        stops.append(users.start())
    if settings.dkim_keys_file:
        keys = WatchedFile(settings.dkim_keys_file, dkim.load_keys, settings.reload_interval, name="dkim_keys")
        stops.append(keys.start())
    rules = None
    if settings.rewrite_rules_file:
        rules = WatchedFile(settings.rewrite_rules_file, load_rules, settings.reload_interval, name="rewrite_rules")
        stops.append(rules.start())
    health = Health([SERVICE_NAME])

    # The queue's writer: SERVING only while NATS is there, told at once when it goes or comes
    # back (the frontend's readiness, and whether it takes DATA, follow this). No publish
    # buffering while reconnecting: a publish during an outage must fail now (the client gets
    # 451), not be flushed later after the client was told to retry.
    async def disconnected() -> None:
        log.warning("nats disconnected")
        await health.check_now()

    async def reconnected() -> None:
        log.info("nats reconnected")
        await health.check_now()

    nc = await jetstream.connect("submitd-rewriter", settings.nats_options(), pending_size=0,
                                 disconnected_cb=disconnected, reconnected_cb=reconnected)
    # The relay's provisioning makes the queue (the rewriter may not): wait for it before taking mail.
    await jetstream.wait_for_queue(nc.jetstream())
    queue = QueueWriter(nc, settings.publish_timeout)
    health.add_check("nats", lambda: nc.is_connected)
    for name, path in (
        ("users_file", settings.users_file),
        ("dkim_keys_file", settings.dkim_keys_file),
        ("rewrite_rules_file", settings.rewrite_rules_file),
    ):
        if path:
            health.add_check(name, lambda path=path: os.access(path, os.R_OK))
    service = RewriterService(settings, users, keys, rules, queue)
    stopping = asyncio.Event()
    withdrawals = asyncio.create_task(queue.withdrawals.run(stopping), name="withdrawals")
    await lifecycle.serve_grpc(
        "rewriter", settings, health, lambda s: rewriter_pb2_grpc.add_RewriterServicer_to_server(service, s),
        [m.name for m in SERVICE.methods], dkim_domains=sorted(keys.value) if keys else [],
    )
    stopping.set()
    await withdrawals  # one last try for what was given up during the drain
    await jetstream.close(nc)
    for stop in stops:
        await stop()
    provider.shutdown()


def dkim_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="submitd-rewriter", description="DKIM key tools")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("dkim-keygen", help="generate a key and print its DNS TXT record")
    gen.add_argument("domain")
    gen.add_argument("selector")
    gen.add_argument("--algorithm", choices=["rsa", "ed25519"], default="rsa")
    gen.add_argument("--out", required=True, help="where to write the private key (PEM)")
    txt = sub.add_parser("dkim-txt", help="print the DNS TXT record of an existing key")
    txt.add_argument("domain")
    txt.add_argument("selector")
    txt.add_argument("key_file")
    args = parser.parse_args(argv)
    if args.command == "dkim-keygen":
        key = dkim.generate_key(args.algorithm)
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(dkim.private_pem(key))
    else:
        from cryptography.hazmat.primitives import serialization

        with open(args.key_file, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    print(dkim.txt_record(key, args.domain, args.selector))
    return 0


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("dkim-"):
        sys.exit(dkim_command(sys.argv[1:]))
    lifecycle.run(amain)


if __name__ == "__main__":
    main()
