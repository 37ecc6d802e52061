"""The duplicate policy: how a pair of items is labelled exact, near or similar from their fingerprints and score.

Two items are exact duplicates when their fingerprints have equal pixel_sha256: the same picture,
whatever the file bytes. They are near duplicates when all three signals agree: the pHash Hamming
distance is at most max_phash_distance, the local difference of the layouts is at most
max_local_difference, and the cosine score of the embeddings is at least min_score. Any other pair
with both fingerprints known is similar, and only the score measures how alike the two are.

A pair gets no label (UNSPECIFIED) when either fingerprint is missing (a vector query, or an item
stored by an embed service that sent none) or when the two have another version than
FINGERPRINT_VERSION, because fingerprints of other versions are never compared. A score of 1.0
never makes a pair exact.

The local difference costs about 3.5 ms per pair (measured on a 2-core x86 VM), so it is measured
only for pairs that pass the pHash test. The defaults come from COCO128 variants: JPEG quality
95/50/20, resizing to 50% and 25% and brightness +-15% stay within a local difference of 0.27 and a
pHash distance of 6; 2% and 5% border crops within 0.40 and 20; a visible object moved or
recoloured is at least 0.47; and different COCO128 photos are at least 1.31 apart. docs/duplicates.md
describes the policy for users.
"""

import dataclasses
import enum
import math

from imgsearch_common.errors import InvalidInputError
from imgsearch_common.fingerprints import FINGERPRINT_VERSION, Fingerprint, local_difference, phash_distance

MAX_PHASH_DISTANCE = 64


class MatchKind(enum.Enum):
    """Kind of match between a stored item and a query image or another item."""

    UNSPECIFIED = "unspecified"
    EXACT = "exact"
    NEAR = "near"
    SIMILAR = "similar"


class OnDuplicate(enum.Enum):
    """Action of an ingest on an image that duplicates a stored item or an earlier item of its batch."""

    ADD = "add"
    SKIP = "skip"
    REJECT = "reject"


# Search results and duplicate choices list exact matches first, then near, then the rest.
MATCH_RANK = {MatchKind.EXACT: 0, MatchKind.NEAR: 1, MatchKind.SIMILAR: 2, MatchKind.UNSPECIFIED: 2}


@dataclasses.dataclass(frozen=True)
class PolicyOverrides:
    """Thresholds that a request sets in place of the server's defaults. None keeps the default."""

    max_phash_distance: int | None = None
    max_local_difference: float | None = None
    min_score: float | None = None


@dataclasses.dataclass(frozen=True)
class NearDuplicatePolicy:
    """The thresholds that make a pair of items near duplicates. All three must hold."""

    max_phash_distance: int = 24
    max_local_difference: float = 0.43
    min_score: float = 0.70

    def with_overrides(self, overrides: PolicyOverrides) -> "NearDuplicatePolicy":
        """Return this policy with the thresholds that overrides sets, after validating them.

        Raises InvalidInputError naming the threshold when one is out of range or NaN.
        """
        replacements = {
            field.name: getattr(overrides, field.name)
            for field in dataclasses.fields(overrides)
            if getattr(overrides, field.name) is not None
        }
        policy = dataclasses.replace(self, **replacements)
        validate_policy(policy)
        return policy


@dataclasses.dataclass(frozen=True)
class Match:
    """Kind of match between two items, with the distances that were measured (None for the others)."""

    kind: MatchKind
    phash_distance: int | None = None
    local_difference: float | None = None


UNSPECIFIED_MATCH = Match(MatchKind.UNSPECIFIED)


def validate_policy(policy: NearDuplicatePolicy) -> None:
    """Raise InvalidInputError unless every threshold of the policy is in its range."""
    if not 0 <= policy.max_phash_distance <= MAX_PHASH_DISTANCE:
        raise InvalidInputError(
            f"max_phash_distance must be between 0 and {MAX_PHASH_DISTANCE}, got {policy.max_phash_distance}"
        )
    if math.isnan(policy.max_local_difference) or policy.max_local_difference < 0:
        raise InvalidInputError(
            f"max_local_difference must be a number of at least 0, got {policy.max_local_difference}"
        )
    validate_score("min_score", policy.min_score)


def validate_score(name: str, score: float) -> None:
    """Raise InvalidInputError naming the field unless score is a number in [-1, 1]."""
    if math.isnan(score) or not -1.0 <= score <= 1.0:
        raise InvalidInputError(f"{name} must be a number between -1 and 1, got {score}")


def measurable(fingerprint: Fingerprint | None) -> bool:
    """Return whether a fingerprint is known and of FINGERPRINT_VERSION, the version this server measures."""
    return fingerprint is not None and fingerprint.version == FINGERPRINT_VERSION


def comparable(first: Fingerprint | None, second: Fingerprint | None) -> bool:
    """Return whether two fingerprints are both measurable, and so can be compared."""
    return measurable(first) and measurable(second)


def classify(
    query: Fingerprint | None, item: Fingerprint | None, score: float, policy: NearDuplicatePolicy
) -> Match:
    """Label how item matches query under policy, by the rules of the module docstring."""
    if not comparable(query, item):
        return UNSPECIFIED_MATCH
    distance = phash_distance(query.phash, item.phash)
    if query.pixel_sha256 == item.pixel_sha256:
        return Match(MatchKind.EXACT, distance, measure_local_difference(query, item))
    if distance > policy.max_phash_distance:
        return Match(MatchKind.SIMILAR, distance)

    difference = measure_local_difference(query, item)
    near = difference <= policy.max_local_difference and score >= policy.min_score
    return Match(MatchKind.NEAR if near else MatchKind.SIMILAR, distance, difference)


def measure_local_difference(first: Fingerprint, second: Fingerprint) -> float:
    """Return the local difference of two comparable fingerprints, 0 without measuring when their layouts are equal."""
    if first.layout == second.layout:
        return 0.0
    return local_difference(first.layout, second.layout)
