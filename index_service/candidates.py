"""Stored items that duplicate a query or an ingested image, found by fingerprint rather than by embedding.

Exact duplicates come from the store's pixel_sha256 column and near duplicates from the pHash
index, so that both are found however low the model scores them.
"""

import dataclasses
from collections.abc import Iterable, Iterator

import numpy as np
import structlog

from imgsearch_common.fingerprints import Fingerprint, phash_distance
from index_service.duplicates import (
    Match,
    MatchKind,
    NearDuplicatePolicy,
    classify,
    comparable,
    measurable,
    measure_local_difference,
)
from index_service.phash_index import PhashIndex
from index_service.store import Store, StoredItem
from index_service.vector_index import VectorIndex

log = structlog.get_logger(__name__)

# Near candidates are read from the store this many at a time, so that a caller that stops at the
# first near duplicate reads few layouts.
_READ_CHUNK = 32


@dataclasses.dataclass(frozen=True)
class MatchedItem:
    """A stored item with its score to a query and how it matches the query."""

    item: StoredItem
    score: float
    match: Match


@dataclasses.dataclass(frozen=True)
class PendingItem:
    """An ingested image about to be stored: its item_id, unit vector and fingerprint."""

    item_id: str
    vector: np.ndarray
    fingerprint: Fingerprint | None


@dataclasses.dataclass(frozen=True)
class Duplicate:
    """The item that an ingested image duplicates, and how."""

    item_id: str
    match: MatchKind


class CandidateFinder:
    """Finds the exact and near duplicates of a fingerprint among the stored items."""

    def __init__(self, store: Store, vector_index: VectorIndex, phash_index: PhashIndex, max_candidates: int):
        self._store = store
        self._vector_index = vector_index
        self._phash_index = phash_index
        self._max_candidates = max_candidates

    def exact_matches(self, fingerprint: Fingerprint, vector: np.ndarray) -> list[MatchedItem]:
        """Return every stored item with the same pixels as fingerprint, in row_id order."""
        stored = self._store.items_by_pixel_sha256([fingerprint.pixel_sha256]).get(fingerprint.pixel_sha256, [])
        return [
            MatchedItem(item=item, score=_score(vector, item.vector), match=_exact_match(fingerprint, item.fingerprint))
            for item in stored
            if item.fingerprint.version == fingerprint.version
        ]

    def near_matches(
        self,
        fingerprint: Fingerprint,
        vector: np.ndarray,
        policy: NearDuplicatePolicy,
        exclude_row_ids: Iterable[int] = (),
    ) -> Iterator[MatchedItem]:
        """Yield the stored items that are near (or exact) duplicates of fingerprint under policy.

        Candidates are the items within policy.max_phash_distance in the pHash index whose score
        reaches policy.min_score. They are measured in order of pHash distance, then row_id, and at
        most max_candidates of them, because each costs a local difference.
        """
        row_ids, distances = self._phash_index.within(
            fingerprint.phash, fingerprint.version, policy.max_phash_distance
        )
        keep = ~np.isin(row_ids, np.fromiter(exclude_row_ids, dtype=np.int64))
        row_ids, distances = row_ids[keep], distances[keep]
        # An item removed after the pHash lookup is not found here, and is dropped.
        found, vectors = self._vector_index.vectors_if_present(row_ids)
        row_ids, distances = row_ids[found], distances[found]
        scores = _scores(vector, vectors[found])
        passing = scores >= policy.min_score
        row_ids, distances, scores = row_ids[passing], distances[passing], scores[passing]

        order = np.lexsort((row_ids, distances))
        if len(order) > self._max_candidates:
            log.warning("near_candidates_truncated", candidates=len(order), measured=self._max_candidates)
            order = order[: self._max_candidates]
        score_by_row_id = dict(zip(row_ids[order].tolist(), scores[order].tolist()))
        for start in range(0, len(order), _READ_CHUNK):
            chunk = row_ids[order[start : start + _READ_CHUNK]].tolist()
            stored_by_row_id = self._store.items_by_row_id(chunk)
            for row_id in chunk:
                item, score = stored_by_row_id.get(row_id), score_by_row_id[row_id]
                if item is None:
                    continue  # removed since the pHash lookup
                match = classify(fingerprint, item.fingerprint, score, policy)
                if match.kind in (MatchKind.EXACT, MatchKind.NEAR):
                    yield MatchedItem(item=item, score=score, match=match)

    def duplicate_of(
        self,
        image: PendingItem,
        scope: MatchKind,
        stored_by_pixel_sha256: dict[str, list[StoredItem]],
        earlier: list[PendingItem],
        policy: NearDuplicatePolicy,
    ) -> Duplicate | None:
        """Return the item that an ingested image duplicates, or None.

        scope is EXACT to look for exact duplicates only, or NEAR for exact or near ones under
        policy. stored_by_pixel_sha256 contains the stored items with the image's pixel_sha256, and
        earlier the items of the image's batch that will be stored before it. The choice, in order:
        the earliest stored item with the same pixels, the earliest item of the batch with the same
        pixels, the stored near duplicate with the smallest pHash distance, and the earliest near
        duplicate in the batch.
        """
        fingerprint = image.fingerprint
        if not measurable(fingerprint):
            return None
        for stored in stored_by_pixel_sha256.get(fingerprint.pixel_sha256, []):
            if comparable(fingerprint, stored.fingerprint):
                return Duplicate(stored.item_id, MatchKind.EXACT)
        earlier = [item for item in earlier if comparable(fingerprint, item.fingerprint)]
        for item in earlier:
            if item.fingerprint.pixel_sha256 == fingerprint.pixel_sha256:
                return Duplicate(item.item_id, MatchKind.EXACT)
        if scope is not MatchKind.NEAR:
            return None

        stored_near = next(self.near_matches(fingerprint, image.vector, policy), None)
        if stored_near is not None:
            return Duplicate(stored_near.item.item_id, stored_near.match.kind)
        for item in earlier:
            match = classify(fingerprint, item.fingerprint, _score(image.vector, item.vector), policy)
            if match.kind is MatchKind.NEAR:
                return Duplicate(item.item_id, MatchKind.NEAR)
        return None


def _exact_match(first: Fingerprint, second: Fingerprint) -> Match:
    return Match(MatchKind.EXACT, phash_distance(first.phash, second.phash), measure_local_difference(first, second))


def _score(vector: np.ndarray, other: np.ndarray) -> float:
    return float(np.clip(np.dot(vector, other), -1.0, 1.0))


def _scores(vector: np.ndarray, others: np.ndarray) -> np.ndarray:
    if len(others) == 0:
        return np.empty(0, dtype=np.float32)
    return np.clip(others @ vector, -1.0, 1.0)
