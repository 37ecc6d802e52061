"""Tests of the duplicate audit in index_service.audit, through the collection and on its parts."""

import numpy as np
import pytest

from imgsearch_common.errors import DeadlineExceededError, InvalidInputError
from index_service import audit
from index_service.audit import (
    AuditProgress,
    AuditSummary,
    DuplicateGroup,
    UnionFind,
    _capped,
    audit_settings,
)
from index_service.collection import Collection, CollectionLimits, IngestItem, IngestStatus
from index_service.duplicates import MatchKind, NearDuplicatePolicy, OnDuplicate, PolicyOverrides
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
_LIMITS = CollectionLimits(max_k=20, max_image_bytes=200_000, max_image_pixels=1_000_000)
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


def _add(collection, image, item_id, **fields):
    item = IngestItem(image, item_id=item_id, on_duplicate=OnDuplicate.ADD, **fields)
    [result] = collection.ingest([item], _TIMEOUT_S)
    assert result.status is IngestStatus.ADDED


def _audit(collection, kinds=(), k=0, min_similar_score=None, check=lambda: None, **overrides):
    return list(collection.find_duplicates(kinds, PolicyOverrides(**overrides), min_similar_score, k, check))


def _groups(events):
    groups = [event for event in events if isinstance(event, DuplicateGroup)]
    return [(group.kind, [member.item_id for member in group.members]) for group in groups]


def _store_synthetic_set(collection):
    """Store 6 originals, exact copies of 0 and 1, near copies of 2 and 3, and 2 unrelated scenes."""
    for seed in range(6):
        _add(collection, scene_jpeg(seed), f"original-{seed}")
    _add(collection, lossless_copy(scene_jpeg(0)), "exact-0")
    _add(collection, lossless_copy(scene_jpeg(1)), "exact-1")
    _add(collection, near_copy(scene_jpeg(2)), "near-2")
    _add(collection, near_copy(scene_jpeg(3)), "near-3")
    _add(collection, scene_jpeg(20), "unrelated-20")
    _add(collection, scene_jpeg(21), "unrelated-21")


# Through the collection


def test_default_audit_finds_exact_and_near_groups(collection):
    _store_synthetic_set(collection)

    events = _audit(collection)

    assert events[0] == AuditProgress(items_done=12, item_count=12)
    assert _groups(events) == [
        (EXACT, ["original-0", "exact-0"]),
        (EXACT, ["original-1", "exact-1"]),
        (NEAR, ["original-2", "near-2"]),
        (NEAR, ["original-3", "near-3"]),
    ]
    assert events[-1] == AuditSummary(item_count=12, group_counts={EXACT: 2, NEAR: 2}, grouped_item_count=8)


def test_members_measured_against_first(collection):
    _store_synthetic_set(collection)

    groups = [event for event in _audit(collection) if isinstance(event, DuplicateGroup)]

    exact_first, exact_copy = groups[0].members
    near_first, near_member = groups[2].members
    assert (exact_first.score, exact_first.phash_distance, exact_first.local_difference) == (
        pytest.approx(1.0),
        0,
        0.0,
    )
    assert (exact_copy.phash_distance, exact_copy.local_difference) == (0, 0.0)
    assert near_member.score == pytest.approx(
        float(thumbnail_vector(scene_jpeg(2), _DIM) @ thumbnail_vector(near_copy(scene_jpeg(2)), _DIM)), abs=1e-5
    )
    assert near_member.phash_distance <= 6
    assert 0.0 < near_member.local_difference <= 0.43
    assert (near_first.width, near_first.height) == (128, 96)
    assert (near_member.width, near_member.height) == (64, 48)


def test_near_group_includes_exact_copies(collection):
    _add(collection, scene_jpeg(1), "original")
    _add(collection, lossless_copy(scene_jpeg(1)), "exact")
    _add(collection, near_copy(scene_jpeg(1)), "near")

    events = _audit(collection)

    assert _groups(events) == [(NEAR, ["original", "exact", "near"]), (EXACT, ["original", "exact"])]
    assert events[-1].grouped_item_count == 3


def test_kinds_select_groups(collection):
    _store_synthetic_set(collection)

    exact_only = _audit(collection, kinds=[EXACT])
    near_only = _audit(collection, kinds=[NEAR])

    assert [kind for kind, _ in _groups(exact_only)] == [EXACT, EXACT]
    assert exact_only[-1].group_counts == {EXACT: 2}
    assert [kind for kind, _ in _groups(near_only)] == [NEAR, NEAR]
    assert near_only[-1].group_counts == {NEAR: 2}


def test_similar_groups_leave_out_duplicates(collection, embedder):
    base = thumbnail_vector(scene_jpeg(10), _DIM)
    embedder.vectors_by_image[scene_jpeg(10)] = base
    embedder.vectors_by_image[scene_jpeg(11)] = base
    _add(collection, scene_jpeg(10), "similar-a")
    _add(collection, scene_jpeg(11), "similar-b")
    _add(collection, scene_jpeg(1), "original")
    _add(collection, near_copy(scene_jpeg(1)), "near")

    events = _audit(collection, kinds=[SIMILAR])

    # The near pair scores above 0.99 with the thumbnail embedder, but it is near, not similar.
    assert _groups(events) == [(SIMILAR, ["similar-a", "similar-b"])]
    assert events[-1].group_counts == {SIMILAR: 1}


def test_min_similar_score_threshold(collection, embedder):
    base = thumbnail_vector(scene_jpeg(10), _DIM)
    other = np.random.default_rng(3).standard_normal(_DIM)
    other = other - (other @ base) * base
    other = other / np.linalg.norm(other)
    embedder.vectors_by_image[scene_jpeg(10)] = base
    embedder.vectors_by_image[scene_jpeg(11)] = (0.8 * base + 0.6 * other).astype(np.float32)
    _add(collection, scene_jpeg(10), "a")
    _add(collection, scene_jpeg(11), "b")

    default_threshold = _audit(collection, kinds=[SIMILAR])
    lower_threshold = _audit(collection, kinds=[SIMILAR], min_similar_score=0.79)

    assert _groups(default_threshold) == []
    assert _groups(lower_threshold) == [(SIMILAR, ["a", "b"])]
    assert lower_threshold[-2].members[1].score == pytest.approx(0.8, abs=1e-5)


def test_similar_members_without_fingerprints(collection, embedder):
    base = thumbnail_vector(scene_jpeg(10), _DIM)
    embedder.vectors_by_image[scene_jpeg(10)] = base
    embedder.vectors_by_image[scene_jpeg(11)] = base
    embedder.with_fingerprints = False
    _add(collection, scene_jpeg(10), "a")
    _add(collection, lossless_copy(scene_jpeg(10)), "exact-but-unknown")
    embedder.with_fingerprints = True
    _add(collection, scene_jpeg(11), "b")

    events = _audit(collection, kinds=[EXACT, NEAR, SIMILAR])

    assert _groups(events) == [(SIMILAR, ["a", "exact-but-unknown", "b"])]
    members = events[-2].members
    assert [(m.phash_distance, m.local_difference) for m in members] == [(None, None)] * 3


def test_near_policy_overrides(collection):
    _store_synthetic_set(collection)

    strict = _audit(collection, kinds=[NEAR], max_local_difference=0.01)

    assert _groups(strict) == []


def test_audit_of_empty_collection(collection):
    events = _audit(collection, kinds=[EXACT, NEAR, SIMILAR])

    assert events == [
        AuditProgress(items_done=0, item_count=0),
        AuditSummary(item_count=0, group_counts={EXACT: 0, NEAR: 0, SIMILAR: 0}, grouped_item_count=0),
    ]


def test_progress_after_each_batch(collection, monkeypatch):
    monkeypatch.setattr(audit, "AUDIT_BATCH_SIZE", 5)
    _store_synthetic_set(collection)

    progress = [event for event in _audit(collection) if isinstance(event, AuditProgress)]

    assert progress == [AuditProgress(5, 12), AuditProgress(10, 12), AuditProgress(12, 12)]


def test_audit_sees_items_stored_when_it_starts(collection):
    _store_synthetic_set(collection)
    events = collection.find_duplicates([], PolicyOverrides(), None, 0, lambda: None)

    _add(collection, lossless_copy(scene_jpeg(4)), "late-copy")
    finished = list(events)

    assert finished[-1].item_count == 12
    assert "late-copy" not in [item_id for _, members in _groups(finished) for item_id in members]


def test_check_stops_audit(collection):
    _store_synthetic_set(collection)
    stopped = []

    def check():
        if stopped:
            raise DeadlineExceededError("the deadline ran out")

    events = collection.find_duplicates([], PolicyOverrides(), None, 0, check)
    first = next(events)
    stopped.append(True)

    with pytest.raises(DeadlineExceededError):
        next(events)
    assert first == AuditProgress(12, 12)


@pytest.mark.parametrize(
    ("kinds", "k", "min_similar_score", "overrides", "message"),
    [
        ([UNSPECIFIED], 0, None, {}, "kinds must list"),
        ([], 21, None, {}, "k is 21, outside 0 to 20"),
        ([], 0, 1.5, {}, "min_similar_score must be a number between -1 and 1, got 1.5"),
        ([], 0, float("nan"), {}, "min_similar_score must be a number between -1 and 1"),
        ([], 0, None, {"max_phash_distance": 65}, "max_phash_distance must be between 0 and 64"),
        ([], 0, None, {"max_local_difference": -1.0}, "max_local_difference must be a number of at least 0"),
        ([], 0, None, {"min_score": 2.0}, "min_score must be a number between -1 and 1"),
    ],
    ids=["unspecified-kind", "k-above-limit", "similar-score-above", "similar-score-nan", "phash", "local", "score"],
)
def test_audit_rejects_bad_request(collection, kinds, k, min_similar_score, overrides, message):
    with pytest.raises(InvalidInputError, match=message):
        collection.find_duplicates(kinds, PolicyOverrides(**overrides), min_similar_score, k, lambda: None)


# Parts


def test_audit_settings_defaults():
    policy = NearDuplicatePolicy()

    settings = audit_settings(frozenset(), policy, None, 0, max_k=50, max_candidates=7)

    assert settings.kinds == {EXACT, NEAR}
    assert (settings.min_similar_score, settings.k, settings.max_candidates) == (0.95, 10, 7)
    assert settings.policy is policy


def test_union_find_components():
    sets = UnionFind()
    for first, second in [(5, 3), (3, 9), (20, 21), (9, 5), (40, 40)]:
        sets.union(first, second)

    assert sorted(sets.components()) == [[3, 5, 9], [20, 21]]
    assert sets.find(9) == 3
    assert sets.find(21) == 20
    assert sets.find(40) == 40


def test_union_find_long_chain():
    sets = UnionFind()
    for row_id in range(2000, 0, -1):
        sets.union(row_id, row_id + 1)

    assert sets.components() == [list(range(1, 2002))]
    assert sets.find(2001) == 1


def test_capped_keeps_nearest_per_item():
    firsts = np.array([1, 1, 1, 2, 2, 1], dtype=np.int64)
    seconds = np.array([10, 11, 12, 13, 14, 15], dtype=np.int64)
    distances = np.array([9, 3, 3, 5, 1, 20], dtype=np.int64)

    kept_firsts, kept_seconds = _capped(firsts, seconds, distances, max_per_first=2)

    assert list(zip(kept_firsts.tolist(), kept_seconds.tolist())) == [(1, 11), (1, 12), (2, 14), (2, 13)]
