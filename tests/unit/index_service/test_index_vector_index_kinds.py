"""Tests of index_service.vector_index with approximate kinds and encoded vectors: IVF, HNSW, fp16 and sq8."""

import numpy as np
import pytest

from imgsearch_common.config import ConfigError
from index_service.index_layout import IndexSpec
from index_service.vector_index import VectorIndex
from tests.unit.index_service.clustered import clustered_vectors, exact_top_k, recall_at_k

_DIM = 32
_COUNT = 6000


@pytest.fixture(scope="module")
def database():
    return clustered_vectors(_COUNT + 100, _DIM, clusters=60, seed=2)


def _built(spec: IndexSpec, vectors: np.ndarray) -> VectorIndex:
    index = VectorIndex(device="cpu", spec=spec)
    index.rebuild([(np.arange(len(vectors), dtype=np.int64), vectors)])
    return index


def _found(index: VectorIndex, queries: np.ndarray, k: int, effort=None) -> list[list[int]]:
    return [[hit.row_id for hit in hits] for hits in index.search(queries, k, effort=effort)]


@pytest.mark.parametrize(
    "spec",
    [IndexSpec(kind="ivf"), IndexSpec(kind="hnsw"), IndexSpec(kind="flat", encoding="sq8"),
     IndexSpec(kind="ivf", encoding="fp16")],
    ids=["ivf", "hnsw", "flat-sq8", "ivf-fp16"],
)
def test_recall_at_10_against_exact_search(database, spec):
    vectors, queries = database[:_COUNT], database[_COUNT:]
    index = _built(spec, vectors)

    recall = recall_at_k(_found(index, queries, 10), exact_top_k(vectors, queries, 10))

    assert index.layout.kind == spec.kind
    assert recall >= 0.9


def test_more_ivf_lists_visited_find_more():
    loose = clustered_vectors(_COUNT + 100, _DIM, clusters=60, seed=3, spread=2.0)
    vectors, queries = loose[:_COUNT], loose[_COUNT:]
    index = _built(IndexSpec(kind="ivf", nlist=64), vectors)
    truth = exact_top_k(vectors, queries, 10)

    one_list = recall_at_k(_found(index, queries, 10, effort=1), truth)
    every_list = recall_at_k(_found(index, queries, 10, effort=64), truth)

    assert one_list < 0.9
    assert every_list == 1.0


def test_first_add_starts_flat_and_growth_wants_ivf(database):
    index = VectorIndex(device="cpu", spec=IndexSpec(kind="auto", ivf_min_items=2000))
    index.add(np.arange(1000), database[:1000])
    assert (index.layout.kind, index.wants_relayout) == ("flat", False)

    index.add(np.arange(1000, 2000), database[1000:2000])
    assert index.wants_relayout

    index.rebuild([(np.arange(2000), database[:2000])])
    assert index.layout.kind == "ivf"
    assert not index.wants_relayout


def test_ivf_removes_in_place(database):
    index = _built(IndexSpec(kind="ivf"), database[:_COUNT])

    assert index.remove(np.array([3, 4, 99_999])) == 2

    assert index.masked_count == 0
    assert len(index) == _COUNT - 2
    assert 3 not in _found(index, database[3:4], 5)[0]


def test_hnsw_masks_removed_vectors(database):
    index = _built(IndexSpec(kind="hnsw"), database[:2000])

    assert index.remove(np.array([5])) == 1

    assert index.removal == "mask"
    assert index.masked_count == 1
    assert 5 not in _found(index, database[5:6], 5)[0]
    assert len(index) == 1999


def test_hnsw_with_remove_ids_is_rejected():
    with pytest.raises(ConfigError, match="remove_ids, which an HNSW index cannot do"):
        VectorIndex(device="cpu", removal="remove_ids", spec=IndexSpec(kind="hnsw"))


@pytest.mark.parametrize("spec", [IndexSpec(kind="ivf", encoding="sq8"), IndexSpec(kind="hnsw")], ids=["ivf", "hnsw"])
def test_state_round_trip_keeps_the_trained_index(database, spec):
    index = _built(spec, database[:_COUNT])
    index.remove(np.array([7]))
    queries = database[_COUNT:]

    state = index.state()
    restored = VectorIndex(device="cpu", spec=spec)
    restored.load_state(state)

    assert len(state.serialized) > 0
    assert state.vectors.shape == (0, 0)
    assert restored.layout == index.layout
    assert len(restored) == _COUNT - 1
    assert restored.search(queries, 10) == index.search(queries, 10)


def test_load_state_rejects_a_mismatched_row_count(database):
    state = _built(IndexSpec(kind="ivf"), database[:2000]).state()
    broken = type(state)(state.layout, state.dim, state.row_ids[:-1], state.vectors, state.serialized, state.masked)

    with pytest.raises(ValueError, match="2000 vectors"):
        VectorIndex(device="cpu").load_state(broken)


def test_sq8_vectors_are_close_to_the_originals(database):
    index = _built(IndexSpec(kind="flat", encoding="sq8"), database[:2000])

    decoded = index.vectors(np.arange(10))

    assert np.abs(decoded - database[:10]).max() < 0.02
    assert index.memory_bytes < _built(IndexSpec(kind="flat"), database[:2000]).memory_bytes


def test_ivf_arrays_cover_every_row_id(database):
    index = _built(IndexSpec(kind="ivf"), database[:2000])

    row_ids, vectors = index.arrays()

    assert row_ids.tolist() == list(range(2000))
    np.testing.assert_allclose(vectors, database[:2000], atol=1e-6)
