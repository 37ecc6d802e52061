"""Assembly of the embed service's gRPC server: backend, servicer, health, reflection, shutdown."""

import threading
import time

import grpc
import numpy as np
import structlog
from grpc_health.v1 import health

from embed_service.analysis import ImageAnalyser
from embed_service.backends import Embedder, create_embedder
from embed_service.backends.base import ModelInfo
from embed_service.config import ENV_PREFIX, EmbedConfig
from embed_service.servicer import SERVICE_NAME, EmbedServicer
from imgsearch.embed.v1 import embed_service_pb2_grpc
from imgsearch_common.errors import ImgsearchError, UnavailableError
from imgsearch_common.metrics import ServiceMetrics, serve_metrics
from imgsearch_common.security import server_credentials
from imgsearch_common.serving import (
    add_health_and_reflection,
    bind_port,
    create_server,
    serve_until_signalled,
    set_serving,
)

log = structlog.get_logger(__name__)


def build_server(config: EmbedConfig) -> tuple[grpc.Server, health.HealthServicer, int]:
    """Create, bind and start the embed server, and return it with its health servicer and port.

    Health stays NOT_SERVING until the backend's check_ready() passes, and follows the backend
    from then on (see BackendHealth). A background thread probes the backend every
    config.health_interval_s seconds, and closes the backend once the server has terminated.
    A non-empty config.metrics_listen serves Prometheus metrics there until the server terminates.
    Raises RuntimeError when config.listen or config.metrics_listen cannot be bound, and ConfigError
    when a TLS file cannot be used.
    """
    credentials = server_credentials(ENV_PREFIX, config.tls_cert, config.tls_key, config.tls_client_ca)
    metrics = ServiceMetrics()
    embedder = MeteredEmbedder(create_embedder(config), metrics, config.backend)
    server = create_server(config.max_workers, config.max_message_bytes, config.auth_token, metrics)
    health_servicer = add_health_and_reflection(server, [SERVICE_NAME])
    backend_health = BackendHealth(
        embedder, health_servicer, config.health_interval_s, config.health_failure_threshold
    )
    embed_service_pb2_grpc.add_EmbedServiceServicer_to_server(
        EmbedServicer(
            HealthRecordingEmbedder(embedder, backend_health),
            config.batch_size,
            ImageAnalyser(config.max_image_pixels),
        ),
        server,
    )
    try:
        port = bind_port(
            server, config.listen, credentials, authenticated=bool(config.auth_token or config.tls_client_ca)
        )
    except RuntimeError as error:
        embedder.close()
        raise RuntimeError(f"could not bind the embed service to {config.listen}: {error}") from error

    server.start()
    watcher = threading.Thread(target=backend_health.watch, args=(server,), name="embed-health", daemon=True)
    watcher.start()
    try:
        serve_metrics(config.metrics_listen, metrics, server)
    except RuntimeError:
        # Stopping the server ends the health thread, which closes the embedder.
        server.stop(None)
        raise
    return server, health_servicer, port


def run(config: EmbedConfig) -> None:
    """Serve until SIGTERM or SIGINT, then drain for config.grace_s seconds. Call configure_logging first."""
    server, health_servicer, port = build_server(config)
    log.info("embed_server_started", listen=config.listen, port=port, config=repr(config))
    serve_until_signalled(server, health_servicer, [SERVICE_NAME], config.grace_s)


class BackendHealth:
    """The health status of the embed service, following whether its backend can embed.

    A probe (the embedder's check_ready) runs every interval_s seconds and sets the status from its
    result. The probe is skipped while the service is SERVING and real traffic has embedded an image
    or a text since the last probe. Between probes, failure_threshold images or texts in a row that
    fail with UNAVAILABLE turn the status NOT_SERVING at once. Only a passing probe turns it SERVING again.
    """

    def __init__(
        self,
        embedder: Embedder,
        health_servicer: health.HealthServicer,
        interval_s: float,
        failure_threshold: int,
    ):
        self._embedder = embedder
        self._health_servicer = health_servicer
        self._interval_s = interval_s
        self._failure_threshold = failure_threshold
        self._lock = threading.Lock()
        self._serving = False
        self._consecutive_failures = 0
        self._embedded_since_probe = False
        self._last_reason: str | None = None

    def watch(self, server: grpc.Server) -> None:
        """Probe every interval_s seconds until the server terminates, then close the embedder."""
        try:
            while True:
                self._probe_unless_busy()
                # wait_for_termination returns False once the server has stopped.
                if not server.wait_for_termination(timeout=self._interval_s):
                    return
        finally:
            self._embedder.close()

    def record_results(self, results: list) -> None:
        """Count UNAVAILABLE results in a row, and turn NOT_SERVING when they reach the threshold.

        An embedded image resets the count. Other errors, such as invalid images or the caller's
        deadline, say nothing about the backend and leave the count as it is.
        """
        with self._lock:
            last_failure = None
            for result in results:
                if isinstance(result, np.ndarray):
                    self._consecutive_failures = 0
                    self._embedded_since_probe = True
                elif isinstance(result, UnavailableError):
                    self._consecutive_failures += 1
                    last_failure = result
            if self._serving and self._consecutive_failures >= self._failure_threshold:
                log.warning(
                    "embed_backend_failed_repeatedly",
                    consecutive_failures=self._consecutive_failures,
                    threshold=self._failure_threshold,
                    last_error=str(last_failure),
                )
                self._set_not_serving_locked(f"{self._consecutive_failures} images in a row failed")

    def _probe_unless_busy(self) -> None:
        with self._lock:
            busy = self._serving and self._embedded_since_probe
            self._embedded_since_probe = False
        if busy:
            return
        info, reason = _probe(self._embedder)
        with self._lock:
            if info is not None:
                self._set_serving_locked(info)
            elif reason != self._last_reason or self._serving:
                log.warning("embed_backend_not_ready", reason=reason, recheck_s=self._interval_s)
                self._set_not_serving_locked(reason)

    def _set_serving_locked(self, info: ModelInfo) -> None:
        self._consecutive_failures = 0
        self._last_reason = None
        if self._serving:
            return
        self._serving = True
        set_serving(self._health_servicer, [SERVICE_NAME], serving=True)
        log.info("embed_service_ready", model_id=info.model_id, dim=info.dim, backend=info.backend)

    def _set_not_serving_locked(self, reason: str) -> None:
        self._last_reason = reason
        self._serving = False
        set_serving(self._health_servicer, [SERVICE_NAME], serving=False)


class HealthRecordingEmbedder:
    """An embedder that delegates to another and reports every embed result to a BackendHealth."""

    def __init__(self, embedder: Embedder, backend_health: BackendHealth):
        self._embedder = embedder
        self._backend_health = backend_health

    def info(self) -> ModelInfo:
        return self._embedder.info()

    def embed_images(self, images: list[bytes], timeout_s: float) -> list[np.ndarray | ImgsearchError]:
        try:
            results = self._embedder.embed_images(images, timeout_s)
        except UnavailableError as error:
            self._backend_health.record_results([error] * len(images))
            raise
        self._backend_health.record_results(results)
        return results

    def embed_text(self, text: str, timeout_s: float) -> np.ndarray:
        try:
            vector = self._embedder.embed_text(text, timeout_s)
        except UnavailableError as error:
            self._backend_health.record_results([error])
            raise
        self._backend_health.record_results([vector])
        return vector

    def check_ready(self) -> None:
        self._embedder.check_ready()

    def close(self) -> None:
        self._embedder.close()


class MeteredEmbedder:
    """An embedder that delegates to another and records each embed call's duration, and its image or text count, by backend."""

    def __init__(self, embedder: Embedder, metrics: ServiceMetrics, backend: str):
        self._embedder = embedder
        self._embed_duration = metrics.histogram(
            "imgsearch_embed_duration_seconds", "Duration in seconds of one backend embed call, by backend.", ["backend"]
        ).labels(backend)
        self._images_embedded = metrics.counter(
            "imgsearch_embed_images", "Images sent to the backend to embed, by backend.", ["backend"]
        ).labels(backend)
        self._text_duration = metrics.histogram(
            "imgsearch_embed_text_duration_seconds", "Duration in seconds of one backend text embed call, by backend.",
            ["backend"],
        ).labels(backend)
        self._texts_embedded = metrics.counter(
            "imgsearch_embed_texts", "Texts sent to the backend to embed, by backend.", ["backend"]
        ).labels(backend)

    def info(self) -> ModelInfo:
        return self._embedder.info()

    def embed_images(self, images: list[bytes], timeout_s: float) -> list[np.ndarray | ImgsearchError]:
        started = time.perf_counter()
        try:
            return self._embedder.embed_images(images, timeout_s)
        finally:
            self._embed_duration.observe(time.perf_counter() - started)
            self._images_embedded.inc(len(images))

    def embed_text(self, text: str, timeout_s: float) -> np.ndarray:
        started = time.perf_counter()
        try:
            return self._embedder.embed_text(text, timeout_s)
        finally:
            self._text_duration.observe(time.perf_counter() - started)
            self._texts_embedded.inc()

    def check_ready(self) -> None:
        self._embedder.check_ready()

    def close(self) -> None:
        self._embedder.close()


def _probe(embedder: Embedder) -> tuple[ModelInfo | None, str | None]:
    """Return the model info when the embedder's check passes, else None and the reason."""
    try:
        embedder.check_ready()
        return embedder.info(), None
    except ImgsearchError as error:
        return None, str(error)
    except Exception as error:  # noqa: BLE001 - a bug in a backend must not end the health thread
        log.exception("embed_backend_check_failed_unexpectedly")
        return None, f"{type(error).__name__}: {error}"
