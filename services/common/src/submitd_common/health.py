"""Health driven by real dependency checks, served as grpc.health.v1 and over HTTP."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

log = logging.getLogger(__name__)

Check = Callable[[], bool | Awaitable[bool]]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """Runs named checks every ``interval`` seconds, and on demand when a probe asks
    (``fresh()``); serving means every check passed.

    ``services`` are the gRPC service names whose status follows the overall result
    (the empty name, the whole server, always does).
    """

    def __init__(self, services: list[str] | None = None, interval: float = 5.0) -> None:
        self.servicer = HealthServicer()
        self.services = ["", *(services or [])]
        self.interval = interval
        self.checks: dict[str, Check] = {}
        self.results: dict[str, bool] = {}
        self.reports: dict[str, Callable[[], bool]] = {}  # shown by /readyz, never gating it
        self.draining = False
        self._task: asyncio.Task | None = None
        self.checked_at = 0.0

    def add_check(self, name: str, check: Check) -> None:
        self.checks[name] = check

    def add_report(self, name: str, report: Callable[[], bool]) -> None:
        """A dependency /readyz shows without taking the service out of rotation (a directory
        that is down: policy still answers, and logins in its cache still work)."""
        self.reports[name] = report

    def reported(self) -> dict[str, bool]:
        out = {}
        for name, report in self.reports.items():
            try:
                out[name] = bool(report())
            except Exception:
                out[name] = False
        return out

    @property
    def ready(self) -> bool:
        return not self.draining and bool(self.results) and all(self.results.values())

    async def fresh(self, max_age: float = 1.0) -> bool:
        """The result, checked again if the last check is older than ``max_age`` seconds."""
        if time.monotonic() - self.checked_at > max_age:
            return await self.check_now()
        return self.ready

    async def check_now(self) -> bool:
        self.checked_at = time.monotonic()
        for name, check in self.checks.items():
            try:
                result = check()
                if inspect.isawaitable(result):
                    result = await asyncio.wait_for(result, timeout=1.0)
                ok = bool(result)
            except Exception as e:  # a failing check is an unhealthy dependency, not a crash
                log.debug("health check %s failed: %s", name, e)
                ok = False
            if self.results.get(name) != ok:
                log.log(logging.INFO if ok else logging.WARNING, "health %s: %s", name, "ok" if ok else "failing")
            self.results[name] = ok
        if not self.checks:
            self.results["self"] = True
        status = SERVING if self.ready else NOT_SERVING
        for service in self.services:
            await self.servicer.set(service, status)
        return self.ready

    async def _loop(self) -> None:
        while True:
            await self.check_now()
            await asyncio.sleep(self.interval)

    async def start(self) -> Callable[[], Awaitable[None]]:
        await self.check_now()
        self._task = asyncio.create_task(self._loop(), name="health")

        async def stop() -> None:
            assert self._task is not None
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

        return stop

    async def set_draining(self) -> None:
        """Readiness off for good: load balancers stop sending new work."""
        self.draining = True
        for service in self.services:
            await self.servicer.set(service, NOT_SERVING)
