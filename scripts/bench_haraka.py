"""Haraka (Node.js) as a peer in `make bench`: its durable outbound queue, relaying everything to
the bench's smtp-sink, on a free loopback port, CPU from its own cgroup (as Postfix).

`make bench` installs Haraka with npm into build/haraka (git-ignored; no lock file is written)
before it runs; where that failed, the bench says why and leaves Haraka out. `make test` never
needs npm.

The instance: `haraka -i` (Haraka's own default connection.ini and so on), then
- plugins: ``relay`` (relaying allowed from 127.0.0.0/8, so every message takes the outbound
  queue: written with fsync and renamed before the 250, as Postfix and submitd), and a four-line
  ``next_hop`` plugin whose get_mx hook names the sink for every domain;
- log level WARN (as submitd's services in the bench), message size limit as every server's;
- ``nodes`` workers (smtp.ini; ``cpus``: one per CPU, Haraka's advice for production).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from benchkit import LARGE_LIMIT, CpuGroup, Server, SmtpSink
from submitd_devkit.ports import free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent
HARAKA_DIR = ROOT / "build" / "haraka"
HARAKA_BIN = HARAKA_DIR / "node_modules" / ".bin" / "haraka"
INSTALL_LOG = HARAKA_DIR / "install.log"  # the Makefile's npm output, for the reason of a skip

NEXT_HOP_PLUGIN = """\
// make bench: every domain's mail goes to the bench's smtp-sink (config/next_hop: host:port).
exports.hook_get_mx = function (next, hmail, domain) {
    const [host, port] = this.config.get('next_hop').split(':')
    next(OK, { priority: 0, exchange: host, port: parseInt(port, 10) })
}
"""


def haraka_missing() -> str | None:
    """Why Haraka cannot run here, or None."""
    if not os.access(HARAKA_BIN, os.X_OK):
        reason = "not installed (make bench installs it with npm into build/haraka)"
        with contextlib.suppress(OSError):
            lines = [line for line in INSTALL_LOG.read_text(errors="replace").splitlines() if line.strip()]
            errors = [line for line in lines if "error" in line.lower() and "complete log" not in line]
            if lines:
                reason = "npm install failed: " + " | ".join((errors or lines)[:2])
        return reason
    return None


class Haraka(Server):
    def __init__(self, work: Path, sink: SmtpSink, cert: Path, key: Path, nodes: str = "cpus") -> None:
        self.name = "haraka"
        self.work = work
        self.group = CpuGroup("haraka")
        self.port = free_port()
        made = subprocess.run([str(HARAKA_BIN), "-i", str(work)], capture_output=True, text=True)
        if made.returncode != 0:
            raise RuntimeError(f"haraka -i failed: {made.stderr.strip()[-500:]}")
        conf = work / "config"
        self.queue = work / "queue"
        self.queue.mkdir(exist_ok=True)
        (work / "plugins" / "next_hop.js").write_text(NEXT_HOP_PLUGIN)
        files = {
            "plugins": "relay\nnext_hop\n",
            "smtp.ini": f"listen=127.0.0.1:{self.port}\nnodes={nodes}\n",
            "log.ini": "[main]\nlevel=warn\nformat=default\n",
            "relay.ini": "[relay]\nacl=true\nforce_routing=false\n",
            "relay_acl_allow": "127.0.0.0/8\n",
            "me": "haraka.bench.localhost\n",
            "next_hop": f"127.0.0.1:{sink.port}\n",
            "tls_key.pem": key.read_text(),  # not offered to smtp-source (it does not ask), but loaded
            "tls_cert.pem": cert.read_text(),
        }
        for name, text in files.items():
            (conf / name).write_text(text)
        ini = conf / "connection.ini"  # Haraka's default, with every server's size limit
        ini.write_text(ini.read_text().replace("bytes=26214400", f"bytes={LARGE_LIMIT}"))
        self.log = work / "haraka.log"
        with self.group.enter(), open(self.log, "ab") as log:
            self.proc = subprocess.Popen([str(HARAKA_BIN), "-c", str(work)], stdout=log, stderr=log,
                                         start_new_session=True)
        # Node loads every plugin in the master and again in each worker: seconds on a busy machine.
        if not wait_port("127.0.0.1", self.port, 90):
            self.stop()
            raise RuntimeError(f"haraka did not start: {self.log.read_text(errors='replace')[-2000:]}")
        self.group.pids = [self.proc.pid]

    def drained(self) -> bool:
        # Queue files (and their temporary .names) are removed once the sink said 250.
        with os.scandir(self.queue) as entries:
            return not any(e.is_file() for e in entries)

    def stop(self) -> None:
        """SIGTERM to the master and its workers (a process group), SIGKILL to whatever is left
        after 30 s; returns once every one has gone (then its cgroup can be removed)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self.proc.poll()
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
