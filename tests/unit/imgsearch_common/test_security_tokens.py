"""The bearer-token check of create_server and the token that open_channel sends, over real gRPC on 127.0.0.1."""

import json
import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from imgsearch_common.security import open_channel
from imgsearch_common.serving import add_health_and_reflection, bind_port, create_server, set_serving

TOKEN = "s3cret-token-4f1c"
SERVICE = "test.Echo"
CALL_TIMEOUT_S = 5.0
_KINDS = ("Unary", "UnaryStream", "StreamUnary", "StreamStream")


def _echo_handlers() -> grpc.GenericRpcHandler:
    """Handlers of all four RPC kinds that send back the request bytes, untouched."""
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(lambda request, _context: request),
            "UnaryStream": grpc.unary_stream_rpc_method_handler(lambda request, _context: iter([request, request])),
            "StreamUnary": grpc.stream_unary_rpc_method_handler(lambda requests, _context: b"".join(requests)),
            "StreamStream": grpc.stream_stream_rpc_method_handler(lambda requests, _context: iter(list(requests))),
        },
    )


def _serve(auth_token: str):
    server = create_server(max_workers=2, max_message_bytes=1024 * 1024, auth_token=auth_token)
    server.add_generic_rpc_handlers((_echo_handlers(),))
    health_servicer = add_health_and_reflection(server, [SERVICE])
    port = bind_port(server, "127.0.0.1:0", None, authenticated=bool(auth_token))
    server.start()
    set_serving(health_servicer, [SERVICE], serving=True)
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def address():
    server, address = _serve(TOKEN)
    yield address
    server.stop(None).wait()


def _call(channel: grpc.Channel, kind: str, metadata=()) -> list[bytes]:
    """Call the echo method of kind with the request b"ping" and return every response."""
    method = f"/{SERVICE}/{kind}"
    if kind == "Unary":
        return [channel.unary_unary(method)(b"ping", metadata=metadata, timeout=CALL_TIMEOUT_S)]
    if kind == "UnaryStream":
        return list(channel.unary_stream(method)(b"ping", metadata=metadata, timeout=CALL_TIMEOUT_S))
    if kind == "StreamUnary":
        return [channel.stream_unary(method)(iter([b"pi", b"ng"]), metadata=metadata, timeout=CALL_TIMEOUT_S)]
    return list(channel.stream_stream(method)(iter([b"ping"]), metadata=metadata, timeout=CALL_TIMEOUT_S))


def _rejection(channel: grpc.Channel, kind: str, metadata=()) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        _call(channel, kind, metadata)
    return raised.value


@pytest.mark.parametrize("kind", _KINDS)
def test_call_with_token_succeeds(address, kind):
    with open_channel(address, [], token=TOKEN) as channel:
        responses = _call(channel, kind)

    assert responses and all(response == b"ping" for response in responses)


@pytest.mark.parametrize("kind", _KINDS)
def test_call_without_token_unauthenticated(address, kind):
    with open_channel(address, []) as channel:
        error = _rejection(channel, kind)

    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == "missing bearer token: send the metadata 'authorization: Bearer <token>'"


@pytest.mark.parametrize("kind", _KINDS)
def test_call_with_wrong_token_unauthenticated(address, kind):
    with open_channel(address, [], token=TOKEN + "x") as channel:
        error = _rejection(channel, kind)

    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == "invalid bearer token"


@pytest.mark.parametrize("value", [f"Basic {TOKEN}", TOKEN, "Bearer", "Bearer "])
def test_malformed_authorization_unauthenticated(address, value):
    with open_channel(address, []) as channel:
        error = _rejection(channel, "Unary", metadata=(("authorization", value),))

    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == "the authorization metadata must have the form 'Bearer <token>'"


def test_bearer_scheme_is_case_insensitive(address):
    with open_channel(address, []) as channel:
        responses = _call(channel, "Unary", metadata=(("authorization", f"bearer {TOKEN}"),))

    assert responses == [b"ping"]


def test_sender_replaces_callers_authorization(address):
    with open_channel(address, [], token=TOKEN) as channel:
        responses = _call(channel, "Unary", metadata=(("authorization", "Bearer stale"),))

    assert responses == [b"ping"]


def test_health_needs_no_token(address):
    with open_channel(address, []) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=CALL_TIMEOUT_S
        )

    assert response.status == health_pb2.HealthCheckResponse.SERVING


def _list_services(channel: grpc.Channel) -> list[str]:
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([request]), timeout=CALL_TIMEOUT_S
    )
    return [service.name for response in responses for service in response.list_services_response.service]


def test_reflection_needs_token(address):
    with open_channel(address, []) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            _list_services(channel)

    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_reflection_with_token_lists_services(address):
    with open_channel(address, [], token=TOKEN) as channel:
        services = _list_services(channel)

    assert SERVICE in services


def test_unknown_method_unimplemented(address):
    with open_channel(address, [], token=TOKEN) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            channel.unary_unary(f"/{SERVICE}/NoSuchMethod")(b"ping", timeout=CALL_TIMEOUT_S)

    assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_server_without_token_accepts_any_call():
    server, address = _serve("")
    try:
        with open_channel(address, []) as channel:
            responses = _call(channel, "Unary")
    finally:
        server.stop(None).wait()

    assert responses == [b"ping"]


def test_token_never_logged(address, capsys, caplog):
    # Another test may have raised the root level; the rejection's reason is logged at debug.
    caplog.set_level(logging.DEBUG)
    with open_channel(address, [], token=TOKEN) as channel:
        _call(channel, "StreamStream")
    with open_channel(address, [], token=TOKEN + "-wrong") as channel:
        _rejection(channel, "Unary")

    records = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    finished = [record for record in records if record["event"] == "rpc_finished"]
    assert [record["status"] for record in finished] == ["OK", "UNAUTHENTICATED"]
    rejected = [record for record in records if record["event"] == "rpc_rejected_unauthenticated"]
    assert [record["reason"] for record in rejected] == ["invalid bearer token"]
    assert all(TOKEN not in json.dumps(record) for record in records)
    assert TOKEN not in caplog.text
