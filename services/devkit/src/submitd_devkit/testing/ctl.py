"""submitctl as an operator runs it against a local stack (``--local``) or a cluster, in its own
process: forked from a zygote that has imported it (submitd_devkit.zygote), as the services
are. The tests that check ``python -m submitd_ctl`` itself (its exit status with nothing to talk
to) still start it with subprocess."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from submitd_devkit import zygote


def run_submitctl(*args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """``submitctl ARGS``: what subprocess.run(..., input=stdin, capture_output=True, text=True,
    timeout=timeout) would return (TimeoutExpired after ``timeout``, the process killed)."""
    with tempfile.TemporaryDirectory(prefix="submitctl-") as tmp:
        files = {name: Path(tmp) / name for name in ("stdin", "stdout", "stderr")}
        files["stdin"].write_text(stdin or "")
        argv = ["submitctl", *args]
        proc = zygote.spawn("ctl", dict(os.environ), str(files["stderr"]), argv=argv, cwd=os.getcwd(),
                            **{name: str(path) for name, path in files.items()})
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise subprocess.TimeoutExpired(argv, timeout) from None
        return subprocess.CompletedProcess(argv, code, files["stdout"].read_text(), files["stderr"].read_text())


def submitctl(stack, *args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return run_submitctl("--local", str(stack.root), *args, stdin=stdin, timeout=timeout)
