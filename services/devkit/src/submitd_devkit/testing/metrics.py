"""Reading a service's /metrics in tests."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def sample(port: int, name: str, **labels: str) -> float:
    """One series' value. 0.0 for a labelled series not seen yet; AssertionError when the
    service exports no such metric at all, so a renamed or removed metric never reads as 0."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    exported = False
    for family in text_string_to_metric_families(text):
        if name not in (family.name, f"{family.name}_total", f"{family.name}_count", f"{family.name}_sum"):
            continue
        exported = True
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    assert exported, f"no metric {name} on port {port}"
    return 0.0
