"""A server interceptor that writes one canonical log line per RPC, streams included."""

import time
import uuid

import grpc
import structlog

log = structlog.get_logger(__name__)

REQUEST_ID_KEY = "x-request-id"

# Health probes and reflection come every few seconds from orchestrators; their lines are debug.
_HEALTH_PREFIX = "/grpc.health."
_QUIET_PREFIXES = ("/grpc.reflection.",)
# Statuses that describe the caller's request rather than a failure of the service.
_EXPECTED_STATUSES = {"OK", "CANCELLED", "NOT_FOUND", "INVALID_ARGUMENT", "ALREADY_EXISTS", "UNAUTHENTICATED"}


class RpcLogInterceptor(grpc.ServerInterceptor):
    """Log method, request id, status, duration and message counts when each RPC ends."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        # Health handlers are left unwrapped: its Watch is non-blocking, and a wrapper would make it
        # hold a worker thread for as long as the watch lasts.
        if handler is None or method.startswith(_HEALTH_PREFIX):
            return handler
        if handler.unary_unary:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary, method))
        if handler.stream_stream:
            return handler._replace(stream_stream=_wrap_streaming(handler.stream_stream, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=_wrap_streaming(handler.unary_stream, method))
        return handler._replace(stream_unary=_wrap_unary(handler.stream_unary, method))


def request_id_of(context: grpc.ServicerContext) -> str:
    """Return the caller's x-request-id metadata value, or a new id when there is none."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and value:
            return value
    return uuid.uuid4().hex


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """Return metadata that passes the current RPC's request id on to a call this server makes.

    The id is the one RpcLogInterceptor bound in structlog's contextvars, so the call must be made
    on the handler's thread. Outside an RPC, as in a start-up check, there is no id and the tuple is empty.
    """
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    if not request_id:
        return ()
    return ((REQUEST_ID_KEY, request_id),)


class _Counter:
    def __init__(self, iterator):
        self._iterator = iterator
        self.count = 0

    def __iter__(self):
        for item in self._iterator:
            self.count += 1
            yield item


def _wrap_unary(behaviour, method):
    def wrapper(request, context):
        started = time.perf_counter()
        request_id = request_id_of(context)
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                response = behaviour(request, context)
            except BaseException:
                _log_finished(method, request_id, context, started, failed=True)
                raise
            _log_finished(method, request_id, context, started)
            return response

    return wrapper


def _wrap_streaming(behaviour, method):
    def wrapper(request, context):
        started = time.perf_counter()
        request_id = request_id_of(context)
        requests = _Counter(request) if hasattr(request, "__next__") else request
        sent = 0
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                for response in behaviour(requests, context):
                    sent += 1
                    yield response
            except BaseException:
                _log_finished(method, request_id, context, started, sent, requests, failed=True)
                raise
            _log_finished(method, request_id, context, started, sent, requests)

    return wrapper


def _log_finished(method, request_id, context, started, sent=None, requests=None, failed=False):
    status = _status_of(context, failed)
    fields = {
        "method": method,
        "request_id": request_id,
        "status": status,
        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
    }
    if sent is not None:
        fields["responses"] = sent
    if isinstance(requests, _Counter):
        fields["requests"] = requests.count
    if method.startswith(_QUIET_PREFIXES):
        log.debug("rpc_finished", **fields)
    elif status in _EXPECTED_STATUSES:
        log.info("rpc_finished", **fields)
    else:
        log.error("rpc_finished", **fields)


def _status_of(context, failed: bool) -> str:
    """Return the name of the status that the call ends with, as far as the server can tell."""
    code = context.code()
    if code is not None:
        return code.name
    if not context.is_active():
        # The call ended before the handler set a status: the client cancelled it, or its deadline passed.
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    # gRPC sends UNKNOWN for an exception that escapes a handler without a status.
    return "UNKNOWN" if failed else "OK"
