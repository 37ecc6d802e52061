"""Tests of ingesting precomputed embeddings into index_service.collection."""

import re

import numpy as np
import pytest

from imgsearch_common.errors import AlreadyExistsError, FailedPreconditionError, InvalidInputError
from index_service.collection import Collection, CollectionLimits, ImageQuery, IngestItem, IngestStatus, VectorQuery
from index_service.duplicates import MatchKind, OnDuplicate
from index_service.store import Store
from index_service.vector_index import VectorIndex
from tests.unit.index_service.index_fakes import FakeEmbedder, make_png, thumbnail_vector

_DIM = 16
_MODEL_ID = "fake-clip"
_TIMEOUT_S = 10.0
_LIMITS = CollectionLimits(default_k=5, max_k=50, max_image_bytes=200_000, max_image_pixels=1_000_000)


def _open(tmp_path, embedder) -> Collection:
    collection = Collection(Store(tmp_path), VectorIndex(device="cpu"), embedder, _LIMITS)
    collection.load()
    return collection


@pytest.fixture
def embedder():
    return FakeEmbedder(dim=_DIM, model_id=_MODEL_ID)


@pytest.fixture
def collection(tmp_path, embedder):
    opened = _open(tmp_path, embedder)
    yield opened
    opened.close()


def _vector(seed: int, dim: int = _DIM) -> list[float]:
    return np.random.default_rng(seed).standard_normal(dim).tolist()


def _given(seed: int, item_id: str = "", dim: int = _DIM, model_id: str = _MODEL_ID, **fields) -> IngestItem:
    return IngestItem(embedding=_vector(seed, dim), model_id=model_id, item_id=item_id, **fields)


def _search(collection, values, k=5):
    return collection.search(VectorQuery(values), k=k, min_score=None, timeout_s=_TIMEOUT_S)


def test_first_embedding_sets_model_and_dim(collection, embedder):
    [result] = collection.ingest([_given(1, "vec-1", uri="s3://bucket/1", metadata={"a": "1"})], _TIMEOUT_S)

    assert (result.status, result.item_id) == (IngestStatus.ADDED, "vec-1")
    stats = collection.stats()
    assert (stats.item_count, stats.dim, stats.model_id) == (1, _DIM, _MODEL_ID)
    assert embedder.calls == []
    [neighbour] = _search(collection, _vector(1))
    assert neighbour.item_id == "vec-1"
    assert neighbour.score == pytest.approx(1.0, abs=1e-6)
    assert (neighbour.uri, neighbour.metadata) == ("s3://bucket/1", {"a": "1"})
    assert (neighbour.sha256, neighbour.width, neighbour.height) == ("", 0, 0)
    assert neighbour.match is MatchKind.UNSPECIFIED


@pytest.fixture
def other_collection(tmp_path):
    opened = _open(tmp_path / "other", FakeEmbedder(dim=_DIM))
    yield opened
    opened.close()


@pytest.mark.parametrize("scale", [3.0, 0.2])
def test_scaled_embedding_ranks_and_scores_as_unit_vector(collection, other_collection, scale):
    vectors = [np.array(_vector(seed)) for seed in range(10)]
    query = np.array(_vector(100))
    collection.ingest([IngestItem(embedding=v.tolist(), model_id=_MODEL_ID, item_id=f"v{n}") for n, v in enumerate(vectors)],
                      _TIMEOUT_S)
    other_collection.ingest(
        [IngestItem(embedding=(v * scale).tolist(), model_id=_MODEL_ID, item_id=f"v{n}") for n, v in enumerate(vectors)],
        _TIMEOUT_S,
    )

    expected = _search(collection, query.tolist())
    got = _search(other_collection, (query * scale).tolist())

    assert [n.item_id for n in got] == [n.item_id for n in expected]
    np.testing.assert_allclose([n.score for n in got], [n.score for n in expected], atol=1e-6)
    assert all(-1.0 <= n.score <= 1.0 for n in got)


def test_same_item_id_and_vector_already_present(collection):
    collection.ingest([_given(1, "vec-1")], _TIMEOUT_S)

    [again] = collection.ingest([_given(1, "vec-1")], _TIMEOUT_S)
    [scaled] = collection.ingest([IngestItem(embedding=(np.array(_vector(1)) * 2).tolist(), model_id=_MODEL_ID,
                                             item_id="vec-1")], _TIMEOUT_S)

    assert (again.status, again.item_id) == (IngestStatus.ALREADY_PRESENT, "vec-1")
    assert scaled.status is IngestStatus.ALREADY_PRESENT
    assert collection.stats().item_count == 1


def test_same_item_id_other_vector_already_exists(collection):
    collection.ingest([_given(1, "vec-1")], _TIMEOUT_S)

    [result] = collection.ingest([_given(2, "vec-1")], _TIMEOUT_S)

    assert result.status is IngestStatus.FAILED
    assert isinstance(result.error, AlreadyExistsError)
    assert "'vec-1'" in str(result.error)
    assert collection.stats().item_count == 1


def test_same_item_id_within_batch(collection):
    results = collection.ingest([_given(1, "vec-1"), _given(1, "vec-1"), _given(2, "vec-1")], _TIMEOUT_S)

    assert [r.status for r in results] == [IngestStatus.ADDED, IngestStatus.ALREADY_PRESENT, IngestStatus.FAILED]
    assert [r.item_id for r in results[:2]] == ["vec-1", "vec-1"]
    assert isinstance(results[2].error, AlreadyExistsError)
    assert collection.stats().item_count == 1


def test_item_id_of_image_item_with_embedding(collection):
    collection.ingest([IngestItem(image=make_png(1), item_id="photo")], _TIMEOUT_S)

    [other] = collection.ingest([_given(1, "photo")], _TIMEOUT_S)
    [same] = collection.ingest([IngestItem(embedding=thumbnail_vector(make_png(1), _DIM).tolist(), model_id=_MODEL_ID,
                                           item_id="photo")], _TIMEOUT_S)

    assert isinstance(other.error, AlreadyExistsError)
    assert same.status is IngestStatus.ALREADY_PRESENT


def test_embedding_without_item_id_always_added(collection):
    results = collection.ingest([_given(1), _given(1)], _TIMEOUT_S)

    assert [r.status for r in results] == [IngestStatus.ADDED, IngestStatus.ADDED]
    assert results[0].item_id != results[1].item_id
    assert all(re.fullmatch(r"img_[0-9a-f]{20}", r.item_id) for r in results)


def test_embedding_never_duplicate(collection):
    collection.ingest([_given(1, "first")], _TIMEOUT_S)

    [result] = collection.ingest(
        [_given(1, "second", on_duplicate=OnDuplicate.REJECT, duplicate_match=MatchKind.NEAR)], _TIMEOUT_S
    )

    assert result.status is IngestStatus.ADDED
    assert result.duplicate_of_item_id == ""


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (IngestItem(embedding=[], model_id=_MODEL_ID), "no values"),
        (IngestItem(embedding=[float("nan")] + [0.1] * (_DIM - 1), model_id=_MODEL_ID), "NaN or infinite"),
        (IngestItem(embedding=[float("inf")] + [0.1] * (_DIM - 1), model_id=_MODEL_ID), "NaN or infinite"),
        (IngestItem(embedding=[0.0] * _DIM, model_id=_MODEL_ID), "all zeros"),
        (IngestItem(embedding=[0.1] * _DIM), "model_id is empty"),
        (IngestItem(embedding=[0.1] * (_DIM + 2), model_id=_MODEL_ID), f"dim {_DIM + 2}, but the collection contains dim {_DIM}"),
        (IngestItem(embedding=[0.1] * _DIM, model_id="other-clip"), "'other-clip', but the collection contains model 'fake-clip'"),
        (IngestItem(image=make_png(9), embedding=[0.1] * _DIM, model_id=_MODEL_ID), "both image bytes and an embedding"),
    ],
    ids=["empty", "nan", "inf", "zero", "no-model-id", "wrong-dim", "other-model", "image-and-embedding"],
)
def test_bad_embedding_rejected(collection, item, message):
    collection.ingest([_given(1, "seed")], _TIMEOUT_S)

    results = collection.ingest([item, _given(2)], _TIMEOUT_S)

    assert [r.status for r in results] == [IngestStatus.FAILED, IngestStatus.ADDED]
    assert isinstance(results[0].error, InvalidInputError)
    assert message in str(results[0].error)
    assert results[0].item_id == ""
    assert collection.stats().item_count == 2


def test_embedding_of_other_dim_in_first_batch(collection):
    results = collection.ingest([_given(1, "a"), _given(2, "b", dim=_DIM + 1)], _TIMEOUT_S)

    assert [r.status for r in results] == [IngestStatus.ADDED, IngestStatus.FAILED]
    assert isinstance(results[1].error, InvalidInputError)
    assert f"dim {_DIM + 1}" in str(results[1].error)
    assert f"dim {_DIM}" in str(results[1].error)


def test_image_of_other_model_after_embeddings_set_it(tmp_path):
    collection = _open(tmp_path, FakeEmbedder(dim=_DIM, model_id="image-model"))
    try:
        results = collection.ingest([_given(1, "a"), IngestItem(image=make_png(1))], _TIMEOUT_S)
    finally:
        collection.close()

    assert [r.status for r in results] == [IngestStatus.ADDED, IngestStatus.FAILED]
    assert isinstance(results[1].error, FailedPreconditionError)


def test_mixed_batch_keeps_order(collection, embedder):
    items = [IngestItem(image=make_png(1), item_id="img-1"), _given(1, "vec-1"), IngestItem(image=make_png(2)),
             _given(2, "vec-2")]

    results = collection.ingest(items, _TIMEOUT_S)

    assert [r.status for r in results] == [IngestStatus.ADDED] * 4
    assert embedder.calls == [2]
    row_ids = {item.item_id: item.row_id for item in collection._store.items_by_item_id(["img-1", "vec-1", "vec-2"]).values()}
    assert row_ids["img-1"] < row_ids["vec-1"] < row_ids["vec-2"]
    assert _search(collection, _vector(2), k=1)[0].item_id == "vec-2"
    assert collection.search(ImageQuery(make_png(1)), k=1, min_score=None, timeout_s=_TIMEOUT_S)[0].item_id == "img-1"


def test_removed_item_id_of_embedding_not_reused(collection):
    collection.ingest([_given(1, "vec-1")], _TIMEOUT_S)
    collection.remove_items(["vec-1"])

    [result] = collection.ingest([_given(1, "vec-1")], _TIMEOUT_S)

    assert isinstance(result.error, FailedPreconditionError)


def test_embeddings_survive_restart(tmp_path):
    first = _open(tmp_path, FakeEmbedder(dim=_DIM))
    first.ingest([_given(n, f"vec-{n}") for n in range(5)], _TIMEOUT_S)
    first.close()

    second = _open(tmp_path, FakeEmbedder(dim=_DIM))
    try:
        [neighbour] = _search(second, _vector(3), k=1)
        [again] = second.ingest([_given(3, "vec-3")], _TIMEOUT_S)
    finally:
        second.close()

    assert (neighbour.item_id, neighbour.sha256) == ("vec-3", "")
    assert again.status is IngestStatus.ALREADY_PRESENT
