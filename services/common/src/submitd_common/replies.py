"""SMTP replies shared by the services."""

from __future__ import annotations

from submitd.v1 import common_pb2


def reply(code: int, enhanced: str, text: str) -> common_pb2.Reply:
    return common_pb2.Reply(code=code, enhanced=enhanced, text=text)


def render(r: common_pb2.Reply) -> str:
    """The wire form: "550 5.7.1 text" (multi-line texts become continuation lines)."""
    lines = r.text.splitlines() or [""]
    prefix = f"{r.enhanced} " if r.enhanced else ""
    out = [f"{r.code}-{prefix}{line}" for line in lines[:-1]]
    out.append(f"{r.code} {prefix}{lines[-1]}")
    return "\r\n".join(out)
