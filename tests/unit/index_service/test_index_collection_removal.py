"""Tests of removal, metadata updates, snapshots and the start-up model check of index_service.collection.

Removal runs in both modes of the vector index: remove_ids, and the mask that a GPU index uses.
"""

import math
import time

import numpy as np
import pytest
from structlog.testing import capture_logs

from imgsearch_common.errors import FailedPreconditionError, InvalidInputError, NotFoundError, TooLargeError
from index_service.audit import AuditSummary, DuplicateGroup, _LocalDifferences
from index_service.collection import (
    Collection,
    CollectionLimits,
    EmbedModelMismatchError,
    ImageQuery,
    IngestItem,
    IngestStatus,
    ItemQuery,
    VectorQuery,
)
from index_service.duplicates import MatchKind, OnDuplicate, PolicyOverrides
from index_service.metadata import MetadataLimits, MetadataUpdate
from index_service.snapshot import FILE_NAME
from index_service.store import Store
from index_service.vector_index import VectorIndex
from tests.unit.index_service.index_fakes import (
    FakeEmbedder,
    lossless_copy,
    make_png,
    near_copy,
    scene_jpeg,
    thumbnail_vector,
)

_DIM = 16
_TIMEOUT_S = 10.0
_MAX_MASKED = 3
_LIMITS = CollectionLimits(
    default_k=5, max_k=50, max_image_bytes=200_000, max_image_pixels=1_000_000,
    metadata=MetadataLimits(max_keys=4, max_key_bytes=16, max_value_bytes=32),
)


@pytest.fixture(params=["remove_ids", "mask"])
def removal(request):
    return request.param


@pytest.fixture
def open_collection(tmp_path, removal):
    """Return a function that opens a collection on tmp_path; each one is closed again after the test, which is harmless."""
    opened = []

    def open_one(embedder=None, snapshots=True) -> Collection:
        collection = Collection(
            Store(tmp_path),
            VectorIndex(device="cpu", removal=removal, max_masked=_MAX_MASKED),
            embedder or FakeEmbedder(dim=_DIM),
            _LIMITS,
            snapshot_path=tmp_path / FILE_NAME if snapshots else None,
        )
        collection.load()
        opened.append(collection)
        return collection

    yield open_one
    for collection in opened:
        collection.close()


@pytest.fixture
def collection(open_collection):
    return open_collection()


def _ingest(collection, count=6, **fields):
    items = [IngestItem(image=make_png(n), item_id=f"item-{n}", metadata={"n": str(n)}, **fields) for n in range(count)]
    return collection.ingest(items, _TIMEOUT_S)


def _search_ids(collection, query, k=50):
    return [n.item_id for n in collection.search(query, k=k, min_score=None, timeout_s=_TIMEOUT_S)]


def _close_without_snapshot(collection):
    """Close the collection as a crash would leave it: no snapshot written on the way out."""
    collection._snapshot_path = None
    collection.close()


# Removal


def test_removed_item_leaves_search_and_stats(collection):
    _ingest(collection)

    result = collection.remove_items(["item-2"])

    assert (result.removed_count, result.not_found_item_ids) == (1, [])
    assert "item-2" not in _search_ids(collection, ImageQuery(make_png(2)))
    assert "item-2" not in _search_ids(collection, VectorQuery(thumbnail_vector(make_png(2), _DIM).tolist()))
    assert len(_search_ids(collection, ItemQuery("item-3"))) == 5
    with pytest.raises(NotFoundError, match="'item-2'"):
        collection.search(ItemQuery("item-2"), k=1, min_score=None, timeout_s=_TIMEOUT_S)
    assert collection.stats().item_count == 5


def test_remove_reports_unknown_item_ids_once_in_order(collection):
    _ingest(collection, count=2)

    result = collection.remove_items(["x", "item-1", "y", "x", "item-1"])

    assert result.removed_count == 1
    assert result.not_found_item_ids == ["x", "y"]


def test_repeated_removal_is_harmless(collection):
    _ingest(collection, count=2)
    collection.remove_items(["item-1"])

    result = collection.remove_items(["item-1"])

    assert (result.removed_count, result.not_found_item_ids) == (0, ["item-1"])
    assert collection.stats().item_count == 1


@pytest.mark.parametrize(
    ("item_ids", "message"),
    [([], "item_ids is empty"), (["item-0", ""], r"item_ids\[1\] is empty")],
    ids=["no-item-ids", "empty-item-id"],
)
def test_remove_rejects_bad_request(collection, item_ids, message):
    _ingest(collection, count=1)

    with pytest.raises(InvalidInputError, match=message):
        collection.remove_items(item_ids)
    assert collection.stats().item_count == 1


def test_removed_item_id_never_reused(collection):
    _ingest(collection, count=2)
    collection.remove_items(["item-1"])

    [result] = collection.ingest([IngestItem(image=make_png(99), item_id="item-1")], _TIMEOUT_S)

    assert result.status is IngestStatus.FAILED
    assert isinstance(result.error, FailedPreconditionError)
    assert "'item-1' belonged to a removed item" in str(result.error)
    assert collection.stats().item_count == 1


def test_removed_bytes_can_be_added_again(collection):
    _ingest(collection, count=2)
    collection.remove_items(["item-1"])

    [result] = collection.ingest([IngestItem(image=make_png(1))], _TIMEOUT_S)

    assert result.status is IngestStatus.ADDED
    assert result.item_id not in ("item-1", "")
    assert _search_ids(collection, ImageQuery(make_png(1)), k=1) == [result.item_id]


def test_removed_item_is_no_duplicate(collection):
    original = scene_jpeg(1)
    collection.ingest([IngestItem(image=original, item_id="original")], _TIMEOUT_S)
    copy = IngestItem(image=lossless_copy(original), on_duplicate=OnDuplicate.REJECT, duplicate_match=MatchKind.NEAR)
    [rejected] = collection.ingest([copy], _TIMEOUT_S)

    collection.remove_items(["original"])
    [added] = collection.ingest([copy], _TIMEOUT_S)

    assert rejected.status is IngestStatus.FAILED
    assert rejected.duplicate_of_item_id == "original"
    assert added.status is IngestStatus.ADDED
    assert added.duplicate_of_item_id == ""
    neighbours = collection.search(ImageQuery(original), k=5, min_score=None, timeout_s=_TIMEOUT_S)
    assert [(n.item_id, n.match) for n in neighbours] == [(added.item_id, MatchKind.EXACT)]


def _audit(collection, kinds=(MatchKind.EXACT, MatchKind.NEAR, MatchKind.SIMILAR), check=lambda: None):
    return list(collection.find_duplicates(kinds, PolicyOverrides(), 0.0, 10, check))


def test_removed_items_leave_duplicate_audit(collection):
    original = scene_jpeg(2)
    collection.ingest(
        [IngestItem(image=original, item_id="a"), IngestItem(image=lossless_copy(original), item_id="b",
                                                             on_duplicate=OnDuplicate.ADD)],
        _TIMEOUT_S,
    )
    [before] = [event for event in _audit(collection) if isinstance(event, DuplicateGroup)]

    collection.remove_items(["b"])
    events = _audit(collection)

    assert [member.item_id for member in before.members] == ["a", "b"]
    assert [event for event in events if isinstance(event, DuplicateGroup)] == []
    assert events[-1] == AuditSummary(item_count=1, group_counts={k: 0 for k in MatchKind if k.value != "unspecified"},
                                      grouped_item_count=0)


def test_audit_survives_removal_while_it_runs(collection):
    images = [scene_jpeg(3), scene_jpeg(4)]
    items = [IngestItem(image=image, item_id=f"{name}-{n}", on_duplicate=OnDuplicate.ADD)
             for n, image in enumerate(images) for name, image in (("orig", image), ("copy", lossless_copy(image)))]
    collection.ingest(items, _TIMEOUT_S)
    removed = []

    def remove_once():
        if not removed:
            removed.append(collection.remove_items(["copy-0"]))

    events = _audit(collection, check=remove_once)

    groups = [[member.item_id for member in event.members] for event in events if isinstance(event, DuplicateGroup)]
    assert removed[0].removed_count == 1
    assert ["orig-1", "copy-1"] in groups
    assert not any("copy-0" in group for group in groups)
    # The exact group of orig-0 and copy-0 was found before the removal, and is not sent with one member.
    assert all(len(group) >= 2 for group in groups)
    assert events[-1].grouped_item_count == len({item_id for group in groups for item_id in group})


def test_audit_survives_removal_between_phash_lookup_and_scoring(collection, monkeypatch):
    original = scene_jpeg(5)
    collection.ingest(
        [IngestItem(image=original, item_id="a"),
         IngestItem(image=near_copy(original), item_id="b", on_duplicate=OnDuplicate.ADD)],
        _TIMEOUT_S,
    )
    [near_before] = [event for event in _audit(collection, kinds=(MatchKind.NEAR,)) if isinstance(event, DuplicateGroup)]
    pairs_within = collection._phash_index.pairs_within

    def pairs_then_remove(*args, **kwargs):
        found = pairs_within(*args, **kwargs)
        collection.remove_items(["b"])
        return found

    monkeypatch.setattr(collection._phash_index, "pairs_within", pairs_then_remove)

    events = _audit(collection, kinds=(MatchKind.NEAR,))

    assert near_before.kind is MatchKind.NEAR
    assert [event for event in events if isinstance(event, DuplicateGroup)] == []
    assert isinstance(events[-1], AuditSummary)


def test_local_differences_of_removed_items_never_near(collection):
    collection.ingest([IngestItem(image=scene_jpeg(6), item_id="a"), IngestItem(image=scene_jpeg(7), item_id="b")],
                      _TIMEOUT_S)
    row_ids = {item.item_id: item.row_id for item in collection._store.items_by_item_id(["a", "b"]).values()}
    differences = _LocalDifferences(collection._store)
    collection.remove_items(["b"])

    measured = differences.measure([(row_ids["a"], row_ids["b"]), (row_ids["a"], row_ids["a"])], check=lambda: None)

    assert measured == [math.inf, 0.0]


def test_mask_rebuilt_past_limit(collection, removal):
    _ingest(collection, count=10)

    collection.remove_items(["item-0", "item-1"])
    masked_before_limit = collection._index.masked_count
    collection.remove_items(["item-2", "item-3"])

    assert masked_before_limit == (2 if removal == "mask" else 0)
    assert collection._index.masked_count == 0
    assert sorted(_search_ids(collection, ImageQuery(make_png(5)))) == [f"item-{n}" for n in range(4, 10)]


@pytest.mark.parametrize("with_snapshot", [True, False], ids=["snapshot", "rebuild"])
def test_removed_items_stay_removed_after_restart(open_collection, with_snapshot):
    first = open_collection(snapshots=with_snapshot)
    _ingest(first, count=8)
    first.remove_items(["item-1", "item-6"])
    first.close()

    second = open_collection(snapshots=with_snapshot)

    assert second.stats().item_count == 6
    assert "item-1" not in _search_ids(second, ImageQuery(make_png(1)))
    assert sorted(_search_ids(second, ItemQuery("item-0"))) == [f"item-{n}" for n in (0, 2, 3, 4, 5, 7)]
    [result] = second.ingest([IngestItem(image=make_png(50), item_id="item-6")], _TIMEOUT_S)
    assert isinstance(result.error, FailedPreconditionError)


# Metadata updates


def _update(collection, item_id, set_values=None, remove_keys=(), replace=False):
    return collection.update_metadata(item_id, MetadataUpdate(set_values or {}, list(remove_keys), replace))


def test_update_metadata_sets_and_removes_keys(collection):
    collection.ingest([IngestItem(image=make_png(1), item_id="cat", metadata={"a": "1", "b": "2"})], _TIMEOUT_S)

    metadata = _update(collection, "cat", {"b": "20", "c": "3"}, remove_keys=["a", "absent"])

    assert metadata == {"b": "20", "c": "3"}
    [neighbour] = collection.search(ItemQuery("cat"), k=1, min_score=None, timeout_s=_TIMEOUT_S)
    assert neighbour.metadata == {"b": "20", "c": "3"}


def test_update_metadata_replace(collection):
    collection.ingest([IngestItem(image=make_png(1), item_id="cat", metadata={"a": "1", "b": "2"})], _TIMEOUT_S)

    assert _update(collection, "cat", {"c": "3"}, replace=True) == {"c": "3"}
    assert _update(collection, "cat", replace=True) == {}


def test_update_metadata_without_changes_returns_metadata(collection):
    collection.ingest([IngestItem(image=make_png(1), item_id="cat", metadata={"a": "1"})], _TIMEOUT_S)

    assert _update(collection, "cat") == {"a": "1"}


def test_update_metadata_of_unknown_and_removed_items(collection):
    _ingest(collection, count=2)
    collection.remove_items(["item-1"])

    with pytest.raises(NotFoundError, match="'nope' not found"):
        _update(collection, "nope", {"a": "1"})
    with pytest.raises(NotFoundError, match="'item-1' belonged to an item that was removed"):
        _update(collection, "item-1", {"a": "1"})


@pytest.mark.parametrize(
    ("item_id", "update", "error_type", "message"),
    [
        ("", MetadataUpdate({"a": "1"}, []), InvalidInputError, "item_id is empty"),
        ("item-0", MetadataUpdate({"a": "1"}, ["a"]), InvalidInputError, "both in set and in remove_keys"),
        ("item-0", MetadataUpdate({"a": "1"}, ["n"], replace=True), InvalidInputError, "replace is true"),
        ("item-0", MetadataUpdate({"bad\nkey": "1"}, []), InvalidInputError, "non-printable"),
        ("item-0", MetadataUpdate({"a": "v" * 33}, []), TooLargeError, "limit of 32"),
        ("item-0", MetadataUpdate({k: "v" for k in "abcd"}, []), TooLargeError, "would have 5 keys"),
    ],
    ids=["empty-item-id", "key-in-both", "replace-with-remove-keys", "bad-key", "long-value", "too-many-keys"],
)
def test_update_metadata_rejected(collection, item_id, update, error_type, message):
    _ingest(collection, count=1)

    with pytest.raises(error_type, match=message):
        collection.update_metadata(item_id, update)
    [neighbour] = collection.search(ItemQuery("item-0"), k=1, min_score=None, timeout_s=_TIMEOUT_S)
    assert neighbour.metadata == {"n": "0"}


def test_update_metadata_survives_restart(open_collection):
    first = open_collection()
    _ingest(first, count=2)
    _update(first, "item-1", {"label": "dog"})
    _close_without_snapshot(first)

    second = open_collection()

    [neighbour] = second.search(ItemQuery("item-1"), k=1, min_score=None, timeout_s=_TIMEOUT_S)
    assert neighbour.metadata == {"n": "1", "label": "dog"}


@pytest.mark.parametrize(
    ("metadata", "error_type"),
    [({k: "v" for k in "abcde"}, TooLargeError), ({"": "v"}, InvalidInputError), ({"a": "v" * 33}, TooLargeError)],
    ids=["too-many-keys", "empty-key", "long-value"],
)
def test_ingest_checks_metadata_limits(collection, metadata, error_type):
    results = collection.ingest([IngestItem(image=make_png(1), metadata=metadata), IngestItem(image=make_png(2))],
                                _TIMEOUT_S)

    assert [result.status for result in results] == [IngestStatus.FAILED, IngestStatus.ADDED]
    assert isinstance(results[0].error, error_type)


# Snapshots


def test_save_snapshot_only_after_changes(collection, tmp_path):
    assert not collection.save_snapshot()
    _ingest(collection, count=3)

    assert collection.save_snapshot()
    assert (tmp_path / FILE_NAME).exists()
    assert not collection.save_snapshot()
    collection.remove_items(["item-0"])
    assert collection.save_snapshot()


def test_restart_loads_snapshot_and_replays_later_changes(open_collection):
    first = open_collection()
    _ingest(first, count=6)
    first.save_snapshot()
    first.ingest([IngestItem(image=make_png(n), item_id=f"late-{n}") for n in (20, 21)], _TIMEOUT_S)
    first.remove_items(["item-0", "late-20"])
    _close_without_snapshot(first)

    with capture_logs() as logs:
        second = open_collection()

    [loaded] = [entry for entry in logs if entry["event"] == "snapshot_loaded"]
    assert (loaded["added_after_snapshot"], loaded["removed_after_snapshot"]) == (1, 1)
    assert sorted(_search_ids(second, ItemQuery("late-21"))) == sorted(
        [f"item-{n}" for n in range(1, 6)] + ["late-21"]
    )
    assert second.stats().item_count == 6


def test_close_saves_snapshot_that_next_start_loads(open_collection):
    first = open_collection()
    _ingest(first, count=4)
    first.close()

    with capture_logs() as logs:
        second = open_collection()

    [loaded] = [entry for entry in logs if entry["event"] == "snapshot_loaded"]
    assert (loaded["added_after_snapshot"], loaded["removed_after_snapshot"], loaded["item_count"]) == (0, 0, 4)
    assert not second.save_snapshot()


def test_scheduler_saves_after_changes(collection, tmp_path):
    collection.start_snapshots(interval_s=0, after_changes=3)
    _ingest(collection, count=2)
    time.sleep(0.2)
    assert not (tmp_path / FILE_NAME).exists()

    _ingest(collection, count=3)

    deadline = time.monotonic() + 5
    while not (tmp_path / FILE_NAME).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (tmp_path / FILE_NAME).exists()


def test_snapshot_needs_load_first(tmp_path):
    collection = Collection(Store(tmp_path), VectorIndex(device="cpu"), FakeEmbedder(dim=_DIM), _LIMITS,
                            snapshot_path=tmp_path / FILE_NAME)

    collection.close()

    assert not (tmp_path / FILE_NAME).exists()


# Start-up check of the embed service's model


def test_check_embedder_rejects_other_model(open_collection):
    first = open_collection()
    _ingest(first, count=1)
    first.close()
    second = open_collection(embedder=FakeEmbedder(dim=_DIM, model_id="other-clip"))

    with pytest.raises(EmbedModelMismatchError) as raised:
        second.check_embedder(timeout_s=1.0)

    assert "contains embeddings of model 'fake-clip' (dim 16)" in str(raised.value)
    assert "runs model 'other-clip' (dim 16)" in str(raised.value)


def test_check_embedder_rejects_other_dim(collection):
    _ingest(collection, count=1)
    collection._embedder.dim = 8

    with pytest.raises(EmbedModelMismatchError, match=r"\(dim 8\)"):
        collection.check_embedder(timeout_s=1.0)


def test_check_embedder_of_empty_collection_accepts_any_model(open_collection):
    open_collection(embedder=FakeEmbedder(dim=4, model_id="any")).check_embedder(timeout_s=1.0)


def test_check_embedder_unreachable_is_logged(collection):
    _ingest(collection, count=1)
    collection._embedder.down = True

    with capture_logs() as logs:
        collection.check_embedder(timeout_s=1.0)

    assert [entry["event"] for entry in logs] == ["embed_service_unreachable"]


def test_vectors_of_removed_item_ids_gone_from_index(collection):
    _ingest(collection, count=4)
    row_ids_before = collection._index.row_ids()

    collection.remove_items(["item-1"])

    assert len(collection._index.row_ids()) == len(row_ids_before) - 1
    assert len(collection._phash_index) == 3
    assert np.all(np.isin(collection._index.row_ids(), row_ids_before))
