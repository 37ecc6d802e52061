"""A server interceptor that bounds the streaming calls in progress, so that unary calls always get a thread."""

import threading

import grpc


class StreamLimitInterceptor(grpc.ServerInterceptor):
    """Reject a streaming call with RESOURCE_EXHAUSTED while max_streams streaming calls are in progress.

    A streaming call occupies a worker thread for as long as its client keeps the stream open,
    even while the client sends nothing. With max_streams below the size of the server's thread pool,
    idle streams can never take every thread, so health checks and other unary calls still run.
    """

    def __init__(self, max_streams: int):
        if max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, got {max_streams}")
        self._max_streams = max_streams
        self._slots = threading.BoundedSemaphore(max_streams)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.stream_stream:
            return handler._replace(stream_stream=self._limit_response_stream(handler.stream_stream))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._limit_response_stream(handler.unary_stream))
        if handler.stream_unary:
            return handler._replace(stream_unary=self._limit_unary_response(handler.stream_unary))
        return handler

    def _limit_response_stream(self, behaviour):
        def wrapper(request, context):
            self._take_slot(context)
            try:
                yield from behaviour(request, context)
            finally:
                # Runs when the stream ends, and when gRPC drops the generator of a cancelled call.
                self._slots.release()

        return wrapper

    def _limit_unary_response(self, behaviour):
        def wrapper(request_iterator, context):
            self._take_slot(context)
            try:
                return behaviour(request_iterator, context)
            finally:
                self._slots.release()

        return wrapper

    def _take_slot(self, context: grpc.ServicerContext) -> None:
        if not self._slots.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server is already serving {self._max_streams} streaming calls, its limit; retry later",
            )
