"""Tests of the duplicate policy of index_service.collection: ingest modes and search labels."""

import threading

import numpy as np
import pytest

from imgsearch_common.errors import AlreadyExistsError, InvalidInputError
from index_service.collection import (
    Collection,
    CollectionLimits,
    ImageQuery,
    IngestItem,
    IngestStatus,
    ItemQuery,
    VectorQuery,
)
from index_service.duplicates import MatchKind, OnDuplicate, PolicyOverrides
from index_service.store import Store
from index_service.vector_index import VectorIndex
from tests.unit.index_service.index_fakes import (
    FakeEmbedder,
    lossless_copy,
    near_copy,
    scene_jpeg,
    thumbnail_vector,
)

_DIM = 16
_TIMEOUT_S = 10.0
_LIMITS = CollectionLimits(default_k=5, max_k=20, max_image_bytes=200_000, max_image_pixels=1_000_000)

ADDED, ALREADY_PRESENT, FAILED = IngestStatus.ADDED, IngestStatus.ALREADY_PRESENT, IngestStatus.FAILED
EXACT, NEAR, SIMILAR, UNSPECIFIED = MatchKind.EXACT, MatchKind.NEAR, MatchKind.SIMILAR, MatchKind.UNSPECIFIED


@pytest.fixture
def embedder():
    return FakeEmbedder(dim=_DIM)


@pytest.fixture
def collection(tmp_path, embedder):
    opened = Collection(Store(tmp_path), VectorIndex(device="cpu"), embedder, _LIMITS)
    opened.load()
    yield opened
    opened.close()


def _ingest(collection, *items):
    return collection.ingest(list(items), _TIMEOUT_S)


def _store_scenes(collection, seeds):
    """Store scene_jpeg(seed) as item_id scene-<seed> for each seed."""
    results = _ingest(collection, *[IngestItem(scene_jpeg(seed), item_id=f"scene-{seed}") for seed in seeds])
    assert [result.status for result in results] == [ADDED] * len(seeds)


def _search_image(collection, image, k=5, min_score=None, policy=PolicyOverrides()):
    return collection.search(ImageQuery(image), k, min_score, _TIMEOUT_S, policy)


def _unit(vector) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def _vector_with_score(query: np.ndarray, score: float, seed: int) -> np.ndarray:
    """Return a unit vector whose cosine with the unit vector query is score."""
    other = np.random.default_rng(seed).standard_normal(query.shape[0])
    orthogonal = _unit(other - (other @ query) * query)
    return _unit(score * query + np.sqrt(1 - score**2) * orthogonal)


# Ingest


def test_exact_copy_skipped_by_default(collection, embedder):
    _store_scenes(collection, [1, 2])
    embedder.calls.clear()

    [result] = _ingest(collection, IngestItem(lossless_copy(scene_jpeg(1))))

    assert result.status is ALREADY_PRESENT
    assert result.item_id == "scene-1"
    assert result.duplicate_of_item_id == "scene-1"
    assert result.duplicate_match is EXACT
    assert result.error is None
    assert embedder.calls == [1]  # the fingerprint comes from the embed call
    assert collection.stats().item_count == 2


def test_exact_copy_rejected(collection):
    _store_scenes(collection, [1])

    [result] = _ingest(collection, IngestItem(lossless_copy(scene_jpeg(1)), on_duplicate=OnDuplicate.REJECT))

    assert result.status is FAILED
    assert isinstance(result.error, AlreadyExistsError)
    assert "item_id 'scene-1'" in str(result.error)
    assert "match exact" in str(result.error)
    assert result.item_id == ""
    assert (result.duplicate_of_item_id, result.duplicate_match) == ("scene-1", EXACT)
    assert collection.stats().item_count == 1


def test_exact_copy_added(collection):
    _store_scenes(collection, [1])

    copy = IngestItem(lossless_copy(scene_jpeg(1)), item_id="copy", on_duplicate=OnDuplicate.ADD)

    [result] = _ingest(collection, copy)

    assert result.status is ADDED
    assert result.item_id == "copy"
    assert (result.duplicate_of_item_id, result.duplicate_match) == ("scene-1", EXACT)
    assert collection.stats().item_count == 2


def test_identical_bytes_stay_already_present(collection):
    _store_scenes(collection, [1])

    [result] = _ingest(collection, IngestItem(scene_jpeg(1), on_duplicate=OnDuplicate.REJECT))

    assert result.status is ALREADY_PRESENT
    assert result.item_id == "scene-1"
    assert (result.duplicate_of_item_id, result.duplicate_match) == ("", UNSPECIFIED)


def test_near_copy_counts_only_in_near_scope(collection):
    _store_scenes(collection, [1, 2])
    copy = near_copy(scene_jpeg(1))

    [exact_scope] = _ingest(collection, IngestItem(copy, item_id="n1", on_duplicate=OnDuplicate.REJECT))
    [near_scope] = _ingest(
        collection, IngestItem(near_copy(scene_jpeg(2)), on_duplicate=OnDuplicate.REJECT, duplicate_match=NEAR)
    )

    assert exact_scope.status is ADDED
    assert (exact_scope.duplicate_of_item_id, exact_scope.duplicate_match) == ("", UNSPECIFIED)
    assert near_scope.status is FAILED
    assert "item_id 'scene-2' (match near)" in str(near_scope.error)
    assert (near_scope.duplicate_of_item_id, near_scope.duplicate_match) == ("scene-2", NEAR)


def test_near_scope_skips_and_adds(collection):
    _store_scenes(collection, [1, 2])

    skipped, added = _ingest(
        collection,
        IngestItem(near_copy(scene_jpeg(1)), duplicate_match=NEAR),
        IngestItem(near_copy(scene_jpeg(2)), item_id="n2", duplicate_match=NEAR, on_duplicate=OnDuplicate.ADD),
    )

    assert (skipped.status, skipped.item_id) == (ALREADY_PRESENT, "scene-1")
    assert (skipped.duplicate_of_item_id, skipped.duplicate_match) == ("scene-1", NEAR)
    assert (added.status, added.item_id) == (ADDED, "n2")
    assert (added.duplicate_of_item_id, added.duplicate_match) == ("scene-2", NEAR)


def test_near_scope_still_prefers_exact(collection):
    _store_scenes(collection, [1])

    [result] = _ingest(collection, IngestItem(lossless_copy(scene_jpeg(1)), duplicate_match=NEAR))

    assert (result.duplicate_of_item_id, result.duplicate_match) == ("scene-1", EXACT)


def test_near_needs_min_score_at_ingest(collection, embedder):
    _store_scenes(collection, [1])
    copy = near_copy(scene_jpeg(1))
    stored_vector = thumbnail_vector(scene_jpeg(1), _DIM)
    embedder.vectors_by_image[copy] = _vector_with_score(stored_vector, 0.6, seed=1)

    [result] = _ingest(collection, IngestItem(copy, duplicate_match=NEAR, on_duplicate=OnDuplicate.REJECT))

    assert result.status is ADDED
    assert result.duplicate_of_item_id == ""


def test_unrelated_image_is_added(collection):
    _store_scenes(collection, [1, 2])

    [result] = _ingest(collection, IngestItem(scene_jpeg(3), duplicate_match=NEAR, on_duplicate=OnDuplicate.REJECT))

    assert result.status is ADDED
    assert (result.duplicate_of_item_id, result.duplicate_match) == ("", UNSPECIFIED)


def test_exact_copy_within_one_batch(collection, embedder):
    original = scene_jpeg(1)

    results = _ingest(
        collection,
        IngestItem(original, item_id="first"),
        IngestItem(lossless_copy(original, "a"), on_duplicate=OnDuplicate.SKIP),
        IngestItem(lossless_copy(original, "b"), on_duplicate=OnDuplicate.REJECT),
        IngestItem(lossless_copy(original, "c"), item_id="third", on_duplicate=OnDuplicate.ADD),
    )

    assert [result.status for result in results] == [ADDED, ALREADY_PRESENT, FAILED, ADDED]
    assert results[1].item_id == "first"
    assert "item_id 'first'" in str(results[2].error)
    assert [result.duplicate_of_item_id for result in results] == ["", "first", "first", "first"]
    assert [result.duplicate_match for result in results] == [UNSPECIFIED, EXACT, EXACT, EXACT]
    assert embedder.calls == [4]
    assert collection.stats().item_count == 2


def test_near_copy_within_one_batch(collection):
    original = scene_jpeg(1)

    results = _ingest(
        collection,
        IngestItem(original, item_id="first"),
        IngestItem(near_copy(original), on_duplicate=OnDuplicate.SKIP),
        IngestItem(near_copy(original), item_id="exact-scope"),
        IngestItem(near_copy(scene_jpeg(2)), item_id="other", duplicate_match=NEAR),
    )

    assert [result.status for result in results] == [ADDED, ADDED, ALREADY_PRESENT, ADDED]
    # The second and third requests carry the same bytes; the third follows the second.
    assert results[1].item_id == results[2].item_id
    assert [result.duplicate_of_item_id for result in results] == ["", "", "", ""]


def test_near_scope_within_one_batch(collection):
    original = scene_jpeg(1)

    first, copy = _ingest(
        collection,
        IngestItem(original, item_id="first"),
        IngestItem(near_copy(original), duplicate_match=NEAR, on_duplicate=OnDuplicate.REJECT),
    )

    assert first.status is ADDED
    assert copy.status is FAILED
    assert (copy.duplicate_of_item_id, copy.duplicate_match) == ("first", NEAR)
    assert collection.stats().item_count == 1


def test_same_bytes_follow_skipped_duplicate(collection):
    _store_scenes(collection, [1])
    copy = lossless_copy(scene_jpeg(1))

    results = _ingest(collection, IngestItem(copy), IngestItem(copy))

    assert [result.status for result in results] == [ALREADY_PRESENT, ALREADY_PRESENT]
    outcomes = [(r.item_id, r.duplicate_of_item_id, r.duplicate_match) for r in results]
    assert outcomes == [("scene-1", "scene-1", EXACT)] * 2


def test_later_copy_names_earliest_stored(collection):
    _store_scenes(collection, [1])
    _ingest(collection, IngestItem(lossless_copy(scene_jpeg(1), "a"), item_id="copy-a", on_duplicate=OnDuplicate.ADD))

    [result] = _ingest(collection, IngestItem(lossless_copy(scene_jpeg(1), "b")))

    assert (result.status, result.item_id, result.duplicate_of_item_id) == (ALREADY_PRESENT, "scene-1", "scene-1")


def test_embed_service_without_fingerprints(collection, embedder):
    embedder.with_fingerprints = False
    _store_scenes(collection, [1])

    [result] = _ingest(collection, IngestItem(lossless_copy(scene_jpeg(1)), on_duplicate=OnDuplicate.REJECT))

    assert result.status is ADDED
    assert result.duplicate_of_item_id == ""
    assert collection.stats().item_count == 2


def test_stored_item_without_fingerprint_is_no_duplicate(collection, embedder):
    embedder.with_fingerprints = False
    _store_scenes(collection, [1])
    embedder.with_fingerprints = True

    [result] = _ingest(collection, IngestItem(lossless_copy(scene_jpeg(1)), duplicate_match=NEAR))

    assert result.status is ADDED
    assert result.duplicate_of_item_id == ""


@pytest.mark.parametrize("duplicate_match", [SIMILAR, UNSPECIFIED])
def test_ingest_rejects_bad_duplicate_match(collection, duplicate_match):
    results = _ingest(collection, IngestItem(scene_jpeg(1), duplicate_match=duplicate_match), IngestItem(scene_jpeg(2)))

    assert [result.status for result in results] == [FAILED, ADDED]
    assert isinstance(results[0].error, InvalidInputError)
    assert f"duplicate_match must be EXACT or NEAR, got {duplicate_match.name}" in str(results[0].error)


def test_concurrent_copies_store_picture_once(collection, embedder):
    # Both batches are embedded before either is committed, so only the commit lock can tell.
    embedder.barrier = threading.Barrier(2)
    copies = [lossless_copy(scene_jpeg(1), label) for label in ("a", "b")]
    results = []

    def ingest(image):
        results.extend(_ingest(collection, IngestItem(image)))

    threads = [threading.Thread(target=ingest, args=(image,)) for image in copies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert sorted(result.status.value for result in results) == ["added", "already_present"]
    added = next(result for result in results if result.status is ADDED)
    skipped = next(result for result in results if result.status is ALREADY_PRESENT)
    assert (skipped.item_id, skipped.duplicate_of_item_id) == (added.item_id, added.item_id)
    assert skipped.duplicate_match is EXACT
    assert collection.stats().item_count == 1


# Search


def test_search_labels_exact_near_similar(collection):
    _store_scenes(collection, [1, 2, 3])

    exact = _search_image(collection, lossless_copy(scene_jpeg(1)))
    near = _search_image(collection, near_copy(scene_jpeg(1)))

    assert [n.item_id for n in exact][:1] == ["scene-1"]
    assert [n.match for n in exact] == [EXACT, SIMILAR, SIMILAR]
    assert (exact[0].phash_distance, exact[0].local_difference) == (0, 0.0)
    assert near[0].item_id == "scene-1"
    assert near[0].match is NEAR
    assert near[0].phash_distance <= 6
    assert 0.0 < near[0].local_difference <= 0.43
    assert [n.match for n in near[1:]] == [SIMILAR, SIMILAR]
    assert all(n.phash_distance > 0 for n in near[1:])


def test_similar_local_difference_only_after_phash_test(collection):
    _store_scenes(collection, [1, 2, 3])

    neighbours = _search_image(collection, scene_jpeg(4), policy=PolicyOverrides(max_phash_distance=0))

    assert [n.match for n in neighbours] == [SIMILAR] * 3
    assert all(n.phash_distance > 0 and n.local_difference is None for n in neighbours)


def test_search_orders_exact_near_then_by_score(collection, embedder):
    query = near_copy(scene_jpeg(1))
    query_vector = thumbnail_vector(query, _DIM)
    exact_copy = lossless_copy(query)
    embedder.vectors_by_image[query] = query_vector
    embedder.vectors_by_image[exact_copy] = _vector_with_score(query_vector, 0.72, seed=1)
    embedder.vectors_by_image[scene_jpeg(1)] = _vector_with_score(query_vector, 0.8, seed=2)
    for seed, score in ((2, 0.95), (3, 0.85), (4, 0.9)):
        embedder.vectors_by_image[scene_jpeg(seed)] = _vector_with_score(query_vector, score, seed=seed + 10)
    _store_scenes(collection, [1, 2, 3, 4])
    _ingest(collection, IngestItem(exact_copy, item_id="exact-copy", on_duplicate=OnDuplicate.ADD))

    neighbours = _search_image(collection, query, k=5)

    assert [n.item_id for n in neighbours] == ["exact-copy", "scene-1", "scene-2", "scene-4", "scene-3"]
    assert [n.match for n in neighbours] == [EXACT, NEAR, SIMILAR, SIMILAR, SIMILAR]
    assert [n.score for n in neighbours] == pytest.approx([0.72, 0.8, 0.95, 0.9, 0.85], abs=1e-5)


def test_search_finds_duplicates_beyond_top_k(collection, embedder):
    query = near_copy(scene_jpeg(1))
    query_vector = thumbnail_vector(query, _DIM)
    embedder.vectors_by_image[query] = query_vector
    embedder.vectors_by_image[scene_jpeg(1)] = _vector_with_score(query_vector, 0.71, seed=1)
    for seed in range(2, 8):
        embedder.vectors_by_image[scene_jpeg(seed)] = _vector_with_score(query_vector, 0.9 + seed / 100, seed=seed)
    _store_scenes(collection, range(1, 8))

    neighbours = _search_image(collection, query, k=2)

    assert [(n.item_id, n.match) for n in neighbours] == [("scene-1", NEAR), ("scene-7", SIMILAR)]


def test_score_test_off_finds_low_scored_copy(collection, embedder):
    query = near_copy(scene_jpeg(1))
    query_vector = thumbnail_vector(query, _DIM)
    embedder.vectors_by_image[query] = query_vector
    embedder.vectors_by_image[scene_jpeg(1)] = _vector_with_score(query_vector, -0.5, seed=1)
    _store_scenes(collection, [1, 2, 3])

    default_policy = _search_image(collection, query, k=1)
    score_off = _search_image(collection, query, k=1, policy=PolicyOverrides(min_score=-1.0))

    assert default_policy[0].item_id != "scene-1"
    assert [(n.item_id, n.match) for n in score_off] == [("scene-1", NEAR)]
    assert score_off[0].score == pytest.approx(-0.5, abs=1e-5)


def test_min_score_keeps_exact_and_near(collection, embedder):
    query = near_copy(scene_jpeg(1))
    query_vector = thumbnail_vector(query, _DIM)
    exact_copy = lossless_copy(query)
    embedder.vectors_by_image[query] = query_vector
    embedder.vectors_by_image[exact_copy] = _vector_with_score(query_vector, 0.1, seed=1)
    embedder.vectors_by_image[scene_jpeg(1)] = _vector_with_score(query_vector, 0.75, seed=2)
    embedder.vectors_by_image[scene_jpeg(2)] = _vector_with_score(query_vector, 0.95, seed=3)
    embedder.vectors_by_image[scene_jpeg(3)] = _vector_with_score(query_vector, 0.5, seed=4)
    _store_scenes(collection, [1, 2, 3])
    _ingest(collection, IngestItem(exact_copy, item_id="exact-copy", on_duplicate=OnDuplicate.ADD))

    neighbours = collection.search(ImageQuery(query), 5, 0.9, _TIMEOUT_S)

    expected = [("exact-copy", EXACT), ("scene-1", NEAR), ("scene-2", SIMILAR)]
    assert [(n.item_id, n.match) for n in neighbours] == expected


def test_search_returns_at_most_k_exact(collection):
    original = scene_jpeg(1)
    _store_scenes(collection, [1])
    copies = [IngestItem(lossless_copy(original, str(n)), on_duplicate=OnDuplicate.ADD) for n in range(4)]
    _ingest(collection, *copies)

    neighbours = _search_image(collection, original, k=3)

    assert [n.match for n in neighbours] == [EXACT] * 3


def test_vector_query_is_unspecified(collection):
    _store_scenes(collection, [1, 2])
    vector = thumbnail_vector(scene_jpeg(1), _DIM)

    neighbours = collection.search(VectorQuery(vector.tolist()), 2, None, _TIMEOUT_S)

    assert [n.match for n in neighbours] == [UNSPECIFIED, UNSPECIFIED]
    assert [(n.phash_distance, n.local_difference) for n in neighbours] == [(None, None)] * 2


def test_item_query_uses_stored_fingerprint(collection, embedder):
    _store_scenes(collection, [1, 2])
    _ingest(collection, IngestItem(near_copy(scene_jpeg(1)), item_id="copy"))
    embedder.calls.clear()

    neighbours = collection.search(ItemQuery("scene-1"), 3, None, _TIMEOUT_S)

    assert [(n.item_id, n.match) for n in neighbours] == [("scene-1", EXACT), ("copy", NEAR), ("scene-2", SIMILAR)]
    assert embedder.calls == []


def test_item_without_fingerprint_is_unspecified(collection, embedder):
    embedder.with_fingerprints = False
    _store_scenes(collection, [1])
    embedder.with_fingerprints = True
    _store_scenes(collection, [2])

    neighbours = _search_image(collection, scene_jpeg(1))
    by_item_id = collection.search(ItemQuery("scene-1"), 2, None, _TIMEOUT_S)

    assert {n.item_id: n.match for n in neighbours} == {"scene-1": UNSPECIFIED, "scene-2": SIMILAR}
    assert {n.item_id: n.match for n in by_item_id} == {"scene-1": UNSPECIFIED, "scene-2": UNSPECIFIED}


def test_search_policy_overrides(collection):
    _store_scenes(collection, [1, 2])

    neighbours = _search_image(collection, near_copy(scene_jpeg(1)), policy=PolicyOverrides(max_local_difference=0.01))

    assert neighbours[0].item_id == "scene-1"
    assert neighbours[0].match is SIMILAR
    assert neighbours[0].local_difference > 0.01


def test_search_rejects_bad_policy_before_embedding(collection, embedder):
    _store_scenes(collection, [1])
    embedder.calls.clear()

    with pytest.raises(InvalidInputError, match="max_phash_distance must be between 0 and 64, got 65"):
        _search_image(collection, scene_jpeg(1), policy=PolicyOverrides(max_phash_distance=65))
    assert embedder.calls == []


def test_near_candidates_capped_nearest_first(tmp_path, embedder):
    query = near_copy(scene_jpeg(1))
    query_vector = thumbnail_vector(query, _DIM)
    twin = lossless_copy(scene_jpeg(1))
    embedder.vectors_by_image[query] = query_vector
    embedder.vectors_by_image[scene_jpeg(1)] = _vector_with_score(query_vector, 0.75, seed=1)
    embedder.vectors_by_image[twin] = _vector_with_score(query_vector, 0.76, seed=2)
    for seed in (2, 3, 4):
        embedder.vectors_by_image[scene_jpeg(seed)] = _vector_with_score(query_vector, 0.95, seed=seed + 10)
    limits = CollectionLimits(max_k=20, max_image_bytes=200_000, max_image_pixels=1_000_000, near_max_candidates=1)
    capped = Collection(Store(tmp_path), VectorIndex(device="cpu"), embedder, limits)
    capped.load()
    try:
        _store_scenes(capped, [1, 2, 3, 4])
        _ingest(capped, IngestItem(twin, item_id="twin", on_duplicate=OnDuplicate.ADD))

        neighbours = _search_image(capped, query, k=2)
    finally:
        capped.close()

    # scene-1 and twin are equally near by pHash, so the one stored first is the one measured.
    assert [(n.item_id, n.match) for n in neighbours][:1] == [("scene-1", NEAR)]
    assert neighbours[1].match is SIMILAR


def test_near_candidates_uncapped_by_score(collection, embedder):
    query = near_copy(scene_jpeg(1))
    query_vector = thumbnail_vector(query, _DIM)
    twin = lossless_copy(scene_jpeg(1))
    embedder.vectors_by_image[query] = query_vector
    embedder.vectors_by_image[scene_jpeg(1)] = _vector_with_score(query_vector, 0.75, seed=1)
    embedder.vectors_by_image[twin] = _vector_with_score(query_vector, 0.76, seed=2)
    for seed in (2, 3, 4):
        embedder.vectors_by_image[scene_jpeg(seed)] = _vector_with_score(query_vector, 0.95, seed=seed + 10)
    _store_scenes(collection, [1, 2, 3, 4])
    _ingest(collection, IngestItem(twin, item_id="twin", on_duplicate=OnDuplicate.ADD))

    neighbours = _search_image(collection, query, k=2)

    assert [(n.item_id, n.match) for n in neighbours] == [("twin", NEAR), ("scene-1", NEAR)]
