"""`make run` stopped by signals at random moments (issue 26). One Ctrl-C stops the stack; a
second one (or a supervisor's SIGTERM, or a closed terminal's SIGHUP) while it stops kills it at
once. However the signals fall, scripts/run_local.py exits within a bound, no process it started
is left, and the next `make run` on the same ports starts.

Each round starts the real script on this test's ports and var directory (SUBMITD_RUN_*), as
`make run` would, and signals it the way the round's kind says, with delays drawn from a seed
that every failure names (RUN_SIGNAL_SEED=n repeats it; RUN_SIGNAL_ROUNDS=n runs more rounds)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from submitd_devkit.testing.smtp import insecure_context

ROOT = Path(__file__).resolve().parent.parent
PORTS = ("nats", "policy", "rewriter", "submission", "submissions", "internal_submission", "frontend_http", "relay_http",
         "policy_http", "rewriter_http", "sink")
DEMO = "demo@example.test"
ROUNDS = int(os.environ.get("RUN_SIGNAL_ROUNDS", "3"))
SEED = int(os.environ.get("RUN_SIGNAL_SEED") or random.randrange(2**32))
UP_WITHIN = 90.0  # a start on two busy cores
STOPPED_WITHIN = 30.0  # one signal: the relay's pull ends within 5 s, a session in DATA within 10 s
KILLED_WITHIN = 8.0  # from the second signal: everything is killed at once (it takes < 2 s on busy cores)
# run_local, the sink, nats-server, policy, rewriter, relay and frontend.
PROCESSES = 7

# What a round does, in turn: a second signal at a random moment of the stop; the same while a
# client is inside DATA (the frontend would wait 10 s for it); signals sent as fast as they can
# be (the first hang: a signal arriving inside the handler of the one before); the first signal
# at a random moment of the start.
KINDS = ("stopping", "in DATA", "storm", "starting")
SECOND = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class Round:
    kind: str
    first_after: float  # "starting": seconds after the script says it is starting
    second: signal.Signals
    second_after: float  # seconds after the first signal

    def __str__(self) -> str:
        return (f"{self.kind}: SIGINT{f' {self.first_after:.2f} s into the start' if self.kind == 'starting' else ''},"
                f" then {'a storm' if self.kind == 'storm' else f'{self.second.name} {self.second_after:.2f} s later'}")


def plan(rng: random.Random, rounds: int) -> list[Round]:
    out = []
    for i in range(rounds):
        kind = KINDS[i % len(KINDS)]
        second_after = {"stopping": rng.uniform(0, 5), "in DATA": rng.uniform(0, 2),
                        "starting": rng.uniform(0, 1)}.get(kind, 0.0)
        out.append(Round(kind, rng.uniform(0, 3), rng.choice(SECOND), second_after))
    return out


# Between free_port's ports (20000-32000, every other test's, in every test session on this
# machine) and the kernel's ephemeral ones (from 32768): this test frees its ports and takes them
# again every round, and one that free_port handed to another session meanwhile failed a round
# (a second make test on the machine). A lock file per port keeps two runs of this test apart.
OWN_PORTS = range(32001, 32768)


@pytest.fixture
def ports() -> Iterator[dict[str, int]]:
    """A port of OWN_PORTS for each of PORTS, that no other run of this test takes meanwhile."""
    lock_dir = Path(tempfile.gettempdir()) / "submitd-test-run-local-ports"
    lock_dir.mkdir(exist_ok=True)
    locks: list[int] = []
    ports: dict[str, int] = {}
    try:
        for port in random.sample(OWN_PORTS, len(OWN_PORTS)):
            if len(ports) == len(PORTS):
                break
            lock = os.open(lock_dir / str(port), os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(lock)
                continue
            locks.append(lock)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            ports[PORTS[len(ports)]] = port
        assert len(ports) == len(PORTS), "not enough free ports in OWN_PORTS"
        yield ports
    finally:
        for lock in locks:
            os.close(lock)


def processes_naming(var: Path) -> dict[int, str]:
    """Every live process whose command line or environment names ``var``: run_local (its
    SUBMITD_RUN_VAR), the sink, nats-server and the services (their files are under it)."""
    needle = str(var).encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if needle in cmdline or needle in (entry / "environ").read_bytes():
                found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile, or a zombie's environ
            continue
    return found


def listening(ports: dict[str, int]) -> list[str]:
    out = []
    for name, port in ports.items():
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            out.append(f"{name}={port}")
    return out


class LocalRun:
    """scripts/run_local.py as `make run` starts it, its output in a file."""

    def __init__(self, var: Path, ports: dict[str, int], output: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SUBMITD_")}
        env |= {f"SUBMITD_RUN_{name.upper()}_PORT": str(port) for name, port in ports.items()}
        env["SUBMITD_RUN_VAR"] = str(var)
        self.output_path = output
        with open(output, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "run_local.py")], env=env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if text in self.output():
                return True
            time.sleep(0.05)
        return text in self.output()

    def signal(self, sig: int) -> bool:
        """False when the script has exited already (Popen then signals no one)."""
        if self.proc.poll() is not None:
            return False
        self.proc.send_signal(sig)
        return True


def inside_data(var: Path, port: int) -> smtplib.SMTP:
    """A logged-in client that has started a message and not ended it."""
    client = smtplib.SMTP("127.0.0.1", port, timeout=20)
    client.starttls(context=insecure_context())
    client.login(DEMO, (var / "demo-password").read_text().strip())
    client.mail(DEMO)
    client.rcpt("someone@example.net")
    code, _ = client.docmd("DATA")
    assert code == 354
    client.send(b"Subject: held open\r\n\r\nstill being written\r\n")
    return client


def signal_round(run: LocalRun, r: Round, var: Path, ports: dict[str, int],
                 held: contextlib.ExitStack) -> tuple[str, float, float]:
    """Send the round's signals; returns the signal the exit is timed from, when it was sent and
    within how many seconds the script must exit. A client inside DATA is held (by ``held``)
    until the caller has seen the script exit."""
    if r.kind == "starting":
        time.sleep(r.first_after)
    elif r.kind == "in DATA":
        client = inside_data(var, ports["submission"])
        held.callback(client.close)
    first = time.monotonic()
    run.signal(signal.SIGINT)
    if r.kind == "storm":
        sent = 0
        while time.monotonic() < first + KILLED_WITHIN and run.signal(signal.SIGTERM if sent % 2 else signal.SIGINT):
            sent += 1
        return "the storm's start", first, KILLED_WITHIN
    time.sleep(r.second_after)
    second = time.monotonic()
    if run.signal(r.second):
        return "the second signal", second, KILLED_WITHIN
    return "the only signal (the stop ended before the second)", first, STOPPED_WITHIN


@pytest.mark.starts_stacks
@pytest.mark.timeout(60 + 20 * ROUNDS)  # about 5 s a round alone, 10 s on busy cores
def test_signals_at_random_moments_of_the_stop_leave_no_process_and_the_ports_free(tmp_path, ports):
    rounds = plan(random.Random(SEED), ROUNDS)
    var = tmp_path / "var"
    run = None
    try:
        for i, r in enumerate(rounds):
            where = f"seed {SEED} (RUN_SIGNAL_SEED), round {i} ({r})"
            run = LocalRun(var, ports, tmp_path / f"run{i}.out")
            if r.kind == "starting":
                assert run.wait_for("starting nats-server", UP_WITHIN), f"{where}: not starting:\n{run.output()[-3000:]}"
            else:
                assert run.wait_for("submitd is running", UP_WITHIN), f"{where}: not up:\n{run.output()[-3000:]}"
                running = processes_naming(var)
                assert len(running) >= PROCESSES, f"{where}: the check sees too few processes: {running}"
            with contextlib.ExitStack() as held:
                timed_from, sent, within = signal_round(run, r, var, ports, held)
                try:
                    run.proc.wait(max(0.0, sent + within - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pytest.fail(f"{where}: run_local has not exited within {within} s of {timed_from}; processes: "
                                f"{processes_naming(var)}\n{run.output()[-3000:]}")
                print(f"{where}: exited {time.monotonic() - sent:.2f} s after {timed_from} (bound {within} s)")
            left = processes_naming(var)
            assert not left, f"{where}: left running: {left}\n{run.output()[-3000:]}"
            busy = listening(ports)
            assert not busy, f"{where}: ports still answering: {busy}"
            assert run.proc.returncode == 0 and "Traceback" not in run.output(), \
                f"{where}: exit {run.proc.returncode}\n{run.output()[-3000:]}"
    finally:
        if run is not None and run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        for pid in processes_naming(var):  # a failed round's leftovers must not outlive the test
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
