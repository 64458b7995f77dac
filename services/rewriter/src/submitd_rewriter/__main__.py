"""submitd-rewriter: the gRPC message completion and signing service."""

from __future__ import annotations

import logging

from submitd.v1 import rewriter_pb2, rewriter_pb2_grpc
from submitd_common import grpcutil, lifecycle
from submitd_common.health import Health
from submitd_common.logs import setup_logging
from submitd_common.telemetry import setup_telemetry

from .service import RewriterService
from .settings import Settings

log = logging.getLogger("submitd.rewriter")
SERVICE_NAME = rewriter_pb2.DESCRIPTOR.services_by_name["Rewriter"].full_name


async def amain() -> None:
    settings = Settings()
    setup_logging("rewriter", settings.log_level)
    provider = setup_telemetry("rewriter")
    health = Health([SERVICE_NAME])
    stop_health = await health.start()
    service = RewriterService(settings)
    _, port, stop_grpc = await grpcutil.start_server(
        settings.listen, lambda s: rewriter_pb2_grpc.add_RewriterServicer_to_server(service, s), health
    )
    log.info("rewriter listening", extra={"fields": {"port": port}})
    await lifecycle.wait_for_signal()
    log.info("rewriter draining")
    await health.set_draining()
    await stop_grpc(settings.drain_seconds)
    await stop_health()
    provider.shutdown()


def main() -> None:
    lifecycle.run(amain)


if __name__ == "__main__":
    main()
