"""One trace per message, as an operator reads it in Jaeger (received here over real OTLP/gRPC),
metrics that move by what happened, and logs that join the trace."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import pytest

from relay_helpers import admin
from submitd_common import jetstream
from submitd_devkit.testing.metrics import sample
from submitd_devkit.testing.plugin import otlp_env
from submitd_devkit.testing.users import ALICE
from submitd_devkit.testing.smtp import logged_in, reply_of
from submitd_devkit.testing.waiting import eventually

pytestmark = pytest.mark.timeout(120)
MSG = f"From: {ALICE}\r\nTo: bob@example.net\r\nSubject: traced\r\n\r\nbody\r\n".encode()


def by_name(spans, name):
    return [s for s in spans if s.name == name]


def test_one_trace_from_connect_to_delivery(make_stack, otlp):
    stack = make_stack(env=otlp_env(otlp))
    with logged_in(stack) as client:
        client.sendmail(ALICE, ["bob@example.net"], MSG)
    stack.sink.handler.wait_for(1, 20)
    def complete(ss) -> bool:
        """The delivery and the session arrived, and every parent any span names is there."""
        ids = {s.span_id for s in ss}
        return bool(by_name(ss, "relay.deliver") and by_name(ss, "smtp.session")) and all(
            s.parent_id in ids for s in ss if s.parent_id
        ) and any(s.service == "rewriter" for s in ss) and any(s.service == "policy" for s in ss)

    spans = otlp.wait_for(complete)
    [deliver] = by_name(spans, "relay.deliver")
    [session] = [s for s in by_name(spans, "smtp.session") if s.trace_id == deliver.trace_id]
    trace = [s for s in spans if s.trace_id == session.trace_id]
    ids = {s.span_id: s for s in trace}

    assert session.kind == "SERVER" and session.parent_id == "" and session.service == "frontend"
    # Spans where time goes (AUTH, each message, each hop); per-command detail as events.
    for name in ("smtp.auth", "smtp.data"):
        [span] = by_name(trace, name)
        assert span.parent_id == session.span_id, name
    assert not by_name(trace, "smtp.mail") and not by_name(trace, "smtp.rcpt")
    events = dict(session.events)
    assert events["smtp.mail"] == {"smtp.mail_from": "example.test", "smtp.reply.code": 250}, \
        "addresses: the domain only, unless an operator turns full addresses on"
    assert events["smtp.rcpt"] == {"smtp.rcpt_to": "example.net", "smtp.reply.code": 250}
    [data] = by_name(trace, "smtp.data")
    [publish] = [s for s in trace if s.kind == "PRODUCER"]
    # The rewriter queues the message: its publish is a child of its server span for the call.
    [rewriter_server] = [s for s in trace if s.service == "rewriter" and s.kind == "SERVER"]
    assert publish.parent_id == rewriter_server.span_id and publish.attributes["messaging.system"] == "nats"
    assert publish.service == "rewriter"
    assert deliver.kind == "CONSUMER" and deliver.parent_id == publish.span_id and deliver.service == "relay"
    assert deliver.attributes["submitd.attempt"] == 1 and deliver.attributes["submitd.outcome"] == "delivered"
    queue_id = data.attributes["submitd.queue_id"]
    assert publish.attributes["submitd.queue_id"] == deliver.attributes["submitd.queue_id"] == queue_id
    # The relay's own hops: a new connection to the next hop (TCP, TLS, EHLO) and the transaction.
    [connect] = by_name(trace, "smtp.connect")
    [transaction] = by_name(trace, "smtp.transaction")
    assert connect.parent_id == transaction.parent_id == deliver.span_id
    assert transaction.kind == "CLIENT" and transaction.attributes["submitd.delivered"] == 1

    # Calls to policy and rewriter: a client span in the frontend, the server span in the
    # service, one trace.
    [auth] = by_name(trace, "smtp.auth")
    [policy_server] = [s for s in trace if s.service == "policy"]
    assert policy_server.kind == "SERVER" and policy_server.parent_id == auth.span_id and auth.kind == "CLIENT"
    assert policy_server.attributes["smtp.reply.code"] == 235
    rewriter_client = ids[rewriter_server.parent_id]
    assert rewriter_server.kind == "SERVER" and rewriter_client.kind == "CLIENT"
    assert rewriter_client.service == "frontend" and rewriter_client.parent_id == data.span_id
    assert "smtp.message.size" in data.attributes and data.attributes["smtp.recipients.count"] == 1
    assert len(trace) == 10, sorted(s.name for s in trace)

    # Health checks make no spans.
    assert not [s for s in spans if "health" in s.name.lower()]

    # Logs of the session and of the delivery carry the same trace id (and the queue id).
    def log_lines(service):
        return [json.loads(line) for line in stack.log_path(service).read_text().splitlines() if line.startswith("{")]

    accepted = [e for e in log_lines("frontend") if e["msg"] == "message accepted"]
    assert accepted and accepted[-1]["trace_id"] == session.trace_id and accepted[-1]["queue_id"] == queue_id
    closed = [e for e in log_lines("frontend") if e["msg"] == "session closed"]
    assert closed[-1]["queued"] == [queue_id] and closed[-1]["user"] == ALICE
    assert closed[-1]["trace_id"] == session.trace_id
    delivered = [e for e in log_lines("relay") if e["msg"] == "delivered"]
    assert delivered[-1]["trace_id"] == session.trace_id and delivered[-1]["queue_id"] == queue_id


def test_a_deferred_message_shows_both_attempts_in_its_trace(make_stack, otlp):
    stack = make_stack(env=otlp_env(otlp, relay={"RETRY_SCHEDULE": "[0.5]"}))
    stack.sink.handler.data_replies.append("451 4.3.0 <bob@example.net> try again")
    with logged_in(stack) as client:
        client.sendmail(ALICE, ["bob@example.net"], MSG)
    stack.sink.handler.wait_for(1, 20)
    spans = otlp.wait_for(lambda ss: len(by_name(ss, "relay.deliver")) >= 2)
    attempts = sorted(by_name(spans, "relay.deliver"), key=lambda s: s.attributes["submitd.attempt"])
    assert [a.attributes["submitd.attempt"] for a in attempts] == [1, 2]
    assert [a.attributes["submitd.outcome"] for a in attempts] == ["deferred", "delivered"]
    assert attempts[0].trace_id == attempts[1].trace_id
    assert attempts[0].parent_id == attempts[1].parent_id, "both are children of the publish"
    assert attempts[0].attributes["smtp.reply"][0] == "451 4.3.0 <…@example.net> try again", \
        "the next hop's reply is on the span, its addresses cut to the domain"


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def value(text: str, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''} ([0-9.e+-]+)$"
    m = re.search(pattern, text, flags=re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def test_metrics_move_by_the_workload(stack):
    p = stack.ports
    f0, r0 = scrape(p.frontend_http), scrape(p.relay_http)
    with logged_in(stack) as client:
        for _ in range(3):
            client.sendmail(ALICE, ["bob@example.net"], MSG)
        assert reply_of(client, "MAIL FROM:<bob@example.net>")[0] == 550
    stack.sink.handler.wait_for(3, 20)
    next_hop = f"127.0.0.1:{stack.sink.port}"
    delivered = f'next_hop="{next_hop}",result="delivered"'

    def delta(before, after, name, labels=""):
        return value(after, name, labels) - value(before, name, labels)

    # The relay counts a delivery once the next hop has answered: wait for all three, then
    # every count is exact.
    eventually(lambda: delta(r0, scrape(p.relay_http), "submitd_delivery_attempts_total", delivered) >= 3)
    f1, r1 = scrape(p.frontend_http), scrape(p.relay_http)
    assert delta(f0, f1, "submitd_messages_total", 'code="250",outcome="accepted"') == 3
    assert delta(f0, f1, "submitd_smtp_replies_total", 'code_class="5xx",enhanced="5.7.1"') == 1
    assert delta(f0, f1, "submitd_smtp_auth_total", 'result="success"') == 1
    assert delta(f0, f1, "submitd_smtp_sessions_total") == 1
    assert delta(f0, f1, "submitd_message_size_bytes_count") == 3
    assert delta(f0, f1, "submitd_backend_call_seconds_count", 'backend="rewriter"') == 3
    assert delta(r0, r1, "submitd_delivery_attempts_total", delivered) == 3
    assert not re.search(r"alice|bob@", f1 + r1), "no addresses in metric labels"


QUEUE_GAUGES = ("submitd_queue_messages", "submitd_queue_bytes", "submitd_queue_oldest_age_seconds",
                "submitd_consumer_pending", "submitd_consumer_ack_pending")


def stream_bytes(stack) -> int:
    """The queue stream's size as NATS itself reports it."""
    import asyncio

    import nats

    async def go():
        nc = await nats.connect(stack.nats.url)
        try:
            return (await nc.jetstream().stream_info(jetstream.STREAM)).state.bytes
        finally:
            await nc.close()

    return asyncio.run(go())


def test_queue_gauges_count_a_waiting_message_and_return_when_it_leaves(make_stack):
    """What an operator's queue alerts read: one message deferred at the next hop is one
    message, its bytes, one handed out and not acknowledged, and its age; gone once delivered.
    (The relay reads the queue every 15 s: this test waits for two readings.)"""
    stack = make_stack(env={"relay": {"ADMIN_TOKEN": "s3cret", "RETRY_SCHEDULE": "[3600]"}})
    port = stack.ports.relay_http
    before = {name: sample(port, name) for name in QUEUE_GAUGES}
    assert before == dict.fromkeys(QUEUE_GAUGES, 0.0), before
    stack.sink.handler.rcpt_replies["bob@example.net"] = "451 4.2.1 bob's mailbox busy"
    sent = time.monotonic()
    with logged_in(stack) as client:
        client.mail(ALICE)
        client.rcpt("bob@example.net")
        code, text = client.data(MSG)
    assert code == 250
    queue_id = text.decode().rsplit(" ", 1)[1]

    eventually(lambda: sample(port, "submitd_queue_messages") == 1, timeout=25, interval=0.25)
    held = {name: sample(port, name) for name in QUEUE_GAUGES}
    assert held["submitd_queue_bytes"] == stream_bytes(stack) > len(MSG)
    assert (held["submitd_consumer_pending"], held["submitd_consumer_ack_pending"]) == (0, 1), \
        "deferred: handed out, waiting for its retry"
    assert 0 < held["submitd_queue_oldest_age_seconds"] <= time.monotonic() - sent

    stack.sink.handler.rcpt_replies.clear()
    assert admin(stack, "POST", f"/api/v1/queue/messages/{queue_id}/retry")[0] == 200
    stack.sink.handler.wait_for(1, 20)
    eventually(lambda: sample(port, "submitd_queue_messages") == 0, timeout=25, interval=0.25)
    assert {name: sample(port, name) for name in QUEUE_GAUGES} == before


def exported(texts: list[str]) -> dict[str, dict[str, set[str]]]:
    """Every series name the services export (a counter's _total, a histogram's _bucket ...),
    with the label values seen in its samples."""
    out: dict[str, dict[str, set[str]]] = {}
    suffixes = {"histogram": ["_bucket", "_count", "_sum"], "summary": ["", "_count", "_sum"]}
    for text in texts:
        for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
            # (a counter's TYPE line carries its _total name in this exposition format)
            for suffix in suffixes.get(kind, [""]):
                out.setdefault(name + suffix, {})
        for name, labels in re.findall(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? ", text, re.M):
            series = out.setdefault(name, {})
            for label, v in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels or ""):
                series.setdefault(label, set()).add(v)
    return out


def test_every_dashboard_query_names_metrics_and_labels_the_services_export(stack):
    """The chart's Grafana dashboard, against what four real services export after some work."""
    import yaml
    from test_chart import by_kind, render

    with logged_in(stack) as client:
        client.sendmail(ALICE, ["bob@example.net"], MSG)
        assert reply_of(client, "MAIL FROM:<bob@example.net>")[0] == 550
    stack.sink.handler.wait_for(1, 20)
    p = stack.ports
    eventually(lambda: sample(p.relay_http, "submitd_delivery_attempts_total", result="delivered") >= 1)
    series = exported([scrape(port) for port in (p.frontend_http, p.policy_http, p.rewriter_http, p.relay_http)])

    [cm] = [c for c in by_kind(render({"monitoring": {"enabled": True}}), "ConfigMap").values()
            if c["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    dashboard = json.loads(cm["data"]["submitd.json"])
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 15
    added_by_prometheus = {"namespace", "pod", "job", "instance", "le"}
    for expr in exprs:
        names = re.findall(r"\b(submitd_\w+)", expr)
        assert names, expr
        for name in names:
            assert name in series, f"{name} is not exported by any service ({expr})"
        for name, matchers in re.findall(r"(submitd_\w+)\{([^}]*)\}", expr):
            for label, op, want in re.findall(r'(\w+)\s*(=~|!=|=)\s*"([^"]*)"', matchers):
                if label in added_by_prometheus:
                    continue
                assert label in series[name], f"{name} has no label {label}"
                assert any(re.fullmatch(want, v) for v in series[name][label]), f"{name}{{{label}{op}{want!r}}} matches nothing"
        for group in re.findall(r"by \(([^)]*)\)", expr):
            for label in (x.strip() for x in group.split(",")):
                if label in added_by_prometheus:
                    continue
                owners = [n for n in names if series[n]]  # series with samples show their labels
                assert all(label in series[n] for n in owners), f"{expr}: no {label} label"
    # The ConfigMap is where Grafana's sidecar looks, and off with monitoring.
    assert yaml.safe_load(cm["data"]["submitd.json"])["uid"] == "submitd-overview"
    assert not [c for c in by_kind(render({}), "ConfigMap").values() if "dashboard" in c["metadata"]["name"]]
