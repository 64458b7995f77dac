"""The HTTP side of a service: /healthz, /readyz and /metrics (FastAPI under uvicorn)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import uvicorn
from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .health import Health


def health_app(health: Health, title: str) -> FastAPI:
    app = FastAPI(title=title, docs_url=None, redoc_url=None)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict:
        # Liveness: the event loop answers. Dependencies are readiness's business.
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(response: Response) -> dict:
        await health.fresh()
        if not health.ready:
            response.status_code = 503
        return {"ready": health.ready, "draining": health.draining, "checks": health.results,
                "reports": health.reported()}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.exit_requested = asyncio.Event()

    # The service owns SIGTERM/SIGINT; uvicorn must not take them over.
    @contextlib.contextmanager
    def capture_signals(self):
        yield

    async def main_loop(self) -> None:
        # uvicorn's loop wakes ten times a second to refresh its Date header; with no Date
        # header an idle service need not wake at all.
        await self.on_tick(0)
        await self.exit_requested.wait()


def split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


async def serve_http(app: FastAPI, host: str, port: int) -> tuple[int, Callable[[], Awaitable[None]]]:
    """Serve ``app`` on the running loop. Returns the bound port and a finalizer."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="off", access_log=False,
        date_header=False, server_header=False,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(), name="http")
    while not server.started:
        if task.done():
            task.result()  # raises the bind error
        await asyncio.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]

    async def stop() -> None:
        server.should_exit = True
        server.exit_requested.set()
        await task

    return bound, stop
