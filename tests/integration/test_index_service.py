"""The index service over gRPC on 127.0.0.1, with a fake embed service, also over gRPC."""

import dataclasses
import math
import queue
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imgsearch.common.v1 import common_pb2
from imgsearch.index.v1 import index_service_pb2
from imgsearch_common import errors
from index_service import server as index_server
from index_service.config import IndexConfig
from index_service.embed_client import EmbedClient
from tests.fakes.images import solid_png
from tests.unit.index_service.index_fakes import fingerprint_of, make_png, thumbnail_vector
from tests.unit.index_service.index_servers import FakeEmbedService, serve_fake_embed, start_index_service

pytestmark = pytest.mark.integration

_DIM = 16
_MODEL_ID = "fake-clip"
_MAX_MESSAGE_BYTES = 1024 * 1024
_MAX_IMAGE_BYTES = 60_000
_TIMEOUT_S = 20.0

ADDED = index_service_pb2.INGEST_STATUS_ADDED
ALREADY_PRESENT = index_service_pb2.INGEST_STATUS_ALREADY_PRESENT
FAILED = index_service_pb2.INGEST_STATUS_FAILED


@pytest.fixture
def embed_service():
    handle = serve_fake_embed(FakeEmbedService(dim=_DIM, model_id=_MODEL_ID), _MAX_MESSAGE_BYTES)
    yield handle
    handle.stop()


@pytest.fixture
def start_index(tmp_path, embed_service):
    """Return a function that starts an index service on 127.0.0.1:0; every one is stopped after the test."""
    handles = []

    def start(**overrides):
        config = IndexConfig(
            listen="127.0.0.1:0",
            embed_addr=embed_service.address,
            data_dir=tmp_path / "index",
            embed_timeout_s=5.0,
            default_k=5,
            max_k=50,
            ingest_batch_size=4,
            max_message_bytes=_MAX_MESSAGE_BYTES,
            max_image_bytes=_MAX_IMAGE_BYTES,
            max_image_pixels=200_000,
            max_workers=4,
            device="cpu",
            grace_s=0.0,
        )
        handle = start_index_service(dataclasses.replace(config, **overrides))
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop()


@pytest.fixture
def index(start_index):
    return start_index()


def _request(image, **fields):
    return index_service_pb2.IngestImagesRequest(image=image, **fields)


def _statuses(responses):
    return [response.status for response in responses]


def _code_names(responses):
    return [response.error.code_name for response in responses]


def _assert_rpc_fails(call, code, message_part):
    with pytest.raises(grpc.RpcError) as raised:
        call()
    assert raised.value.code() is code
    assert message_part in raised.value.details()


# Health and stats


def test_health_is_serving(index):
    stub = health_pb2_grpc.HealthStub(index.channel)

    for service in (index_server.SERVICE_NAME, ""):
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=_TIMEOUT_S)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_stats_of_empty_collection(index):
    stats = index.stats()

    assert stats.item_count == 0
    assert stats.dim == 0
    assert stats.model_id == ""
    assert stats.index_type == "IDMap,Flat"
    assert stats.index_device == "cpu"


# IngestImages


def test_ingest_adds_images_in_order(index):
    requests = [_request(make_png(n), uri=f"/photos/{n}.png", metadata={"n": str(n)}) for n in range(6)]

    responses = index.ingest(requests)

    assert _statuses(responses) == [ADDED] * 6
    assert [r.uri for r in responses] == [f"/photos/{n}.png" for n in range(6)]
    assert all(r.item_id.startswith("img_") for r in responses)
    assert len({r.item_id for r in responses}) == 6
    assert not any(r.HasField("error") for r in responses)
    stats = index.stats()
    assert (stats.item_count, stats.dim, stats.model_id) == (6, _DIM, _MODEL_ID)


def test_ingest_same_images_twice_adds_nothing(index):
    requests = [_request(make_png(n), uri=f"/photos/{n}.png") for n in range(5)]
    first = index.ingest(requests)

    second = index.ingest(requests)

    assert _statuses(second) == [ALREADY_PRESENT] * 5
    assert [r.item_id for r in second] == [r.item_id for r in first]
    assert index.stats().item_count == 5


def test_ingest_bad_items_mid_stream(index, embed_service):
    truncated = make_png(50)[:200]
    requests = [
        _request(make_png(1), uri="good-1", item_id="cat"),
        _request(b"not an image at all", uri="garbage"),
        _request(make_png(2), uri="good-2"),
        _request(truncated, uri="truncated"),
        _request(make_png(3, width=160, height=160), uri="too-large"),
        _request(make_png(4), uri="item-id-taken", item_id="cat"),
        _request(make_png(5), uri="bad-item-id", item_id=" cat"),
        _request(make_png(6), uri="good-3"),
    ]

    responses = index.ingest(requests)

    assert [r.uri for r in responses] == [r.uri for r in requests]
    assert _statuses(responses) == [ADDED, FAILED, ADDED, FAILED, FAILED, FAILED, FAILED, ADDED]
    assert _code_names(responses) == [
        "", "INVALID_ARGUMENT", "", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "ALREADY_EXISTS",
        "INVALID_ARGUMENT", "",
    ]
    assert responses[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "embed service" in responses[3].error.message
    assert f"limit of {_MAX_IMAGE_BYTES} bytes" in responses[4].error.message
    assert all(r.item_id == "" for r in responses if r.status == FAILED)
    assert index.stats().item_count == 3


def test_ingest_one_at_a_time(index):
    pending = queue.Queue()

    def requests():
        while (request := pending.get(timeout=_TIMEOUT_S)) is not None:
            yield request

    responses = index.stub.IngestImages(requests(), timeout=_TIMEOUT_S)
    statuses = []
    for n in range(3):
        pending.put(_request(make_png(n), uri=f"/photos/{n}.png"))
        statuses.append(next(responses).status)
    pending.put(None)

    assert statuses == [ADDED] * 3
    assert list(responses) == []


def test_ingest_cancelled_by_client(index):
    pending = queue.Queue()

    def requests():
        while (request := pending.get(timeout=_TIMEOUT_S)) is not None:
            yield request

    responses = index.stub.IngestImages(requests(), timeout=_TIMEOUT_S)
    pending.put(_request(make_png(1)))
    first = next(responses)
    responses.cancel()
    pending.put(None)

    assert first.status == ADDED
    deadline = time.monotonic() + 5
    while _reader_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _reader_threads() == []
    assert index.stats().item_count == 1


def _reader_threads():
    return [thread for thread in threading.enumerate() if thread.name == "ingest-reader"]


def test_ingest_of_empty_stream(index):
    assert index.ingest([]) == []


def test_concurrent_streams_store_each_image_once(index):
    requests = [_request(make_png(n)) for n in range(8)]
    outcomes = []

    def ingest():
        outcomes.append(index.ingest(requests))

    threads = [threading.Thread(target=ingest) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert index.stats().item_count == 8
    assert sum(_statuses(responses).count(ADDED) for responses in outcomes) == 8
    assert all(FAILED not in _statuses(responses) for responses in outcomes)
    for position in range(8):
        assert len({responses[position].item_id for responses in outcomes}) == 1


def test_ingest_with_embed_service_down(index, embed_service):
    [stored] = index.ingest([_request(make_png(1))])
    embed_service.stop()

    responses = index.ingest([_request(make_png(2)), _request(make_png(1)), _request(make_png(3), uri="last")])

    assert _statuses(responses) == [FAILED, ALREADY_PRESENT, FAILED]
    assert _code_names(responses) == ["UNAVAILABLE", "", "UNAVAILABLE"]
    assert responses[1].item_id == stored.item_id
    assert responses[2].uri == "last"
    assert index.stats().item_count == 1


def test_ingest_of_other_model(index, embed_service):
    index.ingest([_request(make_png(1))])
    embed_service.servicer.model_id = "other-clip"

    [response] = index.ingest([_request(make_png(2))])

    assert response.status == FAILED
    assert response.error.code_name == "FAILED_PRECONDITION"
    assert "'other-clip'" in response.error.message
    assert f"'{_MODEL_ID}'" in response.error.message


def test_ingest_when_embed_call_times_out(start_index, embed_service):
    index = start_index(embed_timeout_s=0.3)
    embed_service.servicer.delay_s = 1.0

    [response] = index.ingest([_request(make_png(1))])

    assert response.status == FAILED
    assert response.error.code_name == "DEADLINE_EXCEEDED"


def test_ingest_image_above_message_limit(index):
    with pytest.raises(grpc.RpcError) as raised:
        index.ingest([_request(b"\x00" * (_MAX_MESSAGE_BYTES + 1))])

    assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


# Search


def test_search_by_image(index):
    index.ingest(
        [_request(make_png(n), uri=f"/photos/{n}.png", metadata={"n": str(n)}, item_id=f"item-{n}") for n in range(8)]
    )

    response = index.search(image=make_png(4), k=3)

    assert response.model_id == _MODEL_ID
    assert len(response.neighbours) == 3
    best = response.neighbours[0]
    assert best.item_id == "item-4"
    assert best.score == pytest.approx(1.0, abs=1e-5)
    assert best.uri == "/photos/4.png"
    assert dict(best.metadata) == {"n": "4"}
    assert (best.width, best.height) == (32, 24)
    assert len(best.sha256) == 64
    scores = [n.score for n in response.neighbours]
    assert scores == sorted(scores, reverse=True)


def test_search_by_embedding_and_item_id(index):
    index.ingest([_request(make_png(n), item_id=f"item-{n}") for n in range(6)])
    embedding = common_pb2.Embedding(values=(thumbnail_vector(make_png(2), _DIM) * 3).tolist())

    by_embedding = index.search(embedding=embedding, k=2)
    by_item_id = index.search(item_id="item-2", k=2)

    assert by_embedding.neighbours[0].item_id == "item-2"
    assert [n.item_id for n in by_item_id.neighbours] == [n.item_id for n in by_embedding.neighbours]


def test_search_default_k_and_min_score(index):
    index.ingest([_request(make_png(n)) for n in range(10)])

    default_k = index.search(image=make_png(1))
    above_zero = index.search(image=make_png(1), k=10, min_score=0.0)

    assert len(default_k.neighbours) == 5
    assert all(n.score >= 0.0 for n in above_zero.neighbours)
    assert len(above_zero.neighbours) < 10


def test_search_of_empty_collection(index):
    assert list(index.search(image=make_png(1)).neighbours) == []


@pytest.mark.parametrize(
    ("fields", "message_part"),
    [
        ({}, "query is not set"),
        ({"item_id": "item-0", "k": 51}, "limit of 50"),
        ({"embedding": common_pb2.Embedding(values=[0.5] * (_DIM + 1))}, f"the collection contains dim {_DIM}"),
        ({"embedding": common_pb2.Embedding(values=[math.nan] * _DIM)}, "NaN"),
        ({"embedding": common_pb2.Embedding(values=[0.0] * _DIM)}, "all zeros"),
        ({"embedding": common_pb2.Embedding(values=[0.5] * _DIM, model_id="other-clip")}, "'other-clip'"),
        ({"image": b"not an image"}, "not recognised"),
        ({"item_id": "item-0", "min_score": math.nan}, "min_score"),
        ({"item_id": ""}, "item_id is empty"),
    ],
    ids=["no-query", "k-above-limit", "wrong-dim", "nan", "zero", "other-model", "bad-image", "nan-min-score",
         "empty-item-id"],
)
def test_search_invalid_argument(index, fields, message_part):
    index.ingest([_request(make_png(0), item_id="item-0")])

    _assert_rpc_fails(lambda: index.search(**fields), grpc.StatusCode.INVALID_ARGUMENT, message_part)


def test_search_unknown_item_id(index):
    _assert_rpc_fails(lambda: index.search(item_id="nope"), grpc.StatusCode.NOT_FOUND, "'nope' not found")


def test_search_image_too_large(index):
    index.ingest([_request(make_png(0))])
    too_many_pixels = solid_png(500, 500, (1, 2, 3))

    _assert_rpc_fails(
        lambda: index.search(image=make_png(1, width=160, height=160)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"limit of {_MAX_IMAGE_BYTES} bytes",
    )
    _assert_rpc_fails(lambda: index.search(image=too_many_pixels), grpc.StatusCode.RESOURCE_EXHAUSTED, "pixels")


def test_search_by_image_of_other_model(index, embed_service):
    index.ingest([_request(make_png(0))])
    embed_service.servicer.model_id = "other-clip"

    _assert_rpc_fails(
        lambda: index.search(image=make_png(0)), grpc.StatusCode.FAILED_PRECONDITION, "'other-clip'"
    )


def test_search_with_embed_service_down(index, embed_service):
    index.ingest([_request(make_png(0), item_id="item-0")])
    embed_service.stop()

    _assert_rpc_fails(lambda: index.search(image=make_png(0)), grpc.StatusCode.UNAVAILABLE, "embed service")
    assert index.search(item_id="item-0").neighbours[0].item_id == "item-0"


def test_search_when_embed_call_times_out(start_index, embed_service):
    index = start_index(embed_timeout_s=0.3)
    index.ingest([_request(make_png(0))])
    embed_service.servicer.delay_s = 1.0

    _assert_rpc_fails(
        lambda: index.search(image=make_png(0), timeout=10.0), grpc.StatusCode.DEADLINE_EXCEEDED, "deadline"
    )


def test_embed_deadline_within_caller_deadline(index, embed_service):
    index.ingest([_request(make_png(0))])
    embed_service.servicer.time_remaining.clear()

    index.search(image=make_png(0), timeout=1.0)
    index.search(image=make_png(0), timeout=60.0)

    # gRPC rounds a deadline up when it encodes it on the wire, hence the 5% tolerance.
    short_call, long_call = embed_service.servicer.time_remaining
    assert 0 < short_call <= 1.0 * 1.05
    assert 3.0 < long_call <= index.config.embed_timeout_s * 1.05


# Restart


def test_restart_keeps_every_item(start_index):
    first = start_index()
    requests = [
        _request(make_png(n), uri=f"/photos/{n}.png", metadata={"n": str(n), "kind": "noise"}) for n in range(7)
    ]
    added = first.ingest(requests)
    first.stop()

    second = start_index()

    stats = second.stats()
    assert (stats.item_count, stats.dim, stats.model_id) == (7, _DIM, _MODEL_ID)
    for n, response in enumerate(added):
        [neighbour] = second.search(item_id=response.item_id, k=1).neighbours
        assert neighbour.item_id == response.item_id
        assert neighbour.uri == f"/photos/{n}.png"
        assert dict(neighbour.metadata) == {"n": str(n), "kind": "noise"}
    assert second.search(image=make_png(3), k=1).neighbours[0].item_id == added[3].item_id
    assert _statuses(second.ingest(requests)) == [ALREADY_PRESENT] * 7


# EmbedClient


def test_embed_client_results_in_order(embed_service):
    client = EmbedClient(embed_service.address, _MAX_MESSAGE_BYTES)
    try:
        outputs = client.embed_images([make_png(1), make_png(2)[:200], make_png(3)], timeout_s=_TIMEOUT_S)
        info = client.model_info(timeout_s=_TIMEOUT_S)
    finally:
        client.close()

    assert outputs[0].model_id == _MODEL_ID
    assert outputs[0].vector.tolist() == pytest.approx(thumbnail_vector(make_png(1), _DIM).tolist())
    assert outputs[0].fingerprint == fingerprint_of(make_png(1))
    assert isinstance(outputs[1], errors.InvalidInputError)
    assert outputs[2].vector.tolist() == pytest.approx(thumbnail_vector(make_png(3), _DIM).tolist())
    assert outputs[2].fingerprint == fingerprint_of(make_png(3))
    assert (info.model_id, info.dim, info.backend) == (_MODEL_ID, _DIM, "fake")


def test_embed_client_without_fingerprints(embed_service):
    embed_service.servicer.with_fingerprints = False
    client = EmbedClient(embed_service.address, _MAX_MESSAGE_BYTES)
    try:
        [output] = client.embed_images([make_png(1)], timeout_s=_TIMEOUT_S)
    finally:
        client.close()

    assert output.vector.tolist() == pytest.approx(thumbnail_vector(make_png(1), _DIM).tolist())
    assert output.fingerprint is None


def test_embed_client_ignores_unknown_fingerprint_version(embed_service):
    embed_service.servicer.fingerprint_version = 99
    client = EmbedClient(embed_service.address, _MAX_MESSAGE_BYTES)
    try:
        outputs = client.embed_images([make_png(1), make_png(2)], timeout_s=_TIMEOUT_S)
    finally:
        client.close()

    assert [output.model_id for output in outputs] == [_MODEL_ID, _MODEL_ID]
    assert [output.fingerprint for output in outputs] == [None, None]


def test_embed_client_with_service_down(embed_service):
    embed_service.stop()
    client = EmbedClient(embed_service.address, _MAX_MESSAGE_BYTES)
    try:
        outputs = client.embed_images([make_png(1), make_png(2)], timeout_s=_TIMEOUT_S)
        with pytest.raises(errors.UnavailableError):
            client.model_info(timeout_s=_TIMEOUT_S)
    finally:
        client.close()

    assert len(outputs) == 2
    assert all(isinstance(output, errors.UnavailableError) for output in outputs)
