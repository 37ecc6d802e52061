"""gRPC server plumbing shared by both services: limits, TLS and tokens, health, reflection and shutdown."""

import signal
import threading
from collections.abc import Callable, Iterable
from concurrent import futures

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from imgsearch_common.metrics import ServiceMetrics
from imgsearch_common.rpc_log import RpcLogInterceptor
from imgsearch_common.security import BearerTokenInterceptor, warn_if_exposed
from imgsearch_common.stream_limit import StreamLimitInterceptor

log = structlog.get_logger(__name__)

# The empty service name reports the server as a whole, as the health protocol specifies.
OVERALL = ""
# Maximum time between a stop signal and the start of the shutdown.
_SIGNAL_POLL_S = 0.5


def message_size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel and server options that raise gRPC's 4 MiB message limit to max_message_bytes."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def create_server(
    max_workers: int, max_message_bytes: int, auth_token: str = "", metrics: ServiceMetrics | None = None
) -> grpc.Server:
    """Create a server with a bounded thread pool, raised message limits and one log line per RPC.

    SO_REUSEPORT is off, so a second server on a port that is in use fails to start instead of
    sharing the port. A non-empty auth_token makes every RPC but health checks need it as a bearer token.

    An open stream occupies its thread even while its client sends nothing. So at most max_workers - 1
    streaming calls run at once (1 when max_workers is 1), and more are rejected at once with
    RESOURCE_EXHAUSTED. With max_workers of 2 or more, idle streams can never take the last thread,
    and health checks and other unary calls still run. gRPC's maximum_concurrent_rpcs cannot do this
    because it counts health checks too; it only rejects calls beyond max_workers * 4 in all.
    When metrics is given, every RPC but health checks is counted and timed in it.
    """
    # The log and metrics interceptors come first, so that they wrap and record the RPCs that the
    # token check rejects.
    interceptors = [RpcLogInterceptor()] + ([metrics.interceptor()] if metrics else [])
    interceptors += [BearerTokenInterceptor(auth_token)] if auth_token else []
    interceptors.append(StreamLimitInterceptor(max(1, max_workers - 1)))
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        interceptors=interceptors,
        options=message_size_options(max_message_bytes) + [("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=max_workers * 4,
    )


def bind_port(
    server: grpc.Server, listen: str, credentials: grpc.ServerCredentials | None, authenticated: bool
) -> int:
    """Bind server to listen, with TLS when credentials are given, and return the bound port.

    Logs a warning when listen is not a loopback address and TLS, or authentication of callers (a
    bearer token or client certificates), is off. Raises RuntimeError when listen cannot be bound.
    """
    if credentials is None:
        port = server.add_insecure_port(listen)
    else:
        port = server.add_secure_port(listen, credentials)
    warn_if_exposed(listen, tls=credentials is not None, authenticated=authenticated)
    return port


def add_health_and_reflection(server: grpc.Server, service_names: Iterable[str]) -> health.HealthServicer:
    """Register the standard health and reflection services; every name starts NOT_SERVING."""
    names = list(service_names)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in names + [OVERALL]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(names + [reflection.SERVICE_NAME, health.SERVICE_NAME], server)
    return health_servicer


def set_serving(health_servicer: health.HealthServicer, service_names: Iterable[str], serving: bool) -> None:
    """Set every named service and the overall status to SERVING or NOT_SERVING."""
    status = (
        health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in list(service_names) + [OVERALL]:
        health_servicer.set(name, status)


def remaining_seconds(context: grpc.ServicerContext, cap: float) -> float:
    """Return the caller's remaining time, at most cap seconds, for an outbound call's deadline."""
    remaining = context.time_remaining()
    if remaining is None:
        return cap
    return max(0.0, min(cap, remaining))


def serve_until_signalled(
    server: grpc.Server,
    health_servicer: health.HealthServicer,
    service_names: Iterable[str],
    grace_seconds: float,
    on_stop: Callable[[], None] = lambda: None,
) -> None:
    """Block until SIGTERM or SIGINT, then stop gracefully: NOT_SERVING, drain, on_stop().

    The server must already be started and its health set to SERVING by the caller.
    """
    stop_requested = threading.Event()
    names = list(service_names)

    def _request_stop(signum, _frame):
        log.info("shutdown_requested", signal=signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    # Python runs signal handlers in the main thread only, and a signal that the kernel delivers to
    # another thread (a gRPC or faiss one) does not wake a main thread blocked in wait() without a
    # timeout, so the wait polls.
    while not stop_requested.wait(timeout=_SIGNAL_POLL_S):
        pass

    set_serving(health_servicer, names, serving=False)
    # From here on the servicer ignores set() calls, so a health watcher that probes a backend while
    # RPCs drain cannot turn the server SERVING again.
    health_servicer.enter_graceful_shutdown()
    server.stop(grace_seconds).wait()
    on_stop()
    log.info("server_stopped")
