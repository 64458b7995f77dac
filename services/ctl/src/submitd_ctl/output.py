"""Tables for people, JSON and YAML for scripts (``-o``)."""

from __future__ import annotations

import json

import yaml


def emit(fmt: str, data, columns: list[str]) -> None:
    if fmt == "json":
        print(json.dumps(data, indent=2, default=str))
    elif fmt == "yaml":
        print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False).rstrip())
    else:
        table(data, columns)


def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)


def table(rows: list[dict], columns: list[str]) -> None:
    """kubectl's shape: upper-case headers, columns padded, no borders."""
    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("   ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in cells:
        print("   ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def status_screen(report: dict) -> str:
    """One screen: each service's replicas, autoscaler and disruption budget, then the queue."""
    lines = [f"submitd at {report['where']}", ""]
    rows = []
    for s in report["services"]:
        hpa = s.get("autoscaler")
        rows.append({
            "service": s["name"],
            "ready": f"{s['ready']}/{s['desired']}" + ("" if s["ready"] >= max(1, s["desired"] or 0) else "  !"),
            "autoscaler": (f"{hpa['current']}->{hpa['desired']} of {hpa['min']}-{hpa['max']}  " + "  ".join(hpa["metrics"]))
            if hpa else "-",
            "last scaling": (f"{hpa['last_scaling']['at']} {hpa['last_scaling']['message']}"
                             if hpa and hpa.get("last_scaling") else "-"),
            "may evict": s.get("disruptions_allowed"),
        })
    cols = ["service", "ready", "autoscaler", "last scaling", "may evict"]
    cells = [[cell(r[c]) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines.append("   ".join(c.upper().ljust(w) for c, w in zip(cols, widths)).rstrip())
    lines += ["   ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    q = report.get("queue") or {}
    lines.append("")
    if "error" in q:
        lines.append(f"queue: unknown ({q['error']})")
    else:
        lines.append(
            f"queue: {q.get('messages', 0)} messages, {q.get('bytes', 0)} bytes, oldest {age(q.get('oldest_age_seconds'))}; "
            f"waiting for a relay {q.get('pending_delivery', 0)}, held by relays {q.get('in_delivery', 0)} "
            f"(deferred {q.get('deferred', 0)})"
        )
    return "\n".join(lines)
