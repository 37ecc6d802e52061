"""Tests of StreamLimitInterceptor on a small generic gRPC server on 127.0.0.1, for every kind of method."""

import threading
from concurrent import futures

import grpc
import pytest

from imgsearch_common.stream_limit import StreamLimitInterceptor

_SERVICE = "test.Limited"
_TIMEOUT_S = 10.0


class _Handlers:
    """Echo methods of each kind; the streaming ones block while `hold` is clear."""

    def __init__(self):
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Semaphore(0)

    def unary(self, request, context):
        return request

    def client_stream(self, request_iterator, context):
        self._wait()
        return b"".join(request_iterator)

    def server_stream(self, request, context):
        self._wait()
        yield request

    def both_streams(self, request_iterator, context):
        self._wait()
        yield from request_iterator

    def _wait(self):
        self.entered.release()
        self.hold.wait(timeout=_TIMEOUT_S)


@pytest.fixture
def served():
    handlers = _Handlers()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), interceptors=[StreamLimitInterceptor(max_streams=1)]
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                _SERVICE,
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(handlers.unary),
                    "ClientStream": grpc.stream_unary_rpc_method_handler(handlers.client_stream),
                    "ServerStream": grpc.unary_stream_rpc_method_handler(handlers.server_stream),
                    "BothStreams": grpc.stream_stream_rpc_method_handler(handlers.both_streams),
                },
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield handlers, channel
    handlers.hold.set()
    channel.close()
    server.stop(None).wait()


def _calls(channel: grpc.Channel) -> dict:
    return {
        "ClientStream": lambda: channel.stream_unary(f"/{_SERVICE}/ClientStream")(iter([b"a", b"b"]), timeout=_TIMEOUT_S),
        "ServerStream": lambda: list(channel.unary_stream(f"/{_SERVICE}/ServerStream")(b"a", timeout=_TIMEOUT_S)),
        "BothStreams": lambda: list(channel.stream_stream(f"/{_SERVICE}/BothStreams")(iter([b"a"]), timeout=_TIMEOUT_S)),
    }


@pytest.mark.parametrize("holder", ["ClientStream", "ServerStream", "BothStreams"])
def test_streams_over_limit_rejected(holder, served):
    handlers, channel = served
    calls = _calls(channel)
    handlers.hold.clear()
    with futures.ThreadPoolExecutor(max_workers=1) as pool:
        held = pool.submit(calls[holder])
        assert handlers.entered.acquire(timeout=_TIMEOUT_S)

        rejected = {}
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as raised:
                call()
            rejected[name] = raised.value
        unary = channel.unary_unary(f"/{_SERVICE}/Unary")(b"ping", timeout=_TIMEOUT_S)
        handlers.hold.set()
        held.result(timeout=_TIMEOUT_S)

    assert {error.code() for error in rejected.values()} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert "already serving 1 streaming calls" in rejected["ClientStream"].details()
    assert unary == b"ping"
    assert calls["ClientStream"]() == b"ab"  # the slot is free again


def test_max_streams_must_be_positive():
    with pytest.raises(ValueError, match="at least 1, got 0"):
        StreamLimitInterceptor(max_streams=0)
