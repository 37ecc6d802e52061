"""Tests of moving a growing collection to the layout its spec wants, in the background, and of keeping it."""

import threading

import pytest

from index_service.collection import Collection, CollectionLimits, IngestItem, SearchEffort, VectorQuery
from index_service.index_layout import IndexSpec
from index_service.snapshot import FILE_NAME
from index_service.store import Store
from index_service.vector_index import VectorIndex
from tests.unit.index_service.clustered import clustered_vectors
from tests.unit.index_service.index_fakes import FakeEmbedder

_DIM = 16
_MODEL_ID = "fake-clip"
_TIMEOUT_S = 10.0
_SPEC = IndexSpec(kind="ivf", nlist=16)


@pytest.fixture(scope="module")
def vectors():
    return clustered_vectors(1400, _DIM, clusters=20, seed=5)


def _open(data_dir, spec=_SPEC) -> tuple[Collection, VectorIndex]:
    index = VectorIndex(device="cpu", spec=spec)
    collection = Collection(Store(data_dir), index, FakeEmbedder(dim=_DIM, model_id=_MODEL_ID),
                            CollectionLimits(max_k=50), snapshot_path=data_dir / FILE_NAME)
    collection.load()
    return collection, index


def _ingest(collection, vectors, start, stop):
    items = [IngestItem(embedding=vectors[n].tolist(), model_id=_MODEL_ID, item_id=f"v{n}") for n in range(start, stop)]
    for offset in range(0, len(items), 100):
        collection.ingest(items[offset : offset + 100], _TIMEOUT_S)


def _first_item_id(collection, vector) -> str:
    return collection.search(VectorQuery(vector.tolist()), k=1, min_score=None, timeout_s=_TIMEOUT_S)[0].item_id


def test_growth_moves_the_collection_to_ivf(tmp_path, vectors):
    collection, index = _open(tmp_path)
    _ingest(collection, vectors, 0, 999)
    assert index.layout.kind == "flat"

    _ingest(collection, vectors, 999, 1200)
    assert collection.wait_for_relayout(timeout_s=30)

    stats = collection.stats()
    assert (stats.index_kind, stats.nlist, stats.item_count) == ("ivf", 16, 1200)
    assert stats.default_search_effort == 16
    assert all(_first_item_id(collection, vectors[n]) == f"v{n}" for n in range(0, 1200, 37))
    collection.close()


def test_changes_during_the_build_are_replayed(tmp_path, vectors):
    collection, index = _open(tmp_path)
    _ingest(collection, vectors, 0, 999)
    started, release = threading.Event(), threading.Event()
    build = index.build

    def held_build(batches):
        read = list(batches)
        started.set()
        release.wait(timeout=30)
        return build(read)

    index.build = held_build
    _ingest(collection, vectors, 999, 1000)
    assert started.wait(timeout=10)
    _ingest(collection, vectors, 1000, 1300)
    collection.remove_items(["v5", "v1100"])
    release.set()
    assert collection.wait_for_relayout(timeout_s=30)

    assert index.layout.kind == "ivf"
    assert len(index) == 1298
    assert _first_item_id(collection, vectors[1250]) == "v1250"
    assert _first_item_id(collection, vectors[5]) != "v5"
    assert _first_item_id(collection, vectors[1100]) != "v1100"
    collection.close()


def test_restart_loads_the_trained_index_from_the_snapshot(tmp_path, vectors):
    collection, _ = _open(tmp_path)
    _ingest(collection, vectors, 0, 1200)
    assert collection.wait_for_relayout(timeout_s=30)
    collection.close()

    index = VectorIndex(device="cpu", spec=_SPEC)
    index.build = lambda batches: pytest.fail("the restart trained the index again")
    reopened = Collection(Store(tmp_path), index, FakeEmbedder(dim=_DIM, model_id=_MODEL_ID),
                          CollectionLimits(max_k=50), snapshot_path=tmp_path / FILE_NAME)
    reopened.load()

    assert (index.layout.kind, len(index)) == ("ivf", 1200)
    assert _first_item_id(reopened, vectors[600]) == "v600"
    reopened.close()


def test_changed_spec_rebuilds_at_start(tmp_path, vectors):
    collection, _ = _open(tmp_path)
    _ingest(collection, vectors, 0, 1200)
    assert collection.wait_for_relayout(timeout_s=30)
    collection.close()

    reopened, index = _open(tmp_path, spec=IndexSpec(kind="flat"))

    assert (index.layout.kind, len(index)) == ("flat", 1200)
    reopened.close()


def test_search_effort_reaches_the_index(tmp_path, vectors):
    collection, index = _open(tmp_path)
    _ingest(collection, vectors, 0, 1200)
    assert collection.wait_for_relayout(timeout_s=30)
    seen = []
    search = index.search
    index.search = lambda queries, k, effort=None, selector=None: seen.append(effort) or search(queries, k, effort)

    collection.search(VectorQuery(vectors[0].tolist()), k=3, min_score=None, timeout_s=_TIMEOUT_S,
                      effort=SearchEffort(nprobe=3, ef_search=99))

    assert seen == [3]
    collection.close()
