"""Request ids across services: the index service passes its x-request-id on to the embed service."""

import dataclasses
import pathlib
import time

import grpc
import pytest
import structlog
from structlog.testing import capture_logs

from embed_service import config as embed_config
from embed_service import server as embed_server
from imgsearch.index.v1 import index_service_pb2, index_service_pb2_grpc
from imgsearch_common.rpc_log import REQUEST_ID_KEY
from index_service import config as index_config
from index_service.embed_client import EmbedClient
from index_service import server as index_server
from tests.fakes.images import noise_images

pytestmark = pytest.mark.integration

_MODEL_DIR = pathlib.Path(__file__).resolve().parents[2] / "models" / "tiny-clip-random"
_TIMEOUT_S = 20.0


@pytest.fixture
def index_stub(tmp_path):
    """Start the embed service (hash backend) and an index service that uses it, and yield an index stub."""
    embed = dataclasses.replace(
        embed_config.from_env({}), listen="127.0.0.1:0", backend="hash", model_dir=_MODEL_DIR
    )
    embed_grpc, _, embed_port = embed_server.build_server(embed)
    index = dataclasses.replace(
        index_config.from_env({}), listen="127.0.0.1:0", embed_addr=f"127.0.0.1:{embed_port}",
        data_dir=tmp_path / "index",
    )
    index_grpc, _, index_port, collection = index_server.start(index)
    channel = grpc.insecure_channel(f"127.0.0.1:{index_port}")
    yield index_service_pb2_grpc.IndexServiceStub(channel)
    channel.close()
    index_grpc.stop(None).wait()
    collection.close()
    embed_grpc.stop(None).wait()


def _rpc_lines(logs: list[dict], method_suffix: str) -> list[dict]:
    return [entry for entry in logs if entry["event"] == "rpc_finished" and entry["method"].endswith(method_suffix)]


def _wait_for_line(logs: list[dict], method_suffix: str, count: int = 1, timeout_s: float = 10.0) -> list[dict]:
    """Return the rpc_finished lines of a method once there are count, because a server logs just after the call ends."""
    deadline = time.monotonic() + timeout_s
    while len(_rpc_lines(logs, method_suffix)) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return _rpc_lines(logs, method_suffix)


def _ingest(stub, images: list[bytes], metadata=()) -> list:
    requests = [index_service_pb2.IngestImagesRequest(image=image) for image in images]
    return list(stub.IngestImages(iter(requests), timeout=_TIMEOUT_S, metadata=metadata))


def test_ingest_passes_caller_request_id_on(index_stub):
    with capture_logs() as logs:
        responses = _ingest(index_stub, noise_images(3, seed=11), metadata=((REQUEST_ID_KEY, "ingest-7f3a"),))
        embed_lines = _wait_for_line(logs, "/EmbedImages")
        [index_line] = _wait_for_line(logs, "/IngestImages")

    assert [response.status for response in responses] == [index_service_pb2.INGEST_STATUS_ADDED] * 3
    assert index_line["request_id"] == "ingest-7f3a"
    assert embed_lines
    assert {line["request_id"] for line in embed_lines} == {"ingest-7f3a"}


def test_ingest_passes_generated_request_id_on(index_stub):
    with capture_logs() as logs:
        _ingest(index_stub, noise_images(2, seed=12))
        embed_lines = _wait_for_line(logs, "/EmbedImages")
        [index_line] = _wait_for_line(logs, "/IngestImages")

    assert len(index_line["request_id"]) == 32
    assert embed_lines
    assert {line["request_id"] for line in embed_lines} == {index_line["request_id"]}


def test_search_by_image_passes_request_id_on(index_stub):
    [image] = noise_images(1, seed=13)
    _ingest(index_stub, [image])
    request = index_service_pb2.SearchRequest(image=image, k=1)

    with capture_logs() as logs:
        index_stub.Search(request, timeout=_TIMEOUT_S, metadata=((REQUEST_ID_KEY, "search-01"),))
        [embed_line] = _wait_for_line(logs, "/EmbedImages")
        [index_line] = _wait_for_line(logs, "/Search")

    assert index_line["request_id"] == "search-01"
    assert embed_line["request_id"] == "search-01"


def test_failed_search_keeps_request_id(index_stub):
    request = index_service_pb2.SearchRequest(item_id="no-such-item", k=1)

    with capture_logs() as logs, pytest.raises(grpc.RpcError) as raised:
        index_stub.Search(request, timeout=_TIMEOUT_S, metadata=((REQUEST_ID_KEY, "search-02"),))
    [index_line] = _wait_for_line(logs, "/Search")

    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    assert index_line["request_id"] == "search-02"
    assert index_line["status"] == "NOT_FOUND"
    assert not _rpc_lines(logs, "/EmbedImages")


@pytest.fixture
def embed_client():
    """Start the embed service (hash backend) and yield an EmbedClient connected to it."""
    config = dataclasses.replace(
        embed_config.from_env({}), listen="127.0.0.1:0", backend="hash", model_dir=_MODEL_DIR
    )
    server, _, port = embed_server.build_server(config)
    client = EmbedClient(f"127.0.0.1:{port}", config.max_message_bytes)
    yield client
    client.close()
    server.stop(None).wait()


def test_model_info_sends_bound_request_id(embed_client):
    with capture_logs() as logs:
        with structlog.contextvars.bound_contextvars(request_id="stats-5"):
            embed_client.model_info(_TIMEOUT_S)
        [line] = _wait_for_line(logs, "/GetModelInfo")

    assert line["request_id"] == "stats-5"


def test_model_info_outside_rpc_sends_no_request_id(embed_client):
    with capture_logs() as logs:
        embed_client.model_info(_TIMEOUT_S)
        embed_client.model_info(_TIMEOUT_S)
        lines = _wait_for_line(logs, "/GetModelInfo", count=2)

    # Without an id to pass on, the embed service makes a new one for each call.
    assert len(lines) == 2
    assert len({line["request_id"] for line in lines}) == 2
