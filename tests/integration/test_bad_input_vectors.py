"""Unusual vectors, k values and item_ids through the real index service, with the hash embed backend."""

import math

import grpc
import numpy as np
import pytest

from imgsearch.common.v1 import common_pb2
from imgsearch.index.v1 import index_service_pb2
from tests.integration.bad_input_services import encode, scene_picture, start_embed, start_index

pytestmark = pytest.mark.integration

ADDED = index_service_pb2.INGEST_STATUS_ADDED
ALREADY_PRESENT = index_service_pb2.INGEST_STATUS_ALREADY_PRESENT
FAILED = index_service_pb2.INGEST_STATUS_FAILED
_DIM = 512
_MODEL_ID = "hash-test-v1"
_MAX_K = 40


@pytest.fixture(scope="module")
def embed():
    service = start_embed("hash")
    yield service
    service.stop()


@pytest.fixture
def start(embed, tmp_path):
    """Return a function that starts an index service with its own data folder; all are stopped after the test."""
    started = []

    def start_one(name: str = "index"):
        service = start_index(embed.address, tmp_path / name, max_k=_MAX_K, default_k=10)
        started.append(service)
        return service

    yield start_one
    for service in started:
        service.stop()


@pytest.fixture
def index(start):
    return start()


def _embedding(values) -> common_pb2.Embedding:
    return common_pb2.Embedding(values=[float(value) for value in values], model_id=_MODEL_ID)


def _vector_request(values, item_id: str = "") -> index_service_pb2.IngestImagesRequest:
    return index_service_pb2.IngestImagesRequest(embedding=_embedding(values), item_id=item_id)


def _image_request(image: bytes, item_id: str = "") -> index_service_pb2.IngestImagesRequest:
    return index_service_pb2.IngestImagesRequest(image=image, item_id=item_id)


def _directions(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, _DIM))


def _search_fails(index, code: grpc.StatusCode, **fields) -> str:
    with pytest.raises(grpc.RpcError) as raised:
        index.search(**fields)
    assert raised.value.code() is code
    return raised.value.details()


def _ranking(response) -> tuple[list[str], np.ndarray]:
    return [n.item_id for n in response.neighbours], np.array([n.score for n in response.neighbours])


# Scale


def test_scaled_query_same_ranking(index, embed):
    images = [encode(scene_picture(48, 40, seed=100 + number)) for number in range(6)]
    assert [r.status for r in index.ingest([_image_request(image) for image in images])] == [ADDED] * 6
    [query] = embed.embed([encode(scene_picture(48, 40, seed=120))])
    vector = np.array(query.embedding.values, dtype=np.float64)

    ids, scores = _ranking(index.search(embedding=_embedding(vector), k=6))

    assert len(ids) == 6
    for scale in (3.0, 0.2):
        scaled_ids, scaled_scores = _ranking(index.search(embedding=_embedding(scale * vector), k=6))
        assert scaled_ids == ids
        np.testing.assert_allclose(scaled_scores, scores, atol=1e-6)


def test_scaled_stored_vectors_same_ranking(start):
    directions = _directions(8, seed=101)
    query = _directions(1, seed=102)[0]
    results = {}
    for scale in (1.0, 3.0, 0.2):
        index = start(f"scale-{scale}")
        requests = [_vector_request(scale * direction, f"item-{n}") for n, direction in enumerate(directions)]
        assert [r.status for r in index.ingest(requests)] == [ADDED] * 8
        results[scale] = _ranking(index.search(embedding=_embedding(query), k=8))

    ids, scores = results[1.0]
    for scale in (3.0, 0.2):
        assert results[scale][0] == ids
        np.testing.assert_allclose(results[scale][1], scores, atol=1e-6)


def test_identical_vector_score_clamped(index):
    direction = _directions(1, seed=103)[0]
    index.ingest([_vector_request(direction, "self")])

    [top] = index.search(embedding=_embedding(direction), k=1).neighbours

    assert top.item_id == "self"
    assert 0.9999 <= top.score <= 1.0


# Degenerate vectors and dims


_DEGENERATE = {
    "all zeros": (np.zeros(_DIM), "all zeros"),
    "NaN": (np.concatenate([[math.nan], np.ones(_DIM - 1)]), "NaN or infinite"),
    "infinite": (np.concatenate([[math.inf], np.ones(_DIM - 1)]), "NaN or infinite"),
    "negative infinite": (np.concatenate([[-math.inf], np.ones(_DIM - 1)]), "NaN or infinite"),
}


@pytest.mark.parametrize("case", list(_DEGENERATE))
def test_degenerate_search_vector_invalid(case, index):
    values, message_part = _DEGENERATE[case]

    empty_details = _search_fails(index, grpc.StatusCode.INVALID_ARGUMENT, embedding=_embedding(values))
    index.ingest([_vector_request(_directions(1, seed=104)[0], "stored")])
    details = _search_fails(index, grpc.StatusCode.INVALID_ARGUMENT, embedding=_embedding(values))

    assert message_part in empty_details
    assert message_part in details


@pytest.mark.parametrize("case", list(_DEGENERATE))
def test_degenerate_stored_vector_fails_alone(case, index):
    values, message_part = _DEGENERATE[case]
    good = _directions(2, seed=105)

    responses = index.ingest(
        [_vector_request(good[0], "before"), _vector_request(values, "bad"), _vector_request(good[1], "after")]
    )

    assert [r.status for r in responses] == [ADDED, FAILED, ADDED]
    assert responses[1].error.code_name == "INVALID_ARGUMENT"
    assert message_part in responses[1].error.message
    assert index.item_count() == 2


def test_wrong_dim_names_both_dims(index):
    index.ingest([_vector_request(_directions(1, seed=106)[0], "stored")])

    details = _search_fails(index, grpc.StatusCode.INVALID_ARGUMENT, embedding=_embedding(np.ones(10)))
    [response] = index.ingest([_vector_request(np.ones(10), "short")])

    assert "10" in details
    assert str(_DIM) in details
    assert response.status == FAILED
    assert response.error.code_name == "INVALID_ARGUMENT"
    assert "10" in response.error.message
    assert str(_DIM) in response.error.message
    assert index.item_count() == 1


# item_id reuse


def test_same_item_id_same_bytes_idempotent(index):
    image = encode(scene_picture(40, 40, seed=107))

    first = index.ingest([_image_request(image, "photo-1")])
    again = index.ingest([_image_request(image, "photo-1")])
    same_batch = index.ingest([_image_request(image, "photo-1"), _image_request(image, "photo-1")])

    assert [r.status for r in first] == [ADDED]
    assert [r.status for r in again + same_batch] == [ALREADY_PRESENT] * 3
    assert {r.item_id for r in again + same_batch} == {"photo-1"}
    assert index.item_count() == 1


def test_same_item_id_other_bytes_already_exists(index):
    first = index.ingest([_image_request(encode(scene_picture(40, 40, seed=108)), "photo-2")])

    [other] = index.ingest([_image_request(encode(scene_picture(40, 40, seed=109)), "photo-2")])

    assert first[0].status == ADDED
    assert other.status == FAILED
    assert other.error.code_name == "ALREADY_EXISTS"
    assert "photo-2" in other.error.message
    assert index.item_count() == 1


def test_same_item_id_vectors(index):
    direction, other = _directions(2, seed=110)

    responses = index.ingest([_vector_request(direction, "vector-1")])
    responses += index.ingest([_vector_request(direction, "vector-1"), _vector_request(other, "vector-1")])

    assert [r.status for r in responses] == [ADDED, ALREADY_PRESENT, FAILED]
    assert responses[2].error.code_name == "ALREADY_EXISTS"
    assert index.item_count() == 1


# k


def _assert_real_hits(neighbours) -> None:
    for neighbour in neighbours:
        assert neighbour.item_id
        assert math.isfinite(neighbour.score)
        assert -1.0 <= neighbour.score <= 1.0


def test_empty_collection_returns_nothing(index):
    image = encode(scene_picture(40, 40, seed=111))

    for k in (0, 1, 10, _MAX_K):
        assert list(index.search(embedding=_embedding(np.ones(_DIM)), k=k).neighbours) == []
        assert list(index.search(image=image, k=k).neighbours) == []


def test_fewer_items_than_k(index):
    index.ingest([_vector_request(direction, f"item-{n}") for n, direction in enumerate(_directions(3, seed=112))])
    query = _embedding(np.ones(_DIM))

    for k in (0, 3, 10, _MAX_K):
        neighbours = index.search(embedding=query, k=k).neighbours
        assert len(neighbours) == 3
        assert {n.item_id for n in neighbours} == {"item-0", "item-1", "item-2"}
        _assert_real_hits(neighbours)
    assert len(index.search(embedding=query, k=2).neighbours) == 2


def test_k_above_limit_names_it(index):
    index.ingest([_vector_request(_directions(1, seed=113)[0], "stored")])

    details = _search_fails(index, grpc.StatusCode.INVALID_ARGUMENT, embedding=_embedding(np.ones(_DIM)), k=_MAX_K + 1)

    assert f"limit of {_MAX_K}" in details
    assert str(_MAX_K + 1) in details
