"""Prometheus metrics of one service: RPC counts and latency, and an HTTP server that exposes them."""

import threading
import time
from collections.abc import Callable
from http.server import ThreadingHTTPServer

import grpc
import prometheus_client
import structlog

from imgsearch_common.config import ConfigError
from imgsearch_common.rpc_log import _status_of

log = structlog.get_logger(__name__)

# Health handlers are left unwrapped for the reason that rpc_log gives: a wrapper would make the
# non-blocking Watch hold a worker thread for as long as the watch lasts.
_HEALTH_PREFIX = "/grpc.health."


class ServiceMetrics:
    """The metrics of one service, in a registry of their own so that servers in one process stay apart."""

    def __init__(self):
        self.registry = prometheus_client.CollectorRegistry()
        self.rpcs = prometheus_client.Counter(
            "imgsearch_rpcs", "RPCs that ended, by method and status.", ["method", "status"], registry=self.registry
        )
        self.rpc_duration = prometheus_client.Histogram(
            "imgsearch_rpc_duration_seconds",
            "Duration of RPCs in seconds, whole streams included, by method and status.",
            ["method", "status"],
            registry=self.registry,
        )

    def counter(self, name: str, documentation: str, labels: list[str]) -> prometheus_client.Counter:
        """Create a counter in this registry. prometheus-client adds _total to its name on export."""
        return prometheus_client.Counter(name, documentation, labels, registry=self.registry)

    def histogram(self, name: str, documentation: str, labels: list[str]) -> prometheus_client.Histogram:
        """Create a histogram with prometheus-client's default buckets (5 ms to 10 s) in this registry."""
        return prometheus_client.Histogram(name, documentation, labels, registry=self.registry)

    def gauge_function(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """Create a gauge whose value read() returns at each scrape."""
        gauge = prometheus_client.Gauge(name, documentation, registry=self.registry)
        gauge.set_function(read)

    def interceptor(self) -> grpc.ServerInterceptor:
        """Return a server interceptor that counts and times every RPC except health checks."""
        return _MetricsInterceptor(self)

    def record_rpc(self, method: str, status: str, started: float) -> None:
        """Count one finished RPC and observe its duration since the perf_counter() value started."""
        self.rpcs.labels(method, status).inc()
        self.rpc_duration.labels(method, status).observe(time.perf_counter() - started)


def serve_metrics(listen: str, metrics: ServiceMetrics, server: grpc.Server) -> int | None:
    """Serve metrics.registry over HTTP at listen (host:port) until server terminates, and return the port.

    Returns None and serves nothing when listen is empty. Raises ConfigError when listen is not
    host:port, and RuntimeError when it cannot be bound.
    """
    if not listen:
        return None
    host, port = parse_listen("metrics listen address", listen)
    try:
        http_server, _ = prometheus_client.start_http_server(port, host, metrics.registry)
    except OSError as error:
        raise RuntimeError(f"could not bind the metrics server to {listen}: {error}") from error
    port = http_server.server_address[1]
    threading.Thread(
        target=_stop_with, args=(server, http_server), name="metrics-stopper", daemon=True
    ).start()
    log.info("metrics_server_started", listen=listen, port=port)
    return port


def parse_listen(setting: str, listen: str) -> tuple[str, int]:
    """Split a host:port address into host and port, raising ConfigError that names setting when it is malformed."""
    host, separator, port_text = listen.rpartition(":")
    if not separator or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"{setting} must be host:port, for example 127.0.0.1:9464, got {listen!r}")
    return host.strip("[]"), int(port_text)


def _stop_with(server: grpc.Server, http_server: ThreadingHTTPServer) -> None:
    server.wait_for_termination()
    http_server.shutdown()
    http_server.server_close()
    log.info("metrics_server_stopped", port=http_server.server_address[1])


class _MetricsInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics: ServiceMetrics):
        self._metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_HEALTH_PREFIX):
            return handler
        if handler.unary_unary:
            return handler._replace(unary_unary=self._wrap_unary(handler.unary_unary, method))
        if handler.stream_stream:
            return handler._replace(stream_stream=self._wrap_streaming(handler.stream_stream, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._wrap_streaming(handler.unary_stream, method))
        return handler._replace(stream_unary=self._wrap_unary(handler.stream_unary, method))

    def _wrap_unary(self, behaviour, method):
        def wrapper(request, context):
            started = time.perf_counter()
            try:
                response = behaviour(request, context)
            except BaseException:
                self._metrics.record_rpc(method, _status_of(context, failed=True), started)
                raise
            self._metrics.record_rpc(method, _status_of(context, failed=False), started)
            return response

        return wrapper

    def _wrap_streaming(self, behaviour, method):
        def wrapper(request, context):
            started = time.perf_counter()
            try:
                yield from behaviour(request, context)
            except BaseException:
                self._metrics.record_rpc(method, _status_of(context, failed=True), started)
                raise
            self._metrics.record_rpc(method, _status_of(context, failed=False), started)

        return wrapper
