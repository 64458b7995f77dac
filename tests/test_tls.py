"""TLS as a scanner sees it: sslyze against both submission ports, judged by Mozilla's
"intermediate" profile. The only finding allowed is trust in the test's self-signed certificate."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

SSLYZE = Path(__file__).resolve().parent.parent / ".venv" / "sslyze" / "bin" / "sslyze"


def findings(*target: str) -> set[str]:
    if not SSLYZE.exists():
        pytest.skip(f"sslyze is not installed at {SSLYZE} (make install puts it there)")
    out = subprocess.run([str(SSLYZE), "--mozilla_config=intermediate", *target],
                         capture_output=True, text=True, timeout=120).stdout
    assert "COMPLIANCE AGAINST TLS CONFIGURATION" in out, out[-2000:]
    verdict = out.split("COMPLIANCE AGAINST TLS CONFIGURATION", 1)[1]
    return set(re.findall(r"^\s+\* (\w+):", verdict, flags=re.MULTILINE))


@pytest.mark.parametrize("port", ["submissions", "submission"])
def test_tls_is_compliant_with_mozillas_intermediate_profile(stack, port):
    if port == "submissions":
        result = findings(f"127.0.0.1:{stack.ports.submissions}")
    else:
        result = findings("--starttls", "smtp", f"127.0.0.1:{stack.ports.submission}")
    assert result <= {"certificate_path_validation"}, f"not compliant beyond the self-signed certificate: {result}"
