"""Service processes forked from a copy of the service that has already imported its code.

A service spends most of its start-up importing (grpc, nats, fastapi, OpenTelemetry: about 0.7 s
of CPU), and the tests start some 500 service processes. A zygote is one process per service that
imports ``submitd_<service>.__main__`` once and then forks a child for each start: the child gets
the environment and log file it is given, a session of its own, and runs the service's ``main()``
exactly as ``python -m submitd_<service>`` would, its exit status reported like a Popen's.
submitctl (``ctl``) has one too: the tests run it some 70 times, and each run imported for 0.3 s
of CPU; its child gets the command line, standard input and output files it is given.

One zygote per service (never one for all): each service must export only its own metrics, and a
module imported by one service must not be imported into another. The zygote has no threads when
it forks (it checks), and no event loop, gRPC channel or NATS connection exists before the child
makes its own. For the tests only: ``make run`` and ``make bench`` start services with Popen.

Protocol on the zygote's stdin/stdout, one JSON object a line: ``{"env": {...}, "log": path}``
asks for a child (optionally with ``argv``, ``cwd``, and ``stdin``, ``stdout``, ``stderr`` paths
instead of /dev/null and the log) and is answered ``{"pid": n}``; ``{"exit": n, "code": c}`` says child n ended
(``c`` as Popen's returncode: negative for a signal)."""

from __future__ import annotations

import atexit
import importlib
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import traceback

# -- in the zygote -----------------------------------------------------------------------------


def _status(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _child(service: str, module, request: dict, private: list[int]) -> None:
    """In the forked child: become the service process, run it, and never return."""
    code = 1
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in private:
            os.close(fd)
        for fd, path, flags in ((0, request.get("stdin", os.devnull), os.O_RDONLY),
                                (1, request.get("stdout", request["log"]), os.O_WRONLY | os.O_APPEND | os.O_CREAT),
                                (2, request.get("stderr", request["log"]), os.O_WRONLY | os.O_APPEND | os.O_CREAT)):
            opened = os.open(path, flags, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        os.environ.clear()
        os.environ.update(request["env"])
        if "cwd" in request:
            os.chdir(request["cwd"])
        sys.argv = request.get("argv") or [f"submitd_{service}"]
        try:
            result = module.main()  # a service's returns None, submitctl's its exit status
            code = result if isinstance(result, int) else 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


# What every service imports only once it runs (measured: sys.modules before and after main()):
# uvloop (lifecycle.run), pydantic.v1 (FastAPI looks for v1 models when it builds the routes of
# /readyz and the admin APIs), uvicorn's HTTP protocol and lifespan, and IDNA for host names.
# About 0.1 s of CPU per service start that the zygote now spends once.
PRELOAD = ("uvloop", "pydantic.v1", "uvicorn.protocols.http.auto", "uvicorn.protocols.http.h11_impl",
           "uvicorn.protocols.websockets.auto", "uvicorn.lifespan.on", "uvicorn.lifespan.off", "encodings.idna")


def serve(service: str) -> None:
    # (submitctl's __main__ runs it when imported: its main() is in cli)
    module = importlib.import_module("submitd_ctl.cli" if service == "ctl" else f"submitd_{service}.__main__")
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything an import prints goes to the zygote's log, not into the protocol
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "request")
    sel.register(wake_r, selectors.EVENT_READ, "child")
    stdin = os.fdopen(sys.stdin.fileno(), "rb", buffering=0, closefd=False)
    pending = b""
    while True:
        for key, _ in sel.select():
            if key.data == "child":
                os.read(wake_r, 4096)
                while True:
                    try:
                        pid, status = os.waitpid(-1, os.WNOHANG)
                    except ChildProcessError:
                        break
                    if pid == 0:
                        break
                    out.write(json.dumps({"exit": pid, "code": _status(status)}) + "\n")
                continue
            chunk = stdin.read(65536)
            if not chunk:
                return  # the test process is gone: so is the zygote (its children live on)
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                if threading.active_count() != 1:
                    raise RuntimeError(f"zygote for {service} has threads: it must not fork")
                pid = os.fork()
                if pid == 0:
                    sel.close()
                    _child(service, module, request, [wake_r, wake_w, out.fileno()])
                out.write(json.dumps({"pid": pid}) + "\n")


# -- in the test process ------------------------------------------------------------------------


class Zygote:
    """The test process's end of one service's zygote."""

    def __init__(self, service: str) -> None:
        self.errors = tempfile.TemporaryFile()  # what the zygote says when it fails
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "submitd_devkit.zygote", service],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors, start_new_session=True,
        )
        self.lock = threading.Lock()  # one request and its answer at a time
        self.changed = threading.Condition()
        self.codes: dict[int, int] = {}
        self.answers: list[int] = []
        self.reader = threading.Thread(target=self._read, name=f"zygote-{service}", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            message = json.loads(line)
            with self.changed:
                if "pid" in message:
                    self.answers.append(message["pid"])
                else:
                    self.codes[message["exit"]] = message["code"]
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def spawn(self, env: dict[str, str], log: str, **options) -> "ForkedProcess":
        """``options``: argv, cwd, stdin, stdout, stderr (see the protocol above)."""
        with self.lock:
            self.proc.stdin.write(json.dumps({"env": env, "log": log, **options}).encode() + b"\n")
            self.proc.stdin.flush()
            with self.changed:
                if not self.changed.wait_for(lambda: self.answers or self.proc.poll() is not None, 60):
                    raise RuntimeError("the zygote did not answer")
                if not self.answers:
                    self.errors.seek(0)
                    raise RuntimeError(f"the zygote exited with {self.proc.returncode}:\n"
                                       + self.errors.read().decode(errors="replace")[-3000:])
                return ForkedProcess(self, self.answers.pop(0))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class ForkedProcess:
    """What Stack uses of a Popen: pid, poll, wait, send_signal, kill, returncode."""

    def __init__(self, zygote: Zygote, pid: int) -> None:
        self.zygote = zygote
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        with self.zygote.changed:
            self.returncode = self.zygote.codes.get(self.pid, self.returncode)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        with self.zygote.changed:
            if not self.zygote.changed.wait_for(lambda: self.pid in self.zygote.codes, timeout):
                raise subprocess.TimeoutExpired(f"submitd process {self.pid}", timeout)
            self.returncode = self.zygote.codes[self.pid]
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


_zygotes: dict[str, Zygote] = {}


def spawn(service: str, env: dict[str, str], log: str, **options) -> ForkedProcess:
    """A service process forked from this test process's zygote for ``service``."""
    if service not in _zygotes:
        _zygotes[service] = Zygote(service)
        atexit.register(_zygotes[service].close)
    return _zygotes[service].spawn(env, log, **options)


if __name__ == "__main__":
    serve(sys.argv[1])
