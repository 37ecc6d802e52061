"""Tests of index_service.index_layout: the layout that each collection size gets, and building it."""

import faiss
import numpy as np
import pytest

from index_service.index_layout import MIN_TRAINING_ITEMS, IndexSpec, Layout, new_index, search_parameters
from tests.unit.index_service.clustered import clustered_vectors


def test_auto_is_flat_until_ivf_min_items():
    spec = IndexSpec(kind="auto", ivf_min_items=10_000)

    assert spec.layout_for(9_999) == Layout("flat", "float32")
    assert spec.layout_for(10_000).kind == "ivf"


def test_nlist_grows_with_square_root():
    spec = IndexSpec(kind="ivf", train_items=1_000_000)

    assert spec.layout_for(10_000).nlist == 256  # limited to 39 training vectors per list
    assert spec.layout_for(1_000_000).nlist == 4000
    assert IndexSpec(kind="ivf", nlist=64).layout_for(1_000_000).nlist == 64


def test_training_size_is_capped_and_limits_nlist():
    layout = IndexSpec(kind="ivf", train_items=39_000).layout_for(1_000_000)

    assert layout.trained_items == 39_000
    assert layout.nlist == 1000


def test_forced_kinds_wait_for_training_vectors():
    assert IndexSpec(kind="ivf").layout_for(MIN_TRAINING_ITEMS - 1) == Layout("flat", "float32")
    assert IndexSpec(kind="flat", encoding="sq8").layout_for(MIN_TRAINING_ITEMS - 1).encoding == "float32"
    assert IndexSpec(kind="flat", encoding="sq8").layout_for(MIN_TRAINING_ITEMS).encoding == "sq8"
    assert IndexSpec(kind="flat", encoding="fp16").layout_for(1).encoding == "fp16"


def test_hnsw_needs_no_training_in_float32():
    assert IndexSpec(kind="hnsw", hnsw_m=16).layout_for(5) == Layout("hnsw", "float32", 0, 16, 0)


@pytest.mark.parametrize(
    ("current", "count", "wanted"),
    [
        (Layout("flat", "float32"), 99_999, False),
        (Layout("flat", "float32"), 100_000, True),
        (Layout("ivf", "float32", 1265, 0, 50_000), 150_000, False),
        (Layout("ivf", "float32", 400, 0, 20_000), 100_000, True),
        (Layout("flat", "sq8", 0, 0, 1_000), 3_999, False),
        (Layout("flat", "sq8", 0, 0, 1_000), 4_000, True),
    ],
    ids=["flat-small", "flat-grown", "ivf-fits", "ivf-lists-doubled", "sq8-fits", "sq8-training-4x"],
)
def test_wants_rebuild(current, count, wanted):
    spec = IndexSpec(kind="auto" if current.encoding == "float32" else "flat", encoding=current.encoding)

    assert spec.wants_rebuild(current, count) is wanted


def test_bad_spec_names_the_setting():
    with pytest.raises(ValueError, match="index kind must be one of"):
        IndexSpec(kind="lsh")
    with pytest.raises(ValueError, match="nprobe must be at least 1"):
        IndexSpec(nprobe=0)


def test_layout_round_trips_through_a_dict():
    layout = Layout("ivf", "sq8", 128, 0, 5000)

    assert Layout.from_dict(layout.to_dict()) == layout
    with pytest.raises(ValueError, match="an index layout has fields"):
        Layout.from_dict({"kind": "ivf"})


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
@pytest.mark.parametrize("encoding", ["float32", "fp16", "sq8"])
def test_every_layout_finds_each_vector_itself(kind, encoding):
    vectors = clustered_vectors(2000, 32, clusters=20, seed=1)
    spec = IndexSpec(kind=kind, encoding=encoding)
    layout = spec.layout_for(len(vectors))
    index = new_index(layout, 32, vectors)
    row_ids = np.arange(1000, 3000, dtype=np.int64)
    index.add_with_ids(vectors, row_ids)

    params = search_parameters(layout, spec.default_effort(layout), k=5)
    _, found = index.search(vectors[:20], 5, params=params)

    assert (layout.kind, layout.encoding) == (kind, encoding)
    assert found[:, 0].tolist() == row_ids[:20].tolist()


def test_training_needs_enough_vectors():
    layout = IndexSpec(kind="ivf").layout_for(5000)

    with pytest.raises(ValueError, match="needs 5000 training vectors, got 10"):
        new_index(layout, 8, np.ones((10, 8), dtype=np.float32))


def test_search_parameters_clamp_the_effort():
    ivf = search_parameters(Layout("ivf", "float32", 64, 0, 5000), effort=1000, k=10)
    hnsw = search_parameters(Layout("hnsw", "float32", 0, 32, 0), effort=4, k=10)

    assert ivf.nprobe == 64
    assert hnsw.efSearch == 10
    assert search_parameters(Layout(), effort=0, k=10) is None
    selector = faiss.IDSelectorRange(0, 10)
    assert search_parameters(Layout(), effort=0, k=10, selector=selector).sel is not None
