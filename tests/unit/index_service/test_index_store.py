"""Tests of index_service.store against a SQLite file in a temporary directory."""

import dataclasses
import sqlite3
import threading

import numpy as np
import pytest

from imgsearch_common.config import ConfigError
from index_service.store import FILE_NAME, NewItem, Store


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
