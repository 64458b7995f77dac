"""submitctl as an operator runs it against a local stack (``--local``), in its own process."""

from __future__ import annotations

import subprocess
import sys


def submitctl(stack, *args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "submitd_ctl", "--local", str(stack.root), *args],
        input=stdin, capture_output=True, text=True, timeout=timeout,
    )
