"""Tests of index_service.vector_index against brute-force numpy search."""

import threading

import faiss
import numpy as np
import pytest

from imgsearch_common.config import ConfigError
from index_service.rwlock import ReadWriteLock
from index_service.vector_index import VectorIndex

_DIM = 32


def _unit_vectors(count: int, seed: int, dim: int = _DIM) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _brute_force(database: np.ndarray, row_ids: np.ndarray, queries: np.ndarray, k: int):
    scores = queries @ database.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return row_ids[order], np.take_along_axis(scores, order, axis=1)


@pytest.fixture
def cpu_index():
    return VectorIndex(device="cpu")


def test_search_matches_brute_force(cpu_index):
    database = _unit_vectors(500, seed=1)
    # Sparse, unordered row ids, as a store with gaps would have.
    row_ids = np.random.default_rng(2).choice(10_000, size=500, replace=False).astype(np.int64)
    queries = _unit_vectors(20, seed=3)
    cpu_index.add(row_ids, database)

    results = cpu_index.search(queries, k=10)

    expected_ids, expected_scores = _brute_force(database, row_ids, queries, k=10)
    for hits, ids, scores in zip(results, expected_ids, expected_scores):
        assert [hit.row_id for hit in hits] == ids.tolist()
        np.testing.assert_allclose([hit.score for hit in hits], scores, atol=1e-5)


def test_search_after_several_adds_matches_brute_force(cpu_index):
    database = _unit_vectors(300, seed=4)
    row_ids = np.arange(1, 301, dtype=np.int64)
    for start in range(0, 300, 70):
        cpu_index.add(row_ids[start : start + 70], database[start : start + 70])
    queries = _unit_vectors(5, seed=5)

    results = cpu_index.search(queries, k=7)

    expected_ids, _ = _brute_force(database, row_ids, queries, k=7)
    assert [[hit.row_id for hit in hits] for hits in results] == expected_ids.tolist()
    assert len(cpu_index) == 300


def test_search_with_fewer_items_than_k(cpu_index):
    cpu_index.add(np.array([11, 12, 13], dtype=np.int64), _unit_vectors(3, seed=6))

    [hits] = cpu_index.search(_unit_vectors(1, seed=7), k=10)

    assert sorted(hit.row_id for hit in hits) == [11, 12, 13]
    assert all(-1.0 <= hit.score <= 1.0 for hit in hits)
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)


def test_search_of_empty_index(cpu_index):
    assert cpu_index.search(_unit_vectors(2, seed=8), k=5) == [[], []]
    assert cpu_index.dim is None
    assert len(cpu_index) == 0


def test_scores_clamped_to_one(cpu_index):
    vector = _unit_vectors(1, seed=9)
    cpu_index.add(np.array([1], dtype=np.int64), vector)

    [hits] = cpu_index.search(vector * 1.01, k=1)

    assert hits[0].row_id == 1
    assert hits[0].score == 1.0


def test_first_add_fixes_dim(cpu_index):
    cpu_index.add(np.array([1], dtype=np.int64), _unit_vectors(1, seed=10))

    assert cpu_index.dim == _DIM
    with pytest.raises(ValueError, match="dim 8"):
        cpu_index.add(np.array([2], dtype=np.int64), _unit_vectors(1, seed=11, dim=8))
    with pytest.raises(ValueError, match="dim 8"):
        cpu_index.search(_unit_vectors(1, seed=12, dim=8), k=1)


def test_add_rejects_mismatched_counts(cpu_index):
    with pytest.raises(ValueError, match="expected 2 vectors"):
        cpu_index.add(np.array([1, 2], dtype=np.int64), _unit_vectors(3, seed=13))


def test_index_type_and_device(cpu_index):
    assert cpu_index.index_type == "IDMap,Flat"
    assert cpu_index.device == "cpu"


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="this machine has a GPU that faiss can use")
def test_device_auto_and_gpu_without_gpu():
    assert VectorIndex(device="auto").device == "cpu"
    with pytest.raises(ConfigError, match="no GPU"):
        VectorIndex(device="gpu")


def test_threads_setting_sets_openmp_threads():
    before = faiss.omp_get_max_threads()
    try:
        VectorIndex(device="cpu", threads=1)
        assert faiss.omp_get_max_threads() == 1
    finally:
        faiss.omp_set_num_threads(before)


def test_read_write_lock_admits_readers_together():
    lock = ReadWriteLock()
    first_inside = threading.Event()
    second_inside = threading.Event()

    def first_reader():
        with lock.reading():
            first_inside.set()
            second_inside.wait(timeout=5)

    thread = threading.Thread(target=first_reader)
    thread.start()
    assert first_inside.wait(timeout=5)
    with lock.reading():
        second_inside.set()
    thread.join(timeout=5)

    assert not thread.is_alive()


def test_read_write_lock_writer_waits_for_readers():
    lock = ReadWriteLock()
    events = []
    writer_started = threading.Event()

    def writer():
        writer_started.set()
        with lock.writing():
            events.append("write")

    with lock.reading():
        thread = threading.Thread(target=writer)
        thread.start()
        assert writer_started.wait(timeout=5)
        thread.join(timeout=0.2)
        events.append("read done")
    thread.join(timeout=5)

    assert events == ["read done", "write"]


def test_concurrent_searches_during_adds(cpu_index):
    database = _unit_vectors(400, seed=14)
    cpu_index.add(np.arange(100, dtype=np.int64), database[:100])
    failures = []

    def search_repeatedly():
        try:
            for _ in range(50):
                [hits] = cpu_index.search(database[:1], k=5)
                assert hits[0].row_id == 0
        except AssertionError as error:
            failures.append(error)

    threads = [threading.Thread(target=search_repeatedly) for _ in range(3)]
    for thread in threads:
        thread.start()
    for start in range(100, 400, 50):
        cpu_index.add(np.arange(start, start + 50, dtype=np.int64), database[start : start + 50])
    for thread in threads:
        thread.join(timeout=30)

    assert failures == []
    assert len(cpu_index) == 400


def test_vectors_by_row_id(cpu_index):
    database = _unit_vectors(50, seed=7)
    row_ids = np.arange(50, dtype=np.int64) * 2 + 100
    cpu_index.add(row_ids, database)

    vectors = cpu_index.vectors(np.array([198, 100, 150]))

    np.testing.assert_array_equal(vectors, database[[49, 0, 25]])
    assert cpu_index.vectors(np.array([], dtype=np.int64)).shape == (0, _DIM)


def test_vectors_of_unknown_row_id(cpu_index):
    with pytest.raises(KeyError, match="row_id 3 is not in the index, which is empty"):
        cpu_index.vectors(np.array([3]))
    cpu_index.add(np.array([1]), _unit_vectors(1, seed=8))

    with pytest.raises(KeyError, match="not every row_id of \\[1, 4\\]"):
        cpu_index.vectors(np.array([1, 4]))


# Removal: remove_ids on the CPU, and the mask that a GPU index needs, forced here on the CPU


@pytest.fixture(params=["remove_ids", "mask"])
def removal(request):
    return request.param


def test_search_after_removal_matches_brute_force(removal):
    index = VectorIndex(device="cpu", removal=removal, max_masked=1000)
    database = _unit_vectors(400, seed=20)
    row_ids = np.arange(1, 401, dtype=np.int64)
    index.add(row_ids, database)
    removed = np.random.default_rng(21).choice(row_ids, size=120, replace=False)
    queries = _unit_vectors(10, seed=22)

    assert index.remove(removed) == 120
    results = index.search(queries, k=15)

    kept = ~np.isin(row_ids, removed)
    expected_ids, expected_scores = _brute_force(database[kept], row_ids[kept], queries, k=15)
    for hits, ids, scores in zip(results, expected_ids, expected_scores):
        assert [hit.row_id for hit in hits] == ids.tolist()
        np.testing.assert_allclose([hit.score for hit in hits], scores, atol=1e-5)
    assert len(index) == 280
    assert index.row_ids().tolist() == row_ids[kept].tolist()


def test_removal_of_unknown_and_repeated_row_ids(removal):
    index = VectorIndex(device="cpu", removal=removal)
    index.add(np.array([1, 2, 3]), _unit_vectors(3, seed=23))

    assert index.remove(np.array([2, 2, 99])) == 1
    assert index.remove(np.array([2])) == 0
    assert index.remove(np.array([], dtype=np.int64)) == 0
    assert VectorIndex(device="cpu", removal=removal).remove(np.array([1])) == 0
    assert len(index) == 2


def test_removed_vectors_not_found(removal):
    index = VectorIndex(device="cpu", removal=removal)
    database = _unit_vectors(5, seed=24)
    index.add(np.arange(1, 6), database)
    index.remove(np.array([2, 4]))

    found, vectors = index.vectors_if_present(np.array([1, 2, 3, 4, 9]))

    assert found.tolist() == [True, False, True, False, False]
    np.testing.assert_array_equal(vectors[[0, 2]], database[[0, 2]])
    assert not vectors[[1, 3, 4]].any()
    with pytest.raises(KeyError, match="row_id 2 is missing"):
        index.vectors(np.array([1, 2]))


def test_mask_hides_nearest_hits():
    index = VectorIndex(device="cpu", removal="mask")
    database = _unit_vectors(50, seed=25)
    index.add(np.arange(50), database)
    # Mask the query's 10 nearest neighbours, so that faiss must be asked for more than k.
    nearest = [hit.row_id for hit in index.search(database[:1], k=10)[0]]
    index.remove(np.array(nearest))

    [hits] = index.search(database[:1], k=3)

    assert len(hits) == 3
    assert not set(hit.row_id for hit in hits) & set(nearest)
    assert index.masked_count == 10


def test_mask_past_limit_asks_for_rebuild():
    index = VectorIndex(device="cpu", removal="mask", max_masked=2)
    database = _unit_vectors(6, seed=26)
    row_ids = np.arange(1, 7)
    index.add(row_ids, database)

    index.remove(np.array([1, 2]))
    assert not index.needs_rebuild
    index.remove(np.array([3]))
    assert index.needs_rebuild

    assert index.rebuild([(row_ids[3:5], database[3:5]), (row_ids[5:], database[5:])]) == 3
    assert not index.needs_rebuild
    assert index.masked_count == 0
    assert index.row_ids().tolist() == [4, 5, 6]
    assert [hit.row_id for hit in index.search(database[:1], k=6)[0]] == sorted(
        [4, 5, 6], key=lambda row_id: -float(database[0] @ database[row_id - 1])
    )


def test_auto_removal_on_cpu_is_remove_ids():
    assert VectorIndex(device="cpu").removal == "remove_ids"


def test_unknown_removal_mode_rejected():
    with pytest.raises(ValueError, match="removal must be one of"):
        VectorIndex(device="cpu", removal="erase")


def test_rebuild_from_no_batches_empties_index():
    index = VectorIndex(device="cpu")
    index.add(np.array([1]), _unit_vectors(1, seed=27))

    assert index.rebuild([]) == 0
    assert len(index) == 0
    assert index.dim is None


# Copying out and loading back, as snapshots do


def test_arrays_and_load_round_trip(removal):
    index = VectorIndex(device="cpu", removal=removal)
    database = _unit_vectors(30, seed=28)
    index.add(np.arange(100, 130), database)
    index.remove(np.array([105, 110]))

    row_ids, vectors = index.arrays()
    loaded = VectorIndex(device="cpu", removal=removal)
    loaded.load(row_ids, vectors)

    kept = ~np.isin(np.arange(100, 130), [105, 110])
    assert row_ids.dtype == np.int64
    assert vectors.dtype == np.float32
    assert sorted(row_ids.tolist()) == np.arange(100, 130)[kept].tolist()
    np.testing.assert_array_equal(vectors[np.argsort(row_ids)], database[kept])
    assert loaded.row_ids().tolist() == index.row_ids().tolist()
    assert loaded.masked_count == 0
    assert loaded.dim == _DIM
    queries = _unit_vectors(3, seed=29)
    assert loaded.search(queries, k=5) == index.search(queries, k=5)


def test_arrays_keep_masked_vectors_in_live_index():
    index = VectorIndex(device="cpu", removal="mask")
    index.add(np.arange(1, 4), _unit_vectors(3, seed=30))
    index.remove(np.array([2]))

    row_ids, _ = index.arrays()

    assert row_ids.tolist() == [1, 3]
    assert index.masked_count == 1
    assert index.row_ids().tolist() == [1, 3]


def test_arrays_of_empty_indexes():
    row_ids, vectors = VectorIndex(device="cpu").arrays()
    emptied = VectorIndex(device="cpu")
    emptied.add(np.array([1]), _unit_vectors(1, seed=31))
    emptied.remove(np.array([1]))

    assert (row_ids.shape, vectors.shape) == ((0,), (0, 0))
    assert emptied.arrays()[1].shape == (0, _DIM)


def test_load_of_empty_arrays_empties_index():
    index = VectorIndex(device="cpu")
    index.add(np.array([1]), _unit_vectors(1, seed=32))

    index.load(np.empty(0, dtype=np.int64), np.empty((0, 0), dtype=np.float32))

    assert index.dim is None
    assert len(index) == 0


@pytest.mark.parametrize(
    ("row_ids", "vectors", "message"),
    [
        (np.array([1, 2]), _unit_vectors(3, seed=33), "expected 2 vectors"),
        (np.array([1]), np.empty((1, 0), dtype=np.float32), "vectors of dim 0"),
        (np.array([1]), np.ones(4, dtype=np.float32), "2-d array"),
    ],
    ids=["count", "no-dim", "one-dimensional"],
)
def test_load_rejects_bad_arrays(row_ids, vectors, message):
    with pytest.raises(ValueError, match=message):
        VectorIndex(device="cpu").load(row_ids, vectors)


def test_vectors_found_after_out_of_order_adds(cpu_index):
    late, early = _unit_vectors(2, seed=40), _unit_vectors(1, seed=41)
    cpu_index.add(np.array([50, 60]), late)
    cpu_index.add(np.array([7]), early)

    found, vectors = cpu_index.vectors_if_present(np.array([60, 7, 8, 50]))

    assert found.tolist() == [True, True, False, True]
    np.testing.assert_array_equal(vectors[[0, 1, 3]], np.stack([late[1], early[0], late[0]]))
