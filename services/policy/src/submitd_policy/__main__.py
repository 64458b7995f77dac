"""submitd-policy: the gRPC policy service."""

from __future__ import annotations

import logging
import os

from submitd.v1 import policy_pb2, policy_pb2_grpc
from submitd_common import jetstream, lifecycle
from submitd_common.files import WatchedFile
from submitd_common.health import Health
from submitd_common.logs import setup_logging
from submitd_common.telemetry import setup_telemetry

from . import admin, streams
from .apppasswords import AppPasswords
from .counters import Counters
from .mirror import KvMirror
from .service import PolicyService
from .settings import Settings
from submitd_common.users import ARGON2_DEFAULTS, UserDB, configure_hashing, hash_password

log = logging.getLogger("submitd.policy")
SERVICE = policy_pb2.DESCRIPTOR.services_by_name["Policy"]
SERVICE_NAME = SERVICE.full_name


async def amain() -> None:
    settings = Settings()
    setup_logging("policy", settings.log_level)
    configure_hashing(settings.argon2_time_cost, settings.argon2_memory_kib, settings.argon2_parallelism)
    provider = setup_telemetry("policy")
    users = WatchedFile(
        settings.users_file, lambda path: UserDB.load(path, settings.dovecot_passwd_file), settings.reload_interval,
        name="users",
    )
    stop_watch = users.start()

    # Shared counters (rates, lockouts) live in NATS KV so that every replica sees them; the
    # lockout counters an AUTH reads are mirrored here (mirror.py), their writes republished.
    mirrors: list[KvMirror] = []

    async def nats_error(e: Exception) -> None:
        log.warning("nats error: %s", e)
        for mirror in mirrors:
            mirror.dropped(e)

    nc = await jetstream.connect("submitd-policy", settings.nats_options(), error_cb=nats_error)
    js = nc.jetstream()
    # The buckets as provisioning made them (streams.py): the policy may not create or change a
    # stream (submitd_common.provision).
    resync = settings.lockout_mirror_resync_seconds
    mirrors += [KvMirror(nc, jetstream.COUNTERS_BUCKET, jetstream.BUDGET_KEYS, resync_seconds=resync),
                KvMirror(nc, jetstream.AUTHFAIL_BUCKET, resync_seconds=resync)]
    rates = Counters(await jetstream.open_kv(js, streams.counters(settings)), mirrors[0])
    authfail = Counters(await jetstream.open_kv(js, streams.lockouts(settings)), mirrors[1])
    for mirror in mirrors:
        await mirror.start()
    known = Counters(await jetstream.open_kv(js, streams.known_addresses(settings)))

    health = Health([SERVICE_NAME])
    health.add_check("nats", lambda: nc.is_connected)
    health.add_check("users_file", lambda: os.access(settings.users_file, os.R_OK))
    app_passwords = None
    if settings.app_passwords:  # every replica's own mirror of the bucket submitctl writes
        app_passwords = AppPasswords(nc, resync_seconds=settings.app_passwords_resync_seconds,
                                     last_used_seconds=settings.app_passwords_last_used_seconds)
        await app_passwords.start()
    service = PolicyService(settings, users, rates, authfail, known, app_passwords=app_passwords)
    for directory in service.directories.directories:
        await directory.start()  # a configuration the directory refuses (a wrong SQL query) stops policy here
    for name in service.directories.names:  # reported by /readyz; a directory that is down never takes policy out
        if name != "file":
            health.add_report(f"directory_{name}", lambda name=name: service.directories.ready()[name])
    await lifecycle.serve_grpc(
        "policy", settings, health, lambda s: policy_pb2_grpc.add_PolicyServicer_to_server(service, s),
        [m.name for m in SERVICE.methods], routers=[admin.router(settings, service.directories)],
        users=len(users.value.users), directories=service.directories.names,
    )
    await stop_watch()
    if app_passwords is not None:
        await app_passwords.close()
    for mirror in mirrors:
        await mirror.close()
    await jetstream.close(nc)
    await service.directories.close()
    if service.tokens is not None:
        await service.tokens.close()
    service.authenticator.close()
    provider.shutdown()


def hash_password_command() -> None:
    """`submitd-policy hash-password`: an argon2id hash, at the configured parameters, of a
    password read from standard input (prompted for on a terminal), for the users file."""
    import getpass
    import sys

    prefix = Settings.model_config["env_prefix"]
    configure_hashing(**{k: int(os.environ.get(f"{prefix}ARGON2_{k.upper()}", v)) for k, v in ARGON2_DEFAULTS.items()})
    password = getpass.getpass("Password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\r\n")
    if not password:
        sys.exit("an empty password")
    print(hash_password(password))


def main() -> None:
    import sys

    if sys.argv[1:2] == ["hash-password"]:
        hash_password_command()
        return
    if sys.argv[1:2] == ["provision"]:  # the chart's init container, with the provisioning user
        from submitd_common import provision

        provision.command("policy", streams.plan, Settings)
        return
    lifecycle.run(amain)


if __name__ == "__main__":
    main()
