"""Tests of index_service.recovery: restoring the indexes from a snapshot and the store, and repairing them."""

import dataclasses

import numpy as np
import pytest
from structlog.testing import capture_logs

from imgsearch_common.fingerprints import FINGERPRINT_VERSION, LAYOUT_BYTES, Fingerprint
from index_service.phash_index import PhashIndex
from index_service.recovery import capture_snapshot, check_and_repair, restore_indexes
from index_service.snapshot import FILE_NAME, TEMP_SUFFIX, write_snapshot
from index_service.store import NewItem, Store
from index_service.vector_index import VectorIndex

_DIM = 8
_MODEL_ID = "fake-clip"


def _item(number: int) -> NewItem:
    """Return an item with a seeded unit vector, and a fingerprint for every odd number."""
    rng = np.random.default_rng(number)
    vector = rng.standard_normal(_DIM).astype(np.float32)
    fingerprint = None
    if number % 2:
        fingerprint = Fingerprint(
            version=FINGERPRINT_VERSION,
            pixel_sha256=f"{number:064x}",
            phash=int(rng.integers(0, 2**63)),
            width=4,
            height=4,
            layout=bytes(LAYOUT_BYTES),
        )
    return NewItem(
        item_id=f"item-{number}",
        sha256=f"{number:064x}",
        uri="",
        width=4,
        height=4,
        metadata={},
        vector=vector / np.linalg.norm(vector),
        model_id=_MODEL_ID,
        fingerprint=fingerprint,
    )


def _add(store: Store, numbers) -> None:
    settings = {"model_id": _MODEL_ID, "dim": str(_DIM)}
    store.add_items([_item(number) for number in numbers], settings=settings)


@pytest.fixture
def store(tmp_path):
    opened = Store(tmp_path)
    yield opened
    opened.close()


@pytest.fixture
def snapshot_path(tmp_path):
    return tmp_path / FILE_NAME


def _indexes(removal: str = "remove_ids", max_masked: int = 1024) -> tuple[VectorIndex, PhashIndex]:
    return VectorIndex(device="cpu", removal=removal, max_masked=max_masked), PhashIndex()


def _save_snapshot(store: Store, path) -> None:
    vector_index, phash_index = _indexes()
    restore_indexes(store, vector_index, phash_index, None)
    write_snapshot(path, capture_snapshot(store, vector_index, phash_index, _MODEL_ID, _DIM))


def _assert_match_store(store: Store, vector_index: VectorIndex, phash_index: PhashIndex) -> None:
    row_ids = store.row_ids()
    assert vector_index.row_ids().tolist() == row_ids.tolist()
    assert phash_index.row_ids().tolist() == store.fingerprinted_row_ids().tolist()
    stored = store.items_by_row_id(row_ids.tolist())
    expected = np.stack([stored[int(row_id)].vector for row_id in row_ids])
    np.testing.assert_array_equal(vector_index.vectors(row_ids), expected)


def _events(logs) -> list[str]:
    return [entry["event"] for entry in logs]


def test_restore_without_snapshot_rebuilds(store, snapshot_path):
    _add(store, range(1, 8))
    store.remove_items(["item-3"])
    vector_index, phash_index = _indexes()

    with capture_logs() as logs:
        report = restore_indexes(store, vector_index, phash_index, snapshot_path)

    assert report.source == "store"
    assert report.item_count == 6
    assert report.changes == 6
    assert not report.repair.changed
    assert {"snapshot_missing", "index_rebuilt", "index_checked"} <= set(_events(logs))
    _assert_match_store(store, vector_index, phash_index)


def test_restore_replays_changes_after_snapshot(store, snapshot_path):
    _add(store, range(1, 11))
    store.remove_items(["item-2"])
    _save_snapshot(store, snapshot_path)
    _add(store, range(11, 16))
    store.remove_items(["item-5", "item-6", "item-12", "item-2"])
    vector_index, phash_index = _indexes()

    with capture_logs() as logs:
        report = restore_indexes(store, vector_index, phash_index, snapshot_path)

    assert report.source == "snapshot"
    assert (report.added_after_snapshot, report.removed_after_snapshot) == (4, 2)
    assert report.changes == 6
    assert report.item_count == 11
    assert not report.repair.changed
    assert "snapshot_loaded" in _events(logs)
    assert "index_rebuilt" not in _events(logs)
    _assert_match_store(store, vector_index, phash_index)


def test_restore_of_current_snapshot_changes_nothing(store, snapshot_path):
    _add(store, range(1, 6))
    _save_snapshot(store, snapshot_path)
    vector_index, phash_index = _indexes()

    report = restore_indexes(store, vector_index, phash_index, snapshot_path)

    assert (report.source, report.changes) == ("snapshot", 0)
    _assert_match_store(store, vector_index, phash_index)


def test_restore_with_mask_rebuilds_past_limit(store, snapshot_path):
    _add(store, range(1, 11))
    _save_snapshot(store, snapshot_path)
    store.remove_items(["item-1", "item-4", "item-7"])
    vector_index, phash_index = _indexes(removal="mask", max_masked=2)

    report = restore_indexes(store, vector_index, phash_index, snapshot_path)

    assert report.source == "snapshot"
    assert vector_index.masked_count == 0
    _assert_match_store(store, vector_index, phash_index)


def test_restore_with_mask_below_limit_keeps_mask(store, snapshot_path):
    _add(store, range(1, 11))
    _save_snapshot(store, snapshot_path)
    store.remove_items(["item-1", "item-4"])
    vector_index, phash_index = _indexes(removal="mask", max_masked=2)

    restore_indexes(store, vector_index, phash_index, snapshot_path)

    assert vector_index.masked_count == 2
    _assert_match_store(store, vector_index, phash_index)


def test_snapshot_of_other_model_ignored(store, snapshot_path):
    _add(store, range(1, 4))
    vector_index, phash_index = _indexes()
    restore_indexes(store, vector_index, phash_index, None)
    write_snapshot(snapshot_path, capture_snapshot(store, vector_index, phash_index, "other-clip", _DIM))

    with capture_logs() as logs:
        report = restore_indexes(store, *_indexes(), snapshot_path)

    assert report.source == "store"
    [ignored] = [entry for entry in logs if entry["event"] == "snapshot_ignored"]
    assert "'other-clip'" in ignored["reason"]


def test_snapshot_of_another_store_ignored(tmp_path, store, snapshot_path):
    _add(store, range(1, 4))
    other = Store(tmp_path / "other")
    try:
        _add(other, range(1, 9))
        _save_snapshot(other, snapshot_path)
    finally:
        other.close()
    vector_index, phash_index = _indexes()

    with capture_logs() as logs:
        report = restore_indexes(store, vector_index, phash_index, snapshot_path)

    assert report.source == "store"
    [ignored] = [entry for entry in logs if entry["event"] == "snapshot_ignored"]
    assert "belongs to another store" in ignored["reason"]
    _assert_match_store(store, vector_index, phash_index)


def test_damaged_snapshot_ignored(store, snapshot_path):
    _add(store, range(1, 6))
    _save_snapshot(store, snapshot_path)
    data = bytearray(snapshot_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    snapshot_path.write_bytes(bytes(data))
    vector_index, phash_index = _indexes()

    with capture_logs() as logs:
        report = restore_indexes(store, vector_index, phash_index, snapshot_path)

    assert report.source == "store"
    assert "snapshot_ignored" in _events(logs)
    _assert_match_store(store, vector_index, phash_index)


def test_snapshot_with_wrong_item_count_ignored(store, snapshot_path):
    _add(store, range(1, 6))
    vector_index, phash_index = _indexes()
    restore_indexes(store, vector_index, phash_index, None)
    snapshot = capture_snapshot(store, vector_index, phash_index, _MODEL_ID, _DIM)
    write_snapshot(snapshot_path, dataclasses.replace(snapshot, header=dataclasses.replace(snapshot.header, item_count=9)))

    with capture_logs() as logs:
        report = restore_indexes(store, *_indexes(), snapshot_path)

    assert report.source == "store"
    [ignored] = [entry for entry in logs if entry["event"] == "snapshot_ignored"]
    assert "header says dim 8 and 9 items" in ignored["reason"]


def test_interrupted_snapshot_write_cleaned_up(store, snapshot_path):
    _add(store, range(1, 4))
    _save_snapshot(store, snapshot_path)
    temp = snapshot_path.with_name(snapshot_path.name + TEMP_SUFFIX)
    temp.write_bytes(b"the first half of a newer snapshot")

    with capture_logs() as logs:
        report = restore_indexes(store, *_indexes(), snapshot_path)

    assert report.source == "snapshot"
    assert not temp.exists()
    assert "snapshot_temp_file_removed" in _events(logs)


def test_restore_of_empty_store(store, snapshot_path):
    vector_index, phash_index = _indexes()
    write_snapshot(snapshot_path, capture_snapshot(store, vector_index, phash_index, model_id="", dim=0))

    report = restore_indexes(store, vector_index, phash_index, snapshot_path)

    assert (report.source, report.item_count) == ("snapshot", 0)
    assert vector_index.dim is None


# Consistency check


def test_repair_adds_missing_and_removes_extra_vectors(store):
    _add(store, range(1, 8))
    vector_index, phash_index = _indexes()
    restore_indexes(store, vector_index, phash_index, None)
    vector_index.remove(np.array([2, 5]))
    vector_index.add(np.array([99]), np.ones((1, _DIM), dtype=np.float32) / np.sqrt(_DIM))

    with capture_logs() as logs:
        repair = check_and_repair(store, vector_index, phash_index)

    assert (repair.vectors_added, repair.vectors_removed) == (2, 1)
    assert not repair.vector_index_rebuilt
    [logged] = [entry for entry in logs if entry["event"] == "index_repaired"]
    assert logged["added_row_ids"] == [2, 5]
    assert logged["removed_row_ids"] == [99]
    assert logged["log_level"] == "warning"
    _assert_match_store(store, vector_index, phash_index)


def test_repair_rebuilds_vector_index_with_repeated_row_id(store):
    _add(store, range(1, 4))
    vector_index, phash_index = _indexes()
    restore_indexes(store, vector_index, phash_index, None)
    vector_index.add(np.array([2]), vector_index.vectors(np.array([2])))

    repair = check_and_repair(store, vector_index, phash_index)

    assert repair.vector_index_rebuilt
    _assert_match_store(store, vector_index, phash_index)


def test_repair_rebuilds_phash_index(store):
    _add(store, range(1, 8))
    vector_index, phash_index = _indexes()
    restore_indexes(store, vector_index, phash_index, None)
    phash_index.remove(np.array([3]))

    with capture_logs() as logs:
        repair = check_and_repair(store, vector_index, phash_index)

    assert repair.phash_index_rebuilt
    [logged] = [entry for entry in logs if entry["event"] == "index_repaired"]
    assert (logged["index"], logged["missing"], logged["extra"]) == ("phash", 1, 0)
    _assert_match_store(store, vector_index, phash_index)


def test_check_of_matching_indexes_changes_nothing(store):
    _add(store, range(1, 5))
    vector_index, phash_index = _indexes()
    restore_indexes(store, vector_index, phash_index, None)

    with capture_logs() as logs:
        repair = check_and_repair(store, vector_index, phash_index)

    assert not repair.changed
    assert "index_repaired" not in _events(logs)
