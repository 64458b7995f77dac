"""The documents that promise behaviour point at tests that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_named_in_conformance_exists():
    text = (ROOT / "docs" / "CONFORMANCE.md").read_text()
    named = set(re.findall(r"(test_[a-z0-9_]+\.py)::(test_[a-z0-9_]+)", text))
    assert len(named) > 40
    sources = {p.name: p.read_text() for p in [*ROOT.glob("tests/test_*.py"), *ROOT.glob("services/*/tests/test_*.py")]}
    missing = [f"{f}::{t}" for f, t in sorted(named) if f"def {t}(" not in sources.get(f, "")]
    assert not missing, f"CONFORMANCE.md names tests that do not exist: {missing}"


def test_readme_starts_with_the_two_commands():
    head = (ROOT / "README.md").read_text().splitlines()[:6]
    assert any(line.startswith("make run") for line in head)
    assert any(line.startswith("make test") for line in head)
