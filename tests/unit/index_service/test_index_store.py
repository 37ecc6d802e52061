"""Tests of index_service.store against a SQLite file in a temporary directory."""

import dataclasses
import sqlite3
import threading

import numpy as np
import pytest

from imgsearch_common.config import ConfigError
from imgsearch_common.fingerprints import FINGERPRINT_VERSION, LAYOUT_BYTES, Fingerprint
from index_service.store import FILE_NAME, NewItem, Store
from tests.unit.index_service.index_fakes import write_old_store


def _new_item(number: int, dim: int = 4) -> NewItem:
    vector = np.random.default_rng(number).standard_normal(dim).astype(np.float32)
    return NewItem(
        item_id=f"item-{number}",
        sha256=f"{number:064x}",
        uri=f"file:///images/{number}.png",
        width=10 + number,
        height=20 + number,
        metadata={"label": f"label-{number}", "number": str(number)},
        vector=vector,
        model_id="fake-clip",
    )


@pytest.fixture
def store(tmp_path):
    opened = Store(tmp_path)
    yield opened
    opened.close()


def test_add_items_round_trip(store):
    items = [_new_item(1), _new_item(2)]

    row_ids = store.add_items(items)

    by_row_id = store.items_by_row_id(row_ids)
    for row_id, item in zip(row_ids, items):
        stored = by_row_id[row_id]
        assert stored.item_id == item.item_id
        assert stored.sha256 == item.sha256
        assert stored.uri == item.uri
        assert (stored.width, stored.height) == (item.width, item.height)
        assert stored.metadata == item.metadata
        assert stored.model_id == item.model_id
        assert stored.vector.dtype == np.float32
        np.testing.assert_array_equal(stored.vector, item.vector)
        assert stored.created_at


def test_lookups_by_sha256_and_item_id(store):
    store.add_items([_new_item(1), _new_item(2)])

    by_sha256 = store.items_by_sha256([_new_item(2).sha256, "f" * 64])
    by_item_id = store.items_by_item_id(["item-1", "item-9"])

    assert list(by_sha256) == [_new_item(2).sha256]
    assert by_sha256[_new_item(2).sha256].item_id == "item-2"
    assert list(by_item_id) == ["item-1"]
    assert store.items_by_item_id([]) == {}


def test_lookup_of_many_values(store):
    store.add_items([_new_item(n) for n in range(1200)])

    found = store.items_by_item_id(f"item-{n}" for n in range(0, 1300))

    assert len(found) == 1200


def test_add_items_is_one_transaction(store):
    store.add_items([_new_item(1)])
    clashing = dataclasses.replace(_new_item(3), sha256=_new_item(1).sha256)

    with pytest.raises(sqlite3.IntegrityError):
        store.add_items([_new_item(2), clashing], settings={"model_id": "other"})

    assert store.count() == 1
    assert store.items_by_item_id(["item-2"]) == {}
    assert store.settings() == {}


def test_duplicate_item_id_rejected(store):
    store.add_items([_new_item(1)])
    clashing = dataclasses.replace(_new_item(2), item_id="item-1")

    with pytest.raises(sqlite3.IntegrityError):
        store.add_items([clashing])

    assert store.count() == 1


def test_settings_upserted_and_persisted(tmp_path):
    store = Store(tmp_path)
    store.add_items([_new_item(1)], settings={"model_id": "fake-clip", "dim": "4"})
    store.add_items([_new_item(2)], settings={"dim": "4"})
    store.close()

    reopened = Store(tmp_path)
    try:
        assert reopened.settings() == {"model_id": "fake-clip", "dim": "4"}
        assert reopened.count() == 2
    finally:
        reopened.close()


def test_row_ids_never_reused(tmp_path):
    store = Store(tmp_path)
    first_row_ids = store.add_items([_new_item(1), _new_item(2)])
    store.close()
    with sqlite3.connect(tmp_path / FILE_NAME) as connection:
        connection.execute("DELETE FROM items WHERE row_id = ?", (first_row_ids[-1],))
    connection.close()

    reopened = Store(tmp_path)
    try:
        [new_row_id] = reopened.add_items([_new_item(3)])
    finally:
        reopened.close()

    assert new_row_id > max(first_row_ids)


def test_vector_batches_cover_every_item_in_order(store):
    items = [_new_item(n) for n in range(7)]
    row_ids = store.add_items(items)

    batches = list(store.vector_batches(batch_size=3))

    assert [len(batch_row_ids) for batch_row_ids, _ in batches] == [3, 3, 1]
    all_row_ids = np.concatenate([batch_row_ids for batch_row_ids, _ in batches])
    all_vectors = np.concatenate([vectors for _, vectors in batches])
    assert all_row_ids.dtype == np.int64
    assert all_row_ids.tolist() == row_ids
    assert all_vectors.dtype == np.float32
    np.testing.assert_array_equal(all_vectors, np.stack([item.vector for item in items]))


def test_vector_batches_of_empty_store(store):
    assert list(store.vector_batches()) == []


def test_store_uses_wal_and_full_sync(store):
    # The store locks the file exclusively, so its own connection is the only one that can read it.
    connection = store._connection

    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # 2 is FULL
    assert connection.execute("PRAGMA locking_mode").fetchone()[0] == "exclusive"


def test_second_store_on_same_file_rejected(store, tmp_path):
    with pytest.raises(ConfigError, match="IMGSEARCH_INDEX_DATA_DIR"):
        Store(tmp_path, lock_timeout_s=0.1)

    assert store.count() == 0


def test_concurrent_adds_from_threads(store):
    def add_range(start):
        for number in range(start, start + 25):
            store.add_items([_new_item(number)])

    threads = [threading.Thread(target=add_range, args=(start,)) for start in (0, 100, 200, 300)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert store.count() == 100
    assert len({row_id for row_ids, _ in store.vector_batches() for row_id in row_ids}) == 100


# Fingerprints


def _fingerprint(number: int, pixel_sha256: str | None = None, phash: int | None = None) -> Fingerprint:
    return Fingerprint(
        version=FINGERPRINT_VERSION,
        pixel_sha256=pixel_sha256 or f"{number:064x}",
        phash=(2**64 - 1 - number) if phash is None else phash,
        width=10 + number,
        height=20 + number,
        layout=bytes([number % 256]) * LAYOUT_BYTES,
    )


def _fingerprinted_item(number: int, **fingerprint_fields) -> NewItem:
    return dataclasses.replace(_new_item(number), fingerprint=_fingerprint(number, **fingerprint_fields))


@pytest.mark.parametrize("phash", [0, 1, 2**63 - 1, 2**63, 2**64 - 1])
def test_fingerprint_round_trip(store, phash):
    [row_id] = store.add_items([_fingerprinted_item(1, phash=phash)])

    stored = store.items_by_row_id([row_id])[row_id]

    assert stored.fingerprint == _fingerprint(1, phash=phash)
    assert store.fingerprints_by_row_id([row_id]) == {row_id: _fingerprint(1, phash=phash)}


def test_item_without_fingerprint(store):
    [row_id] = store.add_items([_new_item(1)])

    assert store.items_by_row_id([row_id])[row_id].fingerprint is None
    assert store.fingerprints_by_row_id([row_id]) == {}
    assert list(store.phash_batches()) == []


def test_items_by_pixel_sha256_allows_several(store):
    shared = "a" * 64
    store.add_items([_fingerprinted_item(1, pixel_sha256=shared), _fingerprinted_item(2)])
    store.add_items([_fingerprinted_item(3, pixel_sha256=shared), _new_item(4)])

    found = store.items_by_pixel_sha256([shared, "b" * 64])

    assert list(found) == [shared]
    assert [item.item_id for item in found[shared]] == ["item-1", "item-3"]


def test_phash_batches_cover_fingerprinted_items(store):
    store.add_items([_fingerprinted_item(n) if n % 3 else _new_item(n) for n in range(1, 11)])

    batches = list(store.phash_batches(batch_size=4))

    row_ids = np.concatenate([batch_row_ids for batch_row_ids, _, _ in batches])
    phashes = np.concatenate([batch_phashes for _, batch_phashes, _ in batches])
    versions = np.concatenate([batch_versions for _, _, batch_versions in batches])
    assert [len(batch_row_ids) for batch_row_ids, _, _ in batches] == [4, 3]
    assert row_ids.tolist() == [1, 2, 4, 5, 7, 8, 10]
    assert phashes.dtype == np.uint64
    assert phashes.tolist() == [2**64 - 1 - n for n in (1, 2, 4, 5, 7, 8, 10)]
    assert versions.tolist() == [FINGERPRINT_VERSION] * 7


def test_exact_groups_up_to_row_id(store):
    shared, other = "a" * 64, "b" * 64
    store.add_items(
        [
            _fingerprinted_item(1, pixel_sha256=shared),
            _fingerprinted_item(2, pixel_sha256=other),
            _fingerprinted_item(3),
            _fingerprinted_item(4, pixel_sha256=shared),
            _fingerprinted_item(5, pixel_sha256=other),
            _fingerprinted_item(6, pixel_sha256=shared),
        ]
    )

    assert store.exact_groups(max_row_id=6) == [[1, 4, 6], [2, 5]]
    assert store.exact_groups(max_row_id=4) == [[1, 4]]


def test_exact_groups_need_same_version(store):
    newer = dataclasses.replace(_fingerprint(2, pixel_sha256="a" * 64), version=FINGERPRINT_VERSION + 1)
    same_pixels = _fingerprinted_item(1, pixel_sha256="a" * 64)
    store.add_items([same_pixels, dataclasses.replace(_new_item(2), fingerprint=newer)])

    assert store.exact_groups(max_row_id=10) == []


def test_counts_up_to_row_id(store):
    assert store.max_row_id() == 0
    store.add_items([_new_item(n) for n in range(5)])

    assert store.max_row_id() == 5
    assert store.count() == 5
    assert store.count(max_row_id=3) == 3
    assert [len(row_ids) for row_ids, _ in store.vector_batches(batch_size=2, max_row_id=3)] == [2, 1]


# Migration

def test_old_store_gains_fingerprint_columns(tmp_path):
    write_old_store(tmp_path, [np.ones(4), np.arange(4)])

    store = Store(tmp_path)
    try:
        columns = {row[1] for row in store._connection.execute("PRAGMA table_info(items)")}
        indexes = {row[1] for row in store._connection.execute("PRAGMA index_list(items)")}
        old = store.items_by_item_id(["old-0", "old-1"])
        [new_row_id] = store.add_items([_fingerprinted_item(7)])
        new = store.items_by_row_id([new_row_id])[new_row_id]
    finally:
        store.close()

    assert {"fingerprint_version", "pixel_sha256", "phash", "layout"} <= columns
    assert "items_pixel_sha256" in indexes
    assert [old[item_id].fingerprint for item_id in ("old-0", "old-1")] == [None, None]
    assert old["old-1"].vector.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert new_row_id == 3
    assert new.fingerprint == _fingerprint(7)


def test_migrated_store_opens_again(tmp_path):
    write_old_store(tmp_path, [np.ones(4)])
    Store(tmp_path).close()

    reopened = Store(tmp_path)
    try:
        assert reopened.count() == 1
        assert reopened.settings() == {"model_id": "fake-clip", "dim": "4"}
    finally:
        reopened.close()


# Removal and tombstones


def test_remove_items_deletes_and_leaves_tombstones(store):
    row_ids = store.add_items([_new_item(n) for n in range(4)])

    removed = store.remove_items(["item-1", "item-3", "item-9", "item-1"])

    assert removed == {"item-1": row_ids[1], "item-3": row_ids[3]}
    assert store.count() == 2
    assert sorted(store.items_by_item_id(["item-0", "item-1", "item-2", "item-3"])) == ["item-0", "item-2"]
    assert store.items_by_sha256([_new_item(1).sha256]) == {}
    assert store.row_ids().tolist() == [row_ids[0], row_ids[2]]
    assert store.removed_item_ids(["item-1", "item-2", "item-3", "item-9"]) == {"item-1", "item-3"}
    assert store.last_removal_id() == 2
    assert store.removed_row_ids(after_removal_id=0).tolist() == [row_ids[1], row_ids[3]]
    assert store.removed_row_ids(after_removal_id=1).tolist() == [row_ids[3]]


def test_remove_items_twice_removes_nothing_more(store):
    store.add_items([_new_item(1)])
    store.remove_items(["item-1"])

    assert store.remove_items(["item-1"]) == {}
    assert store.last_removal_id() == 1


def test_removed_item_id_rejected_by_store(store):
    store.add_items([_new_item(1)])
    store.remove_items(["item-1"])

    with pytest.raises(sqlite3.IntegrityError, match="removed item"):
        store.add_items([dataclasses.replace(_new_item(2), item_id="item-1")])

    assert store.count() == 0


def test_removed_bytes_can_be_stored_again(store):
    store.add_items([_new_item(1)])
    store.remove_items(["item-1"])

    [row_id] = store.add_items([dataclasses.replace(_new_item(1), item_id="item-1-again")])

    assert store.items_by_sha256([_new_item(1).sha256])[_new_item(1).sha256].row_id == row_id


def test_last_row_id_counts_removed_items(store):
    assert store.last_row_id() == 0
    row_ids = store.add_items([_new_item(1), _new_item(2)])
    store.remove_items(["item-2"])

    assert store.last_row_id() == row_ids[-1]
    assert store.max_row_id() == row_ids[0]


def test_removals_survive_reopening(tmp_path):
    store = Store(tmp_path)
    store.add_items([_new_item(1), _new_item(2)])
    store.remove_items(["item-1"])
    store.close()

    reopened = Store(tmp_path)
    try:
        assert reopened.count() == 1
        assert reopened.removed_item_ids(["item-1"]) == {"item-1"}
        assert reopened.last_removal_id() == 1
    finally:
        reopened.close()


def test_removal_of_many_items(store):
    store.add_items([_new_item(n) for n in range(1200)])

    removed = store.remove_items(f"item-{n}" for n in range(0, 1200, 2))

    assert len(removed) == 600
    assert store.count() == 600


# Metadata updates


def test_update_metadata_applies_change(store):
    store.add_items([_new_item(1)])

    updated = store.update_metadata("item-1", lambda metadata: {**metadata, "label": "cat", "new": "yes"})

    assert updated == {"label": "cat", "number": "1", "new": "yes"}
    assert store.items_by_item_id(["item-1"])["item-1"].metadata == updated


def test_update_metadata_of_unknown_item(store):
    calls = []

    assert store.update_metadata("nope", lambda metadata: calls.append(metadata) or {}) is None
    assert calls == []


def test_update_metadata_rolls_back_on_error(store):
    store.add_items([_new_item(1)])

    def failing_change(metadata):
        raise ValueError("too many keys")

    with pytest.raises(ValueError, match="too many keys"):
        store.update_metadata("item-1", failing_change)

    assert store.items_by_item_id(["item-1"])["item-1"].metadata == _new_item(1).metadata
    store.add_items([_new_item(2)])  # the store is usable after the rollback
    assert store.count() == 2


def test_update_metadata_survives_reopening(tmp_path):
    store = Store(tmp_path)
    store.add_items([_new_item(1)])
    store.update_metadata("item-1", lambda metadata: {"only": "this"})
    store.close()

    reopened = Store(tmp_path)
    try:
        assert reopened.items_by_item_id(["item-1"])["item-1"].metadata == {"only": "this"}
    finally:
        reopened.close()


# Items added as embeddings, and row id listings


def test_items_without_sha256(store):
    items = [dataclasses.replace(_new_item(n), sha256=None, width=0, height=0) for n in (1, 2)]

    row_ids = store.add_items(items)

    stored = store.items_by_row_id(row_ids)
    assert [stored[row_id].sha256 for row_id in row_ids] == ["", ""]
    assert [stored[row_id].fingerprint for row_id in row_ids] == [None, None]
    np.testing.assert_array_equal(stored[row_ids[1]].vector, items[1].vector)


def test_row_id_listings(store):
    store.add_items([_fingerprinted_item(1), _new_item(2), _fingerprinted_item(3)])
    store.remove_items(["item-3"])

    assert store.row_ids().tolist() == [1, 2]
    assert store.fingerprinted_row_ids().tolist() == [1]


def test_batches_after_row_id(store):
    store.add_items([_fingerprinted_item(n) for n in range(1, 6)])

    vector_row_ids = [row_id for row_ids, _ in store.vector_batches(after_row_id=3) for row_id in row_ids]
    phash_row_ids = [row_id for row_ids, _, _ in store.phash_batches(after_row_id=3) for row_id in row_ids]

    assert vector_row_ids == [4, 5]
    assert phash_row_ids == [4, 5]


def test_migration_keeps_last_row_id(tmp_path):
    write_old_store(tmp_path, [np.ones(4), np.arange(4), np.full(4, 2.0)])
    with sqlite3.connect(tmp_path / FILE_NAME) as connection:
        connection.execute("DELETE FROM items WHERE item_id = 'old-2'")
    connection.close()

    store = Store(tmp_path)
    try:
        columns = {row[1]: row for row in store._connection.execute("PRAGMA table_info(items)")}
        [new_row_id] = store.add_items([dataclasses.replace(_new_item(7), sha256=None)])
        old = store.items_by_item_id(["old-0", "old-1"])
        store.remove_items(["old-0"])
        with pytest.raises(sqlite3.IntegrityError, match="removed item"):
            store.add_items([dataclasses.replace(_new_item(8), item_id="old-0")])
    finally:
        store.close()

    assert columns["sha256"][3] == 0  # notnull is off
    assert new_row_id == 4
    assert old["old-1"].vector.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert old["old-0"].sha256 == f"{0:064x}"
