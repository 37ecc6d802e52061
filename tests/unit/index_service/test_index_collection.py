"""Tests of index_service.collection with a real store and index and a fake embedder."""

import io
import re
import threading

import numpy as np
import pytest
from PIL import Image

from imgsearch_common.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidInputError,
    NotFoundError,
    TooLargeError,
    UnavailableError,
)
from index_service.collection import (
    Collection,
    CollectionLimits,
    ImageQuery,
    IngestItem,
    IngestStatus,
    ItemQuery,
    VectorQuery,
)
from index_service.store import Store
from index_service.vector_index import VectorIndex
from tests.fakes.images import solid_png
from tests.unit.index_service.index_fakes import FakeEmbedder, make_png, thumbnail_vector

_DIM = 16
_TIMEOUT_S = 10.0
_LIMITS = CollectionLimits(default_k=3, max_k=20, max_image_bytes=20_000, max_image_pixels=100_000)


def _open_collection(data_dir, embedder, limits=_LIMITS) -> Collection:
    collection = Collection(Store(data_dir), VectorIndex(device="cpu"), embedder, limits)
    collection.load()
    return collection


@pytest.fixture
def embedder():
    return FakeEmbedder(dim=_DIM)


@pytest.fixture
def collection(tmp_path, embedder):
    opened = _open_collection(tmp_path, embedder)
    yield opened
    opened.close()


def _ingest_images(collection, images, **fields):
    return collection.ingest([IngestItem(image=image, **fields) for image in images], _TIMEOUT_S)


def _statuses(results):
    return [result.status for result in results]


# Ingest


def test_ingest_adds_items_with_assigned_ids(collection, embedder):
    results = _ingest_images(collection, [make_png(1), make_png(2)])

    assert _statuses(results) == [IngestStatus.ADDED, IngestStatus.ADDED]
    assert all(re.fullmatch(r"img_[0-9a-f]{20}", result.item_id) for result in results)
    assert results[0].item_id != results[1].item_id
    assert all(result.error is None for result in results)
    assert embedder.calls == [2]
    stats = collection.stats()
    assert (stats.item_count, stats.dim, stats.model_id) == (2, _DIM, "fake-clip")
    assert (stats.index_type, stats.index_device) == ("IDMap,Flat", "cpu")


def test_ingest_keeps_caller_item_id(collection):
    [result] = collection.ingest([IngestItem(image=make_png(1), item_id="cat 1.jpg")], _TIMEOUT_S)

    assert result.status is IngestStatus.ADDED
    assert result.item_id == "cat 1.jpg"


def test_ingest_of_stored_bytes_is_already_present(collection, embedder):
    [first] = _ingest_images(collection, [make_png(1)])
    embedder.calls.clear()

    [again] = collection.ingest([IngestItem(image=make_png(1), item_id="another-name")], _TIMEOUT_S)

    assert again.status is IngestStatus.ALREADY_PRESENT
    assert again.item_id == first.item_id
    assert embedder.calls == []
    assert collection.stats().item_count == 1


def test_ingest_of_same_bytes_twice_in_one_batch(collection, embedder):
    results = _ingest_images(collection, [make_png(1), make_png(2), make_png(1)])

    assert _statuses(results) == [IngestStatus.ADDED, IngestStatus.ADDED, IngestStatus.ALREADY_PRESENT]
    assert results[2].item_id == results[0].item_id
    assert embedder.calls == [2]
    assert collection.stats().item_count == 2


def test_duplicate_in_batch_follows_failed_first(collection, embedder):
    embedder.errors_by_image[make_png(1)] = InvalidInputError("image could not be decoded")

    results = _ingest_images(collection, [make_png(1), make_png(1)])

    assert _statuses(results) == [IngestStatus.FAILED, IngestStatus.FAILED]
    assert isinstance(results[1].error, InvalidInputError)
    assert collection.stats().item_count == 0


def test_ingest_item_id_taken_by_other_bytes(collection):
    collection.ingest([IngestItem(image=make_png(1), item_id="cat")], _TIMEOUT_S)

    [result] = collection.ingest([IngestItem(image=make_png(2), item_id="cat")], _TIMEOUT_S)

    assert result.status is IngestStatus.FAILED
    assert isinstance(result.error, AlreadyExistsError)
    assert "'cat'" in str(result.error)
    assert collection.stats().item_count == 1


def test_ingest_item_id_taken_within_batch(collection):
    items = [IngestItem(image=make_png(1), item_id="cat"), IngestItem(image=make_png(2), item_id="cat")]

    results = collection.ingest(items, _TIMEOUT_S)

    assert _statuses(results) == [IngestStatus.ADDED, IngestStatus.FAILED]
    assert isinstance(results[1].error, AlreadyExistsError)


def test_ingest_repeated_item_id_and_bytes(collection):
    collection.ingest([IngestItem(image=make_png(1), item_id="cat")], _TIMEOUT_S)

    [result] = collection.ingest([IngestItem(image=make_png(1), item_id="cat")], _TIMEOUT_S)

    assert result.status is IngestStatus.ALREADY_PRESENT
    assert result.item_id == "cat"


@pytest.mark.parametrize(
    ("image", "error_type", "message"),
    [
        (b"", InvalidInputError, "empty"),
        (b"\x00" * 20_001, TooLargeError, "limit of 20000 bytes"),
        (b"this is not an image", InvalidInputError, "not recognised"),
        (solid_png(400, 300, (10, 20, 30)), TooLargeError, "limit of 100000"),
    ],
    ids=["empty", "too-many-bytes", "not-an-image", "too-many-pixels"],
)
def test_ingest_rejects_bad_image(collection, embedder, image, error_type, message):
    results = _ingest_images(collection, [image, make_png(2)])

    assert _statuses(results) == [IngestStatus.FAILED, IngestStatus.ADDED]
    assert isinstance(results[0].error, error_type)
    assert message in str(results[0].error)
    assert results[0].item_id == ""
    assert embedder.calls == [1]


@pytest.mark.parametrize(
    ("item_id", "message"),
    [
        ("x" * 257, "limit of 256"),
        ("line\nbreak", "non-printable"),
        ("tab\there", "non-printable"),
        (" padded", "whitespace"),
        ("padded ", "whitespace"),
    ],
)
def test_ingest_rejects_bad_item_id(collection, item_id, message):
    [result] = collection.ingest([IngestItem(image=make_png(1), item_id=item_id)], _TIMEOUT_S)

    assert result.status is IngestStatus.FAILED
    assert isinstance(result.error, InvalidInputError)
    assert message in str(result.error)


def test_ingest_accepts_longest_item_id(collection):
    [result] = collection.ingest([IngestItem(image=make_png(1), item_id="x" * 256)], _TIMEOUT_S)

    assert result.status is IngestStatus.ADDED


def test_ingest_stores_size_after_exif_orientation(collection):
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees, so width and height swap on display
    Image.new("RGB", (40, 10), (200, 10, 10)).save(buffer, format="JPEG", exif=exif)
    [result] = _ingest_images(collection, [buffer.getvalue()])

    [neighbour] = collection.search(ItemQuery(result.item_id), k=1, min_score=None, timeout_s=_TIMEOUT_S)

    assert (neighbour.width, neighbour.height) == (10, 40)


def test_ingest_embed_error_fails_only_that_item(collection, embedder):
    embedder.errors_by_image[make_png(2)] = InvalidInputError("image could not be decoded")

    results = _ingest_images(collection, [make_png(1), make_png(2), make_png(3)])

    assert _statuses(results) == [IngestStatus.ADDED, IngestStatus.FAILED, IngestStatus.ADDED]
    assert isinstance(results[1].error, InvalidInputError)
    assert collection.stats().item_count == 2


def test_ingest_with_embedder_down(collection, embedder):
    embedder.down = True

    results = _ingest_images(collection, [make_png(1), make_png(2)])

    assert _statuses(results) == [IngestStatus.FAILED, IngestStatus.FAILED]
    assert all(isinstance(result.error, UnavailableError) for result in results)
    assert collection.stats().item_count == 0


def test_ingest_without_time_left(collection, embedder):
    results = collection.ingest([IngestItem(image=make_png(1))], timeout_s=0.0)

    assert isinstance(results[0].error, DeadlineExceededError)
    assert embedder.calls == []


def test_ingest_passes_timeout_to_embedder(collection, embedder):
    collection.ingest([IngestItem(image=make_png(1))], timeout_s=1.5)

    assert embedder.timeouts == [1.5]


def test_ingest_rejects_other_model(collection, embedder):
    _ingest_images(collection, [make_png(1)])
    embedder.model_id = "other-clip"

    [result] = _ingest_images(collection, [make_png(2)])

    assert result.status is IngestStatus.FAILED
    assert isinstance(result.error, FailedPreconditionError)
    assert "'fake-clip' (dim 16)" in str(result.error)
    assert "'other-clip' (dim 16)" in str(result.error)
    assert collection.stats().item_count == 1


def test_ingest_rejects_other_dim(collection, embedder):
    _ingest_images(collection, [make_png(1)])
    embedder.dim = 8

    [result] = _ingest_images(collection, [make_png(2)])

    assert isinstance(result.error, FailedPreconditionError)
    assert "(dim 8)" in str(result.error)


def test_concurrent_ingests_store_bytes_once(collection, embedder):
    # Both batches pass the duplicate check before either is stored.
    embedder.barrier = threading.Barrier(2)
    images = [make_png(1), make_png(2)]
    results = []

    def ingest(item_id_prefix):
        items = [IngestItem(image=image, item_id=f"{item_id_prefix}-{n}") for n, image in enumerate(images)]
        results.append(collection.ingest(items, _TIMEOUT_S))

    threads = [threading.Thread(target=ingest, args=(prefix,)) for prefix in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert collection.stats().item_count == 2
    statuses = sorted(status.value for batch in results for status in _statuses(batch))
    assert statuses == ["added", "added", "already_present", "already_present"]
    added_ids = {r.item_id for batch in results for r in batch if r.status is IngestStatus.ADDED}
    present_ids = {r.item_id for batch in results for r in batch if r.status is IngestStatus.ALREADY_PRESENT}
    assert added_ids == present_ids


# Search


def test_search_by_image_finds_it_first(collection):
    items = [
        IngestItem(image=make_png(n), item_id=f"item-{n}", uri=f"/images/{n}.png", metadata={"n": str(n)})
        for n in range(8)
    ]
    collection.ingest(items, _TIMEOUT_S)

    neighbours = collection.search(ImageQuery(make_png(5)), k=3, min_score=None, timeout_s=_TIMEOUT_S)

    assert len(neighbours) == 3
    best = neighbours[0]
    assert best.item_id == "item-5"
    assert best.score == pytest.approx(1.0, abs=1e-5)
    assert best.uri == "/images/5.png"
    assert best.metadata == {"n": "5"}
    assert (best.width, best.height) == (32, 24)
    assert len(best.sha256) == 64
    assert [n.score for n in neighbours] == sorted((n.score for n in neighbours), reverse=True)


def test_search_matches_brute_force_over_stored_vectors(collection):
    images = [make_png(n) for n in range(30)]
    results = _ingest_images(collection, images)
    vectors = np.stack([thumbnail_vector(image, _DIM) for image in images])
    query = thumbnail_vector(make_png(100), _DIM)

    neighbours = collection.search(VectorQuery(query.tolist()), k=10, min_score=None, timeout_s=_TIMEOUT_S)

    order = np.argsort(-(vectors @ query), kind="stable")[:10]
    assert [n.item_id for n in neighbours] == [results[i].item_id for i in order]


def test_search_by_item_id(collection):
    collection.ingest([IngestItem(image=make_png(n), item_id=f"item-{n}") for n in range(4)], _TIMEOUT_S)

    neighbours = collection.search(ItemQuery("item-2"), k=2, min_score=None, timeout_s=_TIMEOUT_S)

    assert neighbours[0].item_id == "item-2"
    assert neighbours[0].score == pytest.approx(1.0, abs=1e-5)


def test_search_unknown_item_id(collection):
    _ingest_images(collection, [make_png(1)])

    with pytest.raises(NotFoundError, match="'nope'"):
        collection.search(ItemQuery("nope"), k=1, min_score=None, timeout_s=_TIMEOUT_S)


def test_search_empty_item_id(collection):
    with pytest.raises(InvalidInputError, match="item_id is empty"):
        collection.search(ItemQuery(""), k=1, min_score=None, timeout_s=_TIMEOUT_S)


def test_search_by_vector_normalises_it(collection):
    [result] = _ingest_images(collection, [make_png(1)])
    query = thumbnail_vector(make_png(1), _DIM) * 7.0

    [neighbour] = collection.search(VectorQuery(query.tolist()), k=1, min_score=None, timeout_s=_TIMEOUT_S)

    assert neighbour.item_id == result.item_id
    assert neighbour.score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([], "no values"),
        ([float("nan")] + [0.1] * (_DIM - 1), "NaN or infinite"),
        ([float("inf")] + [0.1] * (_DIM - 1), "NaN or infinite"),
        ([0.0] * _DIM, "all zeros"),
        ([0.1] * (_DIM + 1), f"dim {_DIM + 1}, but the collection contains dim {_DIM}"),
    ],
    ids=["empty", "nan", "inf", "zero", "wrong-dim"],
)
def test_search_rejects_bad_vector(collection, values, message):
    _ingest_images(collection, [make_png(1)])

    with pytest.raises(InvalidInputError, match=re.escape(message)):
        collection.search(VectorQuery(values), k=1, min_score=None, timeout_s=_TIMEOUT_S)


def test_search_rejects_vector_of_other_model(collection):
    _ingest_images(collection, [make_png(1)])

    with pytest.raises(InvalidInputError, match="'other-clip'.*'fake-clip'"):
        collection.search(VectorQuery([0.1] * _DIM, model_id="other-clip"), k=1, min_score=None, timeout_s=1)


def test_search_k_zero_means_default(collection):
    _ingest_images(collection, [make_png(n) for n in range(10)])

    neighbours = collection.search(ImageQuery(make_png(1)), k=0, min_score=None, timeout_s=_TIMEOUT_S)

    assert len(neighbours) == _LIMITS.default_k


def test_search_k_at_limit(collection):
    _ingest_images(collection, [make_png(n) for n in range(5)])

    neighbours = collection.search(ImageQuery(make_png(1)), k=_LIMITS.max_k, min_score=None, timeout_s=1)

    assert len(neighbours) == 5


@pytest.mark.parametrize(("k", "message"), [(21, "limit of 20"), (-1, "negative")])
def test_search_rejects_bad_k(collection, k, message):
    _ingest_images(collection, [make_png(1)])

    with pytest.raises(InvalidInputError, match=message):
        collection.search(ItemQuery("x"), k=k, min_score=None, timeout_s=_TIMEOUT_S)


def test_search_min_score_leaves_out_lower_scores(collection):
    _ingest_images(collection, [make_png(n) for n in range(10)])
    all_neighbours = collection.search(ImageQuery(make_png(3)), k=10, min_score=None, timeout_s=_TIMEOUT_S)
    threshold = all_neighbours[4].score

    neighbours = collection.search(ImageQuery(make_png(3)), k=10, min_score=threshold, timeout_s=_TIMEOUT_S)

    assert [n.item_id for n in neighbours] == [n.item_id for n in all_neighbours[:5]]
    assert all(n.score >= threshold for n in neighbours)


def test_search_rejects_nan_min_score(collection):
    with pytest.raises(InvalidInputError, match="min_score"):
        collection.search(ImageQuery(make_png(1)), k=1, min_score=float("nan"), timeout_s=_TIMEOUT_S)


def test_search_of_empty_collection(collection, embedder):
    assert collection.search(ImageQuery(make_png(1)), k=5, min_score=None, timeout_s=_TIMEOUT_S) == []
    assert collection.search(VectorQuery([0.5] * 4), k=5, min_score=None, timeout_s=_TIMEOUT_S) == []
    assert embedder.calls == []


def test_search_rejects_bad_query_image(collection):
    _ingest_images(collection, [make_png(1)])

    with pytest.raises(InvalidInputError):
        collection.search(ImageQuery(b"not an image"), k=1, min_score=None, timeout_s=_TIMEOUT_S)
    with pytest.raises(TooLargeError, match="limit of 20000 bytes"):
        collection.search(ImageQuery(b"\x00" * 20_001), k=1, min_score=None, timeout_s=_TIMEOUT_S)


def test_search_by_image_with_embedder_down(collection, embedder):
    _ingest_images(collection, [make_png(1)])
    embedder.down = True

    with pytest.raises(UnavailableError):
        collection.search(ImageQuery(make_png(1)), k=1, min_score=None, timeout_s=_TIMEOUT_S)


def test_search_by_image_of_other_model(collection, embedder):
    _ingest_images(collection, [make_png(1)])
    embedder.model_id = "other-clip"

    with pytest.raises(FailedPreconditionError, match="'other-clip'"):
        collection.search(ImageQuery(make_png(1)), k=1, min_score=None, timeout_s=_TIMEOUT_S)


def test_search_by_image_without_time_left(collection, embedder):
    _ingest_images(collection, [make_png(1)])
    embedder.calls.clear()

    with pytest.raises(DeadlineExceededError):
        collection.search(ImageQuery(make_png(1)), k=1, min_score=None, timeout_s=0.0)
    assert embedder.calls == []


# Load and lifecycle


def test_load_rebuilds_index_from_store(tmp_path, embedder):
    first = _open_collection(tmp_path, embedder)
    items = [IngestItem(image=make_png(n), item_id=f"item-{n}", uri=f"/images/{n}.png") for n in range(6)]
    first.ingest(items, _TIMEOUT_S)
    first.close()

    reopened = _open_collection(tmp_path, FakeEmbedder(dim=_DIM))
    try:
        stats = reopened.stats()
        neighbours = reopened.search(ItemQuery("item-4"), k=1, min_score=None, timeout_s=_TIMEOUT_S)
    finally:
        reopened.close()

    assert (stats.item_count, stats.dim, stats.model_id) == (6, _DIM, "fake-clip")
    assert neighbours[0].item_id == "item-4"
    assert neighbours[0].uri == "/images/4.png"


def test_close_closes_embedder(tmp_path, embedder):
    _open_collection(tmp_path, embedder).close()

    assert embedder.closed


def test_check_embedder_never_raises(collection, embedder):
    embedder.down = True

    collection.check_embedder(timeout_s=1.0)
