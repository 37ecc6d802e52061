"""Tests of filtered searches and audits: which items pass a filter, and that faiss searches only those."""

import numpy as np
import pytest

from imgsearch_common.errors import InvalidInputError
from index_service.audit import AuditSummary, DuplicateGroup
from index_service.collection import (
    Collection,
    CollectionLimits,
    ImageQuery,
    IngestItem,
    IngestStatus,
    VectorQuery,
)
from index_service.duplicates import MatchKind, OnDuplicate, PolicyOverrides
from index_service.filters import ItemFilter, MetadataCondition
from index_service.store import Store
from index_service.vector_index import VectorIndex
from tests.unit.index_service.clustered import clustered_vectors
from tests.unit.index_service.index_fakes import FakeEmbedder, lossless_copy, scene_jpeg

_DIM = 16
_MODEL_ID = "fake-clip"
_TIMEOUT_S = 10.0


@pytest.fixture
def collection(tmp_path):
    opened = Collection(Store(tmp_path), VectorIndex(device="cpu"), FakeEmbedder(dim=_DIM, model_id=_MODEL_ID),
                        CollectionLimits(max_k=50))
    opened.load()
    yield opened
    opened.close()


@pytest.fixture
def vectors():
    return clustered_vectors(200, _DIM, clusters=4, seed=8)


def _tags(n: int) -> dict[str, str]:
    metadata = {"colour": ["red", "green", "blue", "grey"][n % 4]}
    if n % 10 == 0:
        metadata["starred"] = "yes"
    return metadata


def _fill(collection, vectors):
    items = [IngestItem(embedding=v.tolist(), model_id=_MODEL_ID, item_id=f"v{n}", metadata=_tags(n),
                        uri=f"photos/{2023 + n % 2}/v{n}.jpg") for n, v in enumerate(vectors)]
    results = collection.ingest(items, _TIMEOUT_S)
    assert {result.status for result in results} == {IngestStatus.ADDED}


def _search(collection, vector, item_filter, k=10):
    neighbours = collection.search(VectorQuery(vector.tolist()), k=k, min_score=None, timeout_s=_TIMEOUT_S,
                                   item_filter=item_filter)
    return [int(neighbour.item_id[1:]) for neighbour in neighbours]


def _matching(store_filter: ItemFilter, count: int = 200) -> list[int]:
    def passes(n):
        tags = _tags(n)
        for condition in store_filter.metadata:
            if condition.key not in tags or (condition.any_of and tags[condition.key] not in condition.any_of):
                return False
        uri = f"photos/{2023 + n % 2}/v{n}.jpg"
        return not store_filter.uri_prefixes or any(uri.startswith(p) for p in store_filter.uri_prefixes)

    return [n for n in range(count) if passes(n)]


@pytest.mark.parametrize(
    "item_filter",
    [
        ItemFilter(metadata=(MetadataCondition("colour", ("red",)),)),
        ItemFilter(metadata=(MetadataCondition("colour", ("red", "blue")),)),
        ItemFilter(metadata=(MetadataCondition("starred"),)),
        ItemFilter(uri_prefixes=("photos/2024/",)),
        ItemFilter(metadata=(MetadataCondition("colour", ("green",)),), uri_prefixes=("photos/2024/", "none/")),
        ItemFilter(metadata=(MetadataCondition("colour", ("red",)), MetadataCondition("starred"))),
    ],
    ids=["one-value", "any-of", "key-present", "uri-prefix", "metadata-and-prefix", "two-conditions"],
)
def test_store_finds_the_items_that_pass(collection, vectors, item_filter):
    _fill(collection, vectors)

    row_ids = collection._store.row_ids_matching(item_filter)  # noqa: SLF001 - the store of this collection

    assert (row_ids - 1).tolist() == _matching(item_filter)


def test_keys_and_prefixes_are_matched_literally(collection):
    items = [IngestItem(embedding=np.ones(_DIM).tolist(), model_id=_MODEL_ID, item_id="odd",
                        metadata={'a."b': "x%_"}, uri="100%_done/a.jpg")]
    collection.ingest(items, _TIMEOUT_S)
    store = collection._store  # noqa: SLF001 - the store of this collection

    assert store.row_ids_matching(ItemFilter(metadata=(MetadataCondition('a."b', ("x%_",)),))).tolist() == [1]
    assert store.row_ids_matching(ItemFilter(metadata=(MetadataCondition("a"),))).tolist() == []
    assert store.row_ids_matching(ItemFilter(uri_prefixes=("100%_",))).tolist() == [1]
    assert store.row_ids_matching(ItemFilter(uri_prefixes=("100%x",))).tolist() == []


def test_search_returns_k_items_that_pass(collection, vectors):
    _fill(collection, vectors)
    starred = ItemFilter(metadata=(MetadataCondition("starred"),))

    found = _search(collection, vectors[1], starred, k=10)

    assert all(n % 10 == 0 for n in found)
    assert len(found) == 10


def test_filtered_search_matches_exact_search(collection, vectors):
    _fill(collection, vectors)
    blue = ItemFilter(metadata=(MetadataCondition("colour", ("blue",)),))
    passing = np.array(_matching(blue))

    found = _search(collection, vectors[3], blue, k=5)

    scores = vectors[passing] @ vectors[3]
    assert found == passing[np.argsort(-scores)[:5]].tolist()


def test_filter_that_nothing_passes_finds_nothing(collection, vectors):
    _fill(collection, vectors)

    assert _search(collection, vectors[0], ItemFilter(uri_prefixes=("elsewhere/",))) == []


@pytest.mark.parametrize(
    ("item_filter", "message"),
    [
        (ItemFilter(metadata=(MetadataCondition(""),)), r"filter.metadata\[0\].key is empty"),
        (ItemFilter(uri_prefixes=("a/", "")), r"filter.uri_prefixes\[1\] is empty"),
        (ItemFilter(uri_prefixes=tuple(f"p{n}/" for n in range(65))), "above the limit of 64"),
    ],
    ids=["empty-key", "empty-prefix", "too-many"],
)
def test_bad_filter_is_rejected(collection, vectors, item_filter, message):
    _fill(collection, vectors)

    with pytest.raises(InvalidInputError, match=message):
        _search(collection, vectors[0], item_filter)


def test_exact_duplicate_outside_the_filter_is_left_out(collection):
    original = scene_jpeg(1)
    for item_id, image, folder in (("kept", scene_jpeg(2), "a/"), ("copy", lossless_copy(original), "b/")):
        item = IngestItem(image, item_id=item_id, uri=f"{folder}{item_id}.jpg", on_duplicate=OnDuplicate.ADD)
        collection.ingest([item], _TIMEOUT_S)

    unfiltered = collection.search(ImageQuery(original), k=5, min_score=None, timeout_s=_TIMEOUT_S)
    filtered = collection.search(ImageQuery(original), k=5, min_score=None, timeout_s=_TIMEOUT_S,
                                 item_filter=ItemFilter(uri_prefixes=("a/",)))

    assert unfiltered[0].item_id == "copy"
    assert [n.item_id for n in filtered] == ["kept"]


def test_audit_groups_only_items_that_pass(collection):
    for seed in range(3):
        copy_folder = "a/" if seed else "b/"
        copies = ((scene_jpeg(seed), f"a/{seed}.jpg"), (lossless_copy(scene_jpeg(seed)), f"{copy_folder}{seed}-copy.jpg"))
        for image, uri in copies:
            item = IngestItem(image, item_id=uri, uri=uri, on_duplicate=OnDuplicate.ADD)
            [result] = collection.ingest([item], _TIMEOUT_S)
            assert result.status is IngestStatus.ADDED

    events = list(collection.find_duplicates((), PolicyOverrides(), None, 0, lambda: None,
                                             item_filter=ItemFilter(uri_prefixes=("a/",))))

    groups = [event for event in events if isinstance(event, DuplicateGroup)]
    assert [group.kind for group in groups] == [MatchKind.EXACT, MatchKind.EXACT]
    assert all(member.uri.startswith("a/") for group in groups for member in group.members)
    assert events[-1] == AuditSummary(item_count=5, group_counts={MatchKind.EXACT: 2, MatchKind.NEAR: 0},
                                      grouped_item_count=4)
