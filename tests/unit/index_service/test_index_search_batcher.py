"""Tests of index_service.search_batcher: concurrent queries share faiss calls and get their own hits."""

import threading

import numpy as np
import pytest

from index_service.search_batcher import IndexQuery, SearchBatcher
from index_service.vector_index import VectorIndex
from tests.unit.index_service.clustered import clustered_vectors

_DIM = 16


class _CountingIndex:
    """A VectorIndex wrapper that counts search calls and can hold the first one until released."""

    def __init__(self, index: VectorIndex, hold_first: bool = False):
        self._index = index
        self.calls: list[int] = []
        self.first_started = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def search(self, vectors, k, effort=None, selector=None):
        self.calls.append(len(vectors))
        self.first_started.set()
        self.release.wait(timeout=10)
        return self._index.search(vectors, k, effort=effort, selector=selector)


@pytest.fixture(scope="module")
def vectors():
    return clustered_vectors(500, _DIM, clusters=10, seed=4)


@pytest.fixture(scope="module")
def index(vectors):
    built = VectorIndex(device="cpu")
    built.add(np.arange(500), vectors)
    return built


def test_lone_query_is_searched_at_once(index, vectors):
    counting = _CountingIndex(index)

    [hits] = SearchBatcher(counting).search([IndexQuery(vectors[3], k=4)])

    assert counting.calls == [1]
    assert hits == index.search(vectors[3:4], 4)[0]


def test_batcher_late_queries_share_one_call(index, vectors):
    counting = _CountingIndex(index, hold_first=True)
    batcher = SearchBatcher(counting)
    results = {}

    def search(position):
        results[position] = batcher.search([IndexQuery(vectors[position], k=3)])[0]

    first = threading.Thread(target=search, args=(0,))
    first.start()
    assert counting.first_started.wait(timeout=5)
    others = [threading.Thread(target=search, args=(position,)) for position in range(1, 9)]
    for thread in others:
        thread.start()
    while len(batcher._waiting) < 8:  # noqa: SLF001 - waits for the eight callers to queue up
        threading.Event().wait(0.01)
    counting.release.set()
    for thread in [first, *others]:
        thread.join(timeout=10)

    assert counting.calls == [1, 8]
    for position in range(9):
        assert results[position] == index.search(vectors[position : position + 1], 3)[0]


def test_each_query_gets_its_own_k(index, vectors):
    short, long = SearchBatcher(index).search([IndexQuery(vectors[0], k=2), IndexQuery(vectors[1], k=7)])

    assert (len(short), len(long)) == (2, 7)
    assert long == index.search(vectors[1:2], 7)[0]


def test_different_efforts_are_searched_apart(index, vectors):
    counting = _CountingIndex(index)

    SearchBatcher(counting).search([IndexQuery(vectors[0], 3, effort=1), IndexQuery(vectors[1], 3, effort=2),
                                    IndexQuery(vectors[2], 3, effort=1)])

    assert sorted(counting.calls) == [1, 2]


def test_batcher_index_error_reaches_callers(index):
    with pytest.raises(ValueError, match="queries have dim 3"):
        SearchBatcher(index).search([IndexQuery(np.ones(3, dtype=np.float32), k=2)])


def test_many_threads_get_the_right_hits(index, vectors):
    batcher = SearchBatcher(index, max_batch=16)
    failures = []

    def search(start):
        for position in range(start, start + 20):
            [hits] = batcher.search([IndexQuery(vectors[position], k=5)])
            if hits != index.search(vectors[position : position + 1], 5)[0]:
                failures.append(position)

    threads = [threading.Thread(target=search, args=(start,)) for start in range(0, 400, 20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert failures == []
    assert not batcher._running  # noqa: SLF001 - the lead was handed back
