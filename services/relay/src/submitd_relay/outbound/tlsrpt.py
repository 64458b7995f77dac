"""SMTP TLS Reporting (RFC 8460): the result of every TLS attempt to an MX host counted per day
and policy domain, the counts of every relay replica merged in NATS KV, and once a day one
report per domain, sent to the addresses its ``_smtp._tls`` TXT record names by exactly one
replica (whichever creates the domain's ``sent`` key first).

In the bucket (jetstream.TLSRPT_BUCKET): ``counts.<day>.<domain>`` holds the merged counts, each
replica adding what it counted since its last flush with compare-and-set, so no replica's counts
are lost to another's write; ``sent.<day>.<domain>`` is the lock and, once the report went, what
became of it. ``<day>`` is the period's start (20261207T000000Z); TLSRPT_INTERVAL shortens the
period for tests only. The counts, the report and its delivery: tlsrpt_report."""

from __future__ import annotations

import asyncio
import calendar
import gzip
import json
import logging
import secrets
import time
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from pydantic import BaseModel, Field

from submitd_common import jetstream
from submitd_common.addresses import domain_key
from submitd_common.ids import new_queue_id

from .. import metrics
from . import results as R
from . import tlsrpt_report as rpt
from .tlsrpt_report import DomainCounts, domain_of_key, key_domain

log = logging.getLogger("submitd.relay")
CONCURRENCY = 8  # domains reported at a time
MERGE_ATTEMPTS = 20


class TlsReportingSettings(BaseModel):
    """The relay's TLS reporting settings (a mixin of the relay's Settings)."""

    tlsrpt: bool = Field(True, description="Count TLS results per recipient domain and send the daily TLS reports "
                         "(RFC 8460) to the domains that ask for them (the submitd_relay_tls_policy_total metric is "
                         "kept either way)")
    tlsrpt_organization: str | None = Field(None, description="organization-name of TLS reports (default HELO_NAME)")
    tlsrpt_contact: str | None = Field(None, description="contact-info of TLS reports (default TLSRPT_FROM)")
    tlsrpt_from: str | None = Field(
        None, description="From of TLS reports sent by mail (default BOUNCE_FROM, else MAILER-DAEMON@HELO_NAME)")
    tlsrpt_flush_interval: float = Field(
        60.0, gt=0, description="Seconds between writes of this replica's counts to NATS (and at shutdown): what a "
        "replica that dies loses at most; reports go out twice this long after midnight UTC")
    tlsrpt_interval: int = Field(86400, ge=1, description="Seconds one report covers: a UTC day (tests only shorten it)")
    tlsrpt_ca_file: str | None = Field(None, description="CA bundle for https: report addresses (default: the "
                                       "system's trust store)")
    tlsrpt_https_port: int = Field(443, description="Port of https: report addresses that name none")
    tlsrpt_https_timeout: float = Field(30.0, description="Seconds for one report POSTed to an https: address")


@dataclass(frozen=True)
class Period:
    """One report's time range: [start, end) in seconds since the epoch."""

    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def label(self) -> str:
        return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.start))

    @property
    def previous(self) -> "Period":
        return Period(self.start - self.length, self.length)

    @property
    def next(self) -> "Period":
        return Period(self.end, self.length)

    @classmethod
    def of(cls, t: float, length: int) -> "Period":
        return cls(int(t // length) * length, length)

    @classmethod
    def from_label(cls, label: str, length: int) -> "Period":
        return cls(calendar.timegm(time.strptime(label, "%Y%m%dT%H%M%SZ")), length)


@dataclass
class SentReport:
    """What one replica did with one domain's report."""

    domain: str
    report_id: str
    outcomes: dict[str, str]  # rua URI -> "sent", "queued <queue id>" or "failed: why"
    report: dict | None = None  # the JSON report (none without a TLSRPT record)


class TlsReporting:
    """Counts TLS results (``record``, from the delivery code) and sends the daily reports.

    ``await start(resolver)`` opens the bucket and starts the flush and report loops;
    ``await close()`` stops them and writes what is still counted."""

    def __init__(self, js: JetStreamContext, settings, reports, *, clock=time.time) -> None:
        """``reports``: the relay's reports.Reports, which queues (and has signed) what the relay
        writes. (Not imported here: the relay's settings module imports this one for its mixin.)"""
        self.js = js
        self.s = settings
        self.clock = clock
        self.reports = reports
        self.resolver = None  # routes.MxResolver: its dnspython resolver and its idea of a reachable address
        self.kv = None
        self.pending: dict[tuple[Period, str], DomainCounts] = {}
        self.from_address = settings.tlsrpt_from or settings.bounce_from or f"MAILER-DAEMON@{settings.helo_name}"
        self._flushing = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def period_of(self, t: float) -> Period:
        return Period.of(t, self.s.tlsrpt_interval)

    def record(self, result: R.TlsResult) -> None:
        """One TLS attempt: counted in the metric, and for the policy domain's report."""
        metrics.TLS_POLICY.labels(result.policy_type, "success" if result.ok else result.result_type).inc()
        if not self.s.tlsrpt or not result.policy_domain:
            return  # (no domain: a session under no domain's policy, such as a TLS report's own)
        domain = domain_key(result.policy_domain).rstrip(".")
        key = (self.period_of(self.clock()), domain)
        counts = self.pending.get(key)
        if counts is None:
            counts = self.pending[key] = DomainCounts()
        counts.add(result)

    async def start(self, resolver) -> None:
        self.resolver = resolver
        if not self.s.tlsrpt:
            return
        from ..streams import tls_reports

        self.kv = await jetstream.open_kv(self.js, tls_reports(self.s))  # as provisioning made it
        self._tasks = [asyncio.create_task(self._flush_loop(), name="tlsrpt flush"),
                       asyncio.create_task(self._report_loop(), name="tlsrpt reports")]

    async def close(self, timeout: float = 10.0) -> None:
        """Stop the loops (a report being sent may finish within ``timeout``), then write the counts."""
        self._stopping.set()
        if self._tasks:
            _, running = await asyncio.wait(self._tasks, timeout=timeout)
            for task in running:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.kv is not None:
            try:
                await asyncio.wait_for(self.flush(), timeout)
            except asyncio.TimeoutError:
                log.warning("TLS report counts not written at shutdown: NATS did not answer")

    async def _sleep(self, seconds: float) -> bool:
        """Wait; True if stopping."""
        try:
            await asyncio.wait_for(self._stopping.wait(), max(0.0, seconds))
        except asyncio.TimeoutError:
            return False
        return True

    async def _flush_loop(self) -> None:
        while not await self._sleep(self.s.tlsrpt_flush_interval):
            try:
                await self.flush()
            except Exception:
                log.exception("TLS report counts: flush failed")

    async def _report_loop(self) -> None:
        # First the period before this one: a replica (re)started after midnight sends what is
        # still unsent, and the lock keeps it to one report however many replicas try.
        period = self.period_of(self.clock()).previous
        while True:
            # Every replica has written its counts of the period by then (two flushes later).
            if await self._sleep(period.end + 2 * self.s.tlsrpt_flush_interval - self.clock()):
                return
            try:
                await self.send_reports(period)
            except Exception:
                log.exception("TLS reports for %s failed", period.label)
            period = period.next

    async def flush(self) -> None:
        """Add what this replica counted since the last flush to the shared counts. What could not
        be written (NATS away) is kept for the next flush."""
        async with self._flushing:
            pending, self.pending = self.pending, {}
            failed = False
            for (period, domain), counts in pending.items():
                name = key_domain(domain)
                if name is None:
                    continue
                if not failed:
                    try:
                        await self._merge(f"counts.{period.label}.{name}", counts)
                        continue
                    except Exception as e:
                        # Kept, and the rest with it: NATS that failed one write would only
                        # make every other wait for its timeout too.
                        log.warning("TLS report counts not written yet (%d domains kept): %r", len(pending), e)
                        failed = True
                self.pending.setdefault((period, domain), DomainCounts()).merge(counts)

    async def _merge(self, key: str, counts: DomainCounts) -> None:
        for _ in range(MERGE_ATTEMPTS):
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                entry = None
            merged = DomainCounts()
            if entry is not None and entry.value:
                try:
                    merged = DomainCounts.from_bytes(entry.value)
                except (ValueError, KeyError, TypeError, AttributeError):
                    log.warning("unreadable TLS report counts in %s replaced", key)
            merged.merge(counts)
            try:
                if entry is None:
                    await self.kv.create(key, merged.to_bytes())
                else:
                    await self.kv.update(key, merged.to_bytes(), last=entry.revision)
                return
            except KeyWrongLastSequenceError:
                continue  # another replica wrote first: read theirs and add ours again
        raise RuntimeError(f"{key}: still contended after {MERGE_ATTEMPTS} attempts")

    async def domains(self, period: Period) -> list[str]:
        """The policy domains counted in ``period`` (by any replica)."""
        prefix = f"$KV.{jetstream.TLSRPT_BUCKET}.counts.{period.label}."
        info = await self.js.stream_info(f"KV_{jetstream.TLSRPT_BUCKET}", subjects_filter=f"{prefix}>")
        return sorted(domain_of_key(s.removeprefix(prefix)) for s in (info.state.subjects or {}))

    async def send_reports(self, period: Period) -> list[SentReport]:
        """Send ``period``'s reports this replica gets the lock of; returns what it did with them."""
        await self.flush()
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one(domain: str) -> SentReport | None:
            async with limit:
                if self._stopping.is_set():
                    return None
                try:
                    return await self._send(period, domain)
                except Exception:
                    log.exception("TLS report for %s (%s) failed", domain, period.label)
                    return None

        done = await asyncio.gather(*(one(d) for d in await self.domains(period)))
        return [r for r in done if r is not None]

    async def _send(self, period: Period, domain: str) -> SentReport | None:
        name = key_domain(domain)
        lock = f"sent.{period.label}.{name}"
        stamp = {"by": self.s.helo_name, "at": time.time()}
        try:
            revision = await self.kv.create(lock, json.dumps(stamp).encode())
        except KeyWrongLastSequenceError:
            return None  # another replica has it
        counts = DomainCounts.from_bytes((await self.kv.get(f"counts.{period.label}.{name}")).value)
        rua = await rpt.lookup_rua(self.resolver.r, domain)
        if not rua:
            metrics.TLS_REPORTS.labels("no-record").inc()
            await self.kv.update(lock, json.dumps({**stamp, "rua": {}}).encode(), last=revision)
            return SentReport(domain, "", {})
        submitter = self.s.helo_name
        report_id = f"{period.label}.{secrets.token_hex(8)}@{submitter}"
        report = rpt.build_report(
            organization=self.s.tlsrpt_organization or submitter, contact=self.s.tlsrpt_contact or self.from_address,
            report_id=report_id, start=period.start, end=period.end, domain=domain, counts=counts)
        data = gzip.compress(json.dumps(report, separators=(",", ":")).encode(), mtime=0)
        outcomes: dict[str, str] = {}
        for uri in rua:
            try:
                if uri.lower().startswith("https:"):
                    await rpt.post_report(uri, data, self.resolver, port=self.s.tlsrpt_https_port,
                                           ca_file=self.s.tlsrpt_ca_file, timeout=self.s.tlsrpt_https_timeout)
                    outcomes[uri], result = "sent", "https"
                else:
                    queue_id = await self._mail(uri, period, domain, report_id, data, counts)
                    outcomes[uri], result = f"queued {queue_id}", "mailto"
            except Exception as e:
                outcomes[uri], result = f"failed: {e}", "failed"
                log.warning("TLS report for %s to %s failed: %s", domain, uri, e)
            metrics.TLS_REPORTS.labels(result).inc()
        await self.kv.update(lock, json.dumps({**stamp, "report_id": report_id, "rua": outcomes}).encode(),
                             last=revision)
        log.info("TLS report sent", extra={"fields": {"domain": domain, "period": period.label,
                                                      "report_id": report_id, "rua": outcomes}})
        return SentReport(domain, report_id, outcomes, report)

    async def _mail(self, uri: str, period: Period, domain: str, report_id: str, data: bytes,
                    counts: DomainCounts) -> str:
        """Queue the report for a mailto: address like any message (RFC 8460 §5.3); its queue id."""
        to = rpt.mailto_address(uri)
        queue_id = new_queue_id()
        message = rpt.report_message(
            queue_id=queue_id, report_id=report_id, domain=domain, submitter=self.s.helo_name,
            from_address=self.from_address, to=to, start=period.start, end=period.end, data=data,
            totals=counts.totals)

        async def parts():
            yield message

        # The same report to the same address has the same Nats-Msg-Id: queued once.
        msg_id = f"tlsrpt.{period.label}.{key_domain(domain)}.{rpt.digest(to)}"
        await self.reports.queue_written(rpt.report_envelope(queue_id, to), parts, msg_id=msg_id,
                                         large=len(message) > self.s.inline_body_limit)
        return queue_id
