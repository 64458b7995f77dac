"""Flame graphs of every submitd service under load (issue 29: profiles before and after).

    make profile                      # docs/perf/<service>-reused.svg
    make profile PROFILE_ARGS="--suffix=-after --seconds 10"

The stack as `make bench` starts it (DKIM off, trusted loopback), Postfix's smtp-sink as the
next hop, and Postfix's `smtp-source -d -s 20` (20 reused sessions of 2 KB messages) as the load;
once it runs, py-spy samples each service for ``--seconds`` (without pausing it) and writes an
SVG flame graph per service. py-spy comes from the package index into .venv (a tool, not a
dependency of any service).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import SmtpSink, Submitd, smtp_source  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--suffix", default="", help="appended to each file's name, e.g. -after")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "perf")
    args = parser.parse_args()
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        print("py-spy missing: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="submitd-profile-"))
    sink = SmtpSink()
    server = Submitd("submitd", work / "stack", sink, dkim=False)
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            smtp_source(server.port, 4000, 20, reuse=True)

    try:
        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        time.sleep(3)  # past the first sessions and the streams' setup
        args.out.mkdir(parents=True, exist_ok=True)
        spies = {}
        for name, pid in server.pids().items():
            if name == "nats":
                continue
            out = args.out / f"{name}-reused{args.suffix}.svg"
            spies[name] = (out, subprocess.Popen(
                [str(spy), "record", "--nonblocking", "--pid", str(pid), "--duration", str(int(args.seconds)),
                 "--format", "flamegraph", "--output", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        for name, (out, proc) in spies.items():
            _, err = proc.communicate(timeout=args.seconds + 60)
            print(f"{name}: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}"
                  + ("" if proc.returncode == 0 else f" (py-spy failed: {err.decode()[-300:]})"))
        stop.set()
        loader.join(120)
    finally:
        stop.set()
        server.stop()
        sink.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
