"""Assembly of the embed service's gRPC server: backend, servicer, health, reflection, shutdown."""

import threading

import grpc
import structlog
from grpc_health.v1 import health

from embed_service.backends import Embedder, create_embedder
from embed_service.config import EmbedConfig
from embed_service.servicer import SERVICE_NAME, EmbedServicer
from imgsearch.embed.v1 import embed_service_pb2_grpc
from imgsearch_common.errors import ImgsearchError
from imgsearch_common.serving import (
    add_health_and_reflection,
    create_server,
    serve_until_signalled,
    set_serving,
)

log = structlog.get_logger(__name__)

# Seconds between readiness checks of a backend that is not ready yet.
READY_RECHECK_S = 5.0


def build_server(config: EmbedConfig) -> tuple[grpc.Server, health.HealthServicer, int]:
    """Create, bind and start the embed server, and return it with its health servicer and port.

    Health stays NOT_SERVING until the backend's check_ready() passes. A background thread
    checks again every READY_RECHECK_S seconds, and closes the backend once the server has
    terminated. Raises RuntimeError when config.listen cannot be bound.
    """
    embedder = create_embedder(config)
    server = create_server(config.max_workers, config.max_message_bytes)
    embed_service_pb2_grpc.add_EmbedServiceServicer_to_server(
        EmbedServicer(embedder, config.batch_size), server
    )
    health_servicer = add_health_and_reflection(server, [SERVICE_NAME])
    try:
        port = server.add_insecure_port(config.listen)
    except RuntimeError as error:
        embedder.close()
        raise RuntimeError(f"could not bind the embed service to {config.listen}: {error}") from error

    server.start()
    watcher = threading.Thread(
        target=_watch_readiness, args=(server, health_servicer, embedder), name="embed-readiness", daemon=True
    )
    watcher.start()
    return server, health_servicer, port


def run(config: EmbedConfig) -> None:
    """Serve until SIGTERM or SIGINT, then drain for config.grace_s seconds. Call configure_logging first."""
    server, health_servicer, port = build_server(config)
    log.info("embed_server_started", listen=config.listen, port=port, config=repr(config))
    serve_until_signalled(server, health_servicer, [SERVICE_NAME], config.grace_s)


def _watch_readiness(server: grpc.Server, health_servicer: health.HealthServicer, embedder: Embedder) -> None:
    """Turn health SERVING once the embedder is ready, then close the embedder when the server ends."""
    try:
        last_error = None
        while (last_error := _readiness_error(embedder, last_error)) is not None:
            # wait_for_termination returns False once the server has stopped.
            if not server.wait_for_termination(timeout=READY_RECHECK_S):
                return
        set_serving(health_servicer, [SERVICE_NAME], serving=True)
        info = embedder.info()
        log.info("embed_service_ready", model_id=info.model_id, dim=info.dim, backend=info.backend)
        # TODO: a backend that fails after it was ready keeps health SERVING, because health
        # checks of the Inference server while serving are not designed yet.
        server.wait_for_termination()
    finally:
        embedder.close()


def _readiness_error(embedder: Embedder, last_error: str | None) -> str | None:
    """Return why the embedder is not ready, or None. Each new reason is logged once as a warning."""
    try:
        embedder.check_ready()
        return None
    except ImgsearchError as error:
        reason = str(error)
    except Exception as error:  # noqa: BLE001 - a bug in a backend must not end the readiness thread
        log.exception("embed_backend_check_failed_unexpectedly")
        reason = f"{type(error).__name__}: {error}"
    if reason != last_error:
        log.warning("embed_backend_not_ready", reason=reason, recheck_s=READY_RECHECK_S)
    return reason
