"""Tests of the duplicate policy in index_service.duplicates, on fingerprints of synthetic pictures."""

import dataclasses
import math

import pytest

from imgsearch_common.errors import InvalidInputError
from imgsearch_common.fingerprints import FINGERPRINT_VERSION, local_difference
from index_service.duplicates import (
    Match,
    MatchKind,
    NearDuplicatePolicy,
    PolicyOverrides,
    classify,
    comparable,
    measurable,
    validate_score,
)
from tests.unit.index_service.index_fakes import fingerprint_of, lossless_copy, near_copy, scene_jpeg

_POLICY = NearDuplicatePolicy()


@pytest.fixture(scope="module")
def original():
    return fingerprint_of(scene_jpeg(1))


def test_defaults_are_documented_values():
    assert _POLICY == NearDuplicatePolicy(max_phash_distance=24, max_local_difference=0.43, min_score=0.70)


def test_lossless_copy_is_exact(original):
    copy = fingerprint_of(lossless_copy(scene_jpeg(1)))

    match = classify(original, copy, score=0.2, policy=_POLICY)

    assert match == Match(MatchKind.EXACT, phash_distance=0, local_difference=0.0)


def test_exact_ignores_score_and_thresholds(original):
    strict = NearDuplicatePolicy(max_phash_distance=0, max_local_difference=0.0, min_score=1.0)

    assert classify(original, original, score=-1.0, policy=strict).kind is MatchKind.EXACT


def test_resized_copy_is_near(original):
    copy = fingerprint_of(near_copy(scene_jpeg(1)))

    match = classify(original, copy, score=0.9, policy=_POLICY)

    assert match.kind is MatchKind.NEAR
    assert match.phash_distance <= 6
    assert 0 < match.local_difference <= 0.43
    assert match.local_difference == pytest.approx(local_difference(original.layout, copy.layout))


def test_near_needs_min_score(original):
    copy = fingerprint_of(near_copy(scene_jpeg(1)))

    match = classify(original, copy, score=0.69, policy=_POLICY)

    assert match.kind is MatchKind.SIMILAR
    assert match.local_difference is not None


def test_score_test_off_at_minus_one(original):
    copy = fingerprint_of(near_copy(scene_jpeg(1)))
    policy = _POLICY.with_overrides(PolicyOverrides(min_score=-1.0))

    assert classify(original, copy, score=-1.0, policy=policy).kind is MatchKind.NEAR


def test_near_needs_small_local_difference(original):
    copy = fingerprint_of(near_copy(scene_jpeg(1)))
    measured = local_difference(original.layout, copy.layout)
    policy = _POLICY.with_overrides(PolicyOverrides(max_local_difference=measured * 0.9))

    match = classify(original, copy, score=0.9, policy=policy)

    assert match.kind is MatchKind.SIMILAR
    assert match.local_difference == pytest.approx(measured)


def test_phash_test_skips_local_difference(original):
    flipped = dataclasses.replace(original, pixel_sha256="0" * 64, phash=original.phash ^ 0b111)
    policy = _POLICY.with_overrides(PolicyOverrides(max_phash_distance=2))

    match = classify(original, flipped, score=0.9, policy=policy)

    assert match == Match(MatchKind.SIMILAR, phash_distance=3, local_difference=None)


def test_phash_at_limit_passes(original):
    flipped = dataclasses.replace(original, pixel_sha256="0" * 64, phash=original.phash ^ 0b111)
    policy = _POLICY.with_overrides(PolicyOverrides(max_phash_distance=3))

    assert classify(original, flipped, score=0.9, policy=policy) == Match(MatchKind.NEAR, 3, 0.0)


def test_different_picture_is_similar(original):
    other = fingerprint_of(scene_jpeg(2))

    match = classify(original, other, score=0.99, policy=_POLICY)

    assert match.kind is MatchKind.SIMILAR
    assert match.phash_distance > 0


def test_missing_fingerprint_is_unspecified(original):
    assert classify(None, original, score=1.0, policy=_POLICY) == Match(MatchKind.UNSPECIFIED)
    assert classify(original, None, score=1.0, policy=_POLICY) == Match(MatchKind.UNSPECIFIED)


def test_other_version_is_unspecified(original):
    newer = dataclasses.replace(original, version=FINGERPRINT_VERSION + 1)

    assert classify(newer, newer, score=1.0, policy=_POLICY).kind is MatchKind.UNSPECIFIED
    assert not measurable(newer)
    assert not comparable(original, newer)
    assert comparable(original, original)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (PolicyOverrides(max_phash_distance=65), "max_phash_distance must be between 0 and 64, got 65"),
        (PolicyOverrides(max_phash_distance=-1), "max_phash_distance must be between 0 and 64, got -1"),
        (PolicyOverrides(max_local_difference=-0.1), "max_local_difference must be a number of at least 0"),
        (PolicyOverrides(max_local_difference=math.nan), "max_local_difference must be a number of at least 0"),
        (PolicyOverrides(min_score=1.5), "min_score must be a number between -1 and 1, got 1.5"),
        (PolicyOverrides(min_score=-1.01), "min_score must be a number between -1 and 1"),
        (PolicyOverrides(min_score=math.nan), "min_score must be a number between -1 and 1, got nan"),
    ],
    ids=["phash-above", "phash-below", "local-negative", "local-nan", "score-above", "score-below", "score-nan"],
)
def test_overrides_rejected(overrides, message):
    with pytest.raises(InvalidInputError, match=message):
        _POLICY.with_overrides(overrides)


def test_overrides_at_limits_accepted():
    policy = _POLICY.with_overrides(PolicyOverrides(max_phash_distance=64, max_local_difference=0.0, min_score=-1.0))

    assert policy == NearDuplicatePolicy(max_phash_distance=64, max_local_difference=0.0, min_score=-1.0)


def test_unset_overrides_keep_defaults():
    policy = NearDuplicatePolicy(max_phash_distance=10, max_local_difference=0.2, min_score=0.5)

    assert policy.with_overrides(PolicyOverrides(min_score=0.8)) == dataclasses.replace(policy, min_score=0.8)
    assert policy.with_overrides(PolicyOverrides()) == policy


def test_validate_score_names_field():
    with pytest.raises(InvalidInputError, match="min_similar_score must be a number between -1 and 1, got 2"):
        validate_score("min_similar_score", 2)
