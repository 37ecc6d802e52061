"""The duplicate audit behind FindDuplicates: groups of exact, near and similar duplicates across the collection.

The audit reads the items stored when it starts, in batches of AUDIT_BATCH_SIZE, and links pairs:

- exact pairs share the version and pixel_sha256 of their fingerprints, read from the store;
- near pairs come from the pHash index (every near pair is within max_phash_distance), then pass
  the score and local-difference tests of the near-duplicate policy. Each item measures at most
  max_candidates partners, nearest pHash first, because each local difference costs about 3.5 ms;
- similar pairs come from each item's k nearest neighbours by score (a faiss batch search, on the
  GPU when the index is there) with a score of at least min_similar_score, and are neither exact
  nor near.

Groups are the connected components of those links (union-find), per kind: EXACT groups of exact
pairs; NEAR groups of exact or near pairs, except components whose members all share their pixels
(those are EXACT groups); SIMILAR groups of similar pairs. Because components follow chains, two
members of a NEAR or SIMILAR group can be far less alike than the pairs that link them. A group's
first member is its earliest stored item, and every member is measured against it.
"""

import dataclasses
import math
from collections.abc import Callable, Iterator

import numpy as np
import structlog

from imgsearch_common.errors import InvalidInputError
from imgsearch_common.fingerprints import FINGERPRINT_VERSION, local_differences, phash_distance
from index_service.duplicates import (
    MATCH_RANK,
    MatchKind,
    NearDuplicatePolicy,
    comparable,
    validate_score,
)
from index_service.filters import Allowed
from index_service.phash_index import PhashIndex
from index_service.store import Store, StoredItem
from index_service.vector_index import VectorIndex

log = structlog.get_logger(__name__)

AUDIT_BATCH_SIZE = 1000
DEFAULT_AUDIT_K = 10
DEFAULT_MIN_SIMILAR_SCORE = 0.95
DEFAULT_AUDIT_KINDS = frozenset({MatchKind.EXACT, MatchKind.NEAR})
_GROUP_KINDS = (MatchKind.EXACT, MatchKind.NEAR, MatchKind.SIMILAR)
# Pairs whose scores are computed together, which bounds the vectors held at once.
_PAIR_CHUNK = 4096
# Pairs whose local differences are measured between two calls of check (about 0.9 s of work), and
# group members read from the store at once.
_MEASURE_CHUNK = 256


@dataclasses.dataclass(frozen=True)
class AuditProgress:
    """How many of the audited items have been examined."""

    items_done: int
    item_count: int


@dataclasses.dataclass(frozen=True)
class GroupMember:
    """One item of a group, measured against the group's first member.

    phash_distance and local_difference are None when either fingerprint is unknown.
    """

    item_id: str
    uri: str
    score: float
    phash_distance: int | None
    local_difference: float | None
    width: int
    height: int


@dataclasses.dataclass(frozen=True)
class DuplicateGroup:
    """Items linked to each other as duplicates; the first member is the earliest stored."""

    kind: MatchKind
    members: list[GroupMember]


@dataclasses.dataclass(frozen=True)
class AuditSummary:
    """Totals of an audit: items examined, groups sent per kind, and items in some group."""

    item_count: int
    group_counts: dict[MatchKind, int]
    grouped_item_count: int


AuditEvent = AuditProgress | DuplicateGroup | AuditSummary


@dataclasses.dataclass(frozen=True)
class AuditSettings:
    """Parameters of an audit: the kinds of group, the thresholds, and the neighbours per item."""

    kinds: frozenset[MatchKind]
    policy: NearDuplicatePolicy
    min_similar_score: float
    k: int
    max_candidates: int


def audit_settings(
    kinds: frozenset[MatchKind],
    policy: NearDuplicatePolicy,
    min_similar_score: float | None,
    k: int,
    max_k: int,
    max_candidates: int,
) -> AuditSettings:
    """Validate an audit request and fill in its defaults. Raises InvalidInputError naming the bad field."""
    if MatchKind.UNSPECIFIED in kinds:
        raise InvalidInputError("kinds must list MATCH_KIND_EXACT, MATCH_KIND_NEAR or MATCH_KIND_SIMILAR only")
    if k < 0 or k > max_k:
        raise InvalidInputError(f"k is {k}, outside 0 to {max_k}; 0 means {DEFAULT_AUDIT_K}")
    if min_similar_score is not None:
        validate_score("min_similar_score", min_similar_score)
    return AuditSettings(
        kinds=kinds or DEFAULT_AUDIT_KINDS,
        policy=policy,
        min_similar_score=DEFAULT_MIN_SIMILAR_SCORE if min_similar_score is None else min_similar_score,
        k=k or DEFAULT_AUDIT_K,
        max_candidates=max_candidates,
    )


class UnionFind:
    """Disjoint sets of row ids, grown by union."""

    def __init__(self):
        self._parent: dict[int, int] = {}

    def union(self, first: int, second: int) -> None:
        first_root, second_root = self.find(first), self.find(second)
        if first_root != second_root:
            self._parent[max(first_root, second_root)] = min(first_root, second_root)

    def find(self, row_id: int) -> int:
        """Return the smallest row id of the set that contains row_id."""
        root = self._parent.setdefault(row_id, row_id)
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[row_id] != root:  # path compression
            self._parent[row_id], row_id = root, self._parent[row_id]
        return root

    def components(self) -> list[list[int]]:
        """Return every set that has been linked to another row id, each sorted."""
        members: dict[int, list[int]] = {}
        for row_id in self._parent:
            members.setdefault(self.find(row_id), []).append(row_id)
        return [sorted(rows) for rows in members.values() if len(rows) > 1]


class DuplicateAudit:
    """One FindDuplicates run over the stored items up to max_row_id, which must all be in both indexes.

    check is called between batches and groups, and stops the audit by raising, for example when
    the caller's deadline ran out or the caller went away. Items removed while the audit runs are
    left out of the pairs and groups found after their removal. A group left with fewer than two
    members is not sent.
    """

    def __init__(
        self,
        store: Store,
        vector_index: VectorIndex,
        phash_index: PhashIndex,
        settings: AuditSettings,
        max_row_id: int,
        check: Callable[[], None],
        allowed: Allowed | None = None,
    ):
        self._store = store
        self._allowed = allowed
        self._vector_index = vector_index
        self._phash_index = phash_index
        self._settings = settings
        self._check = check
        self._max_row_id = max_row_id
        self._local_differences = _LocalDifferences(store)
        self._exact = _ExactGroups(_allowed_groups(store.exact_groups(self._max_row_id), allowed))
        self._near = UnionFind()
        self._similar = UnionFind()

    def run(self) -> Iterator[AuditEvent]:
        """Yield progress while linking pairs, then each group (largest first), then the summary."""
        if self._allowed is None:
            item_count = self._store.count(self._max_row_id)
        else:
            item_count = int(np.count_nonzero(self._allowed.row_ids <= self._max_row_id))
        yield from self._link_pairs(item_count)

        groups = self._groups()
        group_counts = dict.fromkeys(sorted(self._settings.kinds, key=MATCH_RANK.get), 0)
        grouped = set()
        for kind, row_ids in groups:
            self._check()
            members = self._members(row_ids)
            if len(members) < 2:
                continue
            group_counts[kind] += 1
            grouped.update(member.item_id for member in members)
            yield DuplicateGroup(kind=kind, members=members)
        log.info("duplicate_audit_finished", item_count=item_count, groups=len(groups), grouped=len(grouped))
        yield AuditSummary(item_count=item_count, group_counts=group_counts, grouped_item_count=len(grouped))

    def _link_pairs(self, item_count: int) -> Iterator[AuditProgress]:
        kinds = self._settings.kinds
        if not kinds & {MatchKind.NEAR, MatchKind.SIMILAR}:
            yield AuditProgress(items_done=item_count, item_count=item_count)
            return
        if MatchKind.NEAR in kinds:
            for group in self._exact.groups:
                for row_id in group[1:]:
                    self._near.union(group[0], row_id)

        items_done = 0
        for row_ids, vectors in self._store.vector_batches(AUDIT_BATCH_SIZE, self._max_row_id):
            self._check()
            if self._allowed is not None:
                keep = self._allowed.contains(row_ids)
                row_ids, vectors = row_ids[keep], vectors[keep]
            if MatchKind.NEAR in kinds:
                self._link_near(row_ids, vectors)
            if MatchKind.SIMILAR in kinds:
                self._link_similar(row_ids, vectors)
            items_done += len(row_ids)
            yield AuditProgress(items_done=items_done, item_count=item_count)
        if items_done == 0:
            yield AuditProgress(items_done=0, item_count=item_count)

    def _link_near(self, row_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Link each item of the batch to its near duplicates among the items stored after it."""
        policy = self._settings.policy
        found, phashes, versions = self._phash_index.lookup(row_ids)
        usable = found & (versions == FINGERPRINT_VERSION)
        queries = row_ids[usable]
        positions, partners, distances = self._phash_index.pairs_within(
            phashes[usable], FINGERPRINT_VERSION, policy.max_phash_distance, min_row_ids=queries
        )
        firsts = queries[positions]
        keep = (partners <= self._max_row_id) & ~self._exact.same_group(firsts, partners)
        if self._allowed is not None:
            # A range search over pHashes returns every pair within the distance, so leaving out
            # the partners that fail the filter loses no pair that passes it.
            keep &= self._allowed.contains(partners)
        firsts, seconds, distances = firsts[keep], partners[keep], distances[keep]

        scores = self._pair_scores(firsts, seconds, row_ids, vectors)
        passing = scores >= policy.min_score
        firsts, seconds = _capped(firsts[passing], seconds[passing], distances[passing], self._settings.max_candidates)
        pairs = list(zip(firsts.tolist(), seconds.tolist()))
        for (first, second), difference in zip(pairs, self._local_differences.measure(pairs, self._check)):
            if difference <= policy.max_local_difference:
                self._near.union(first, second)

    def _link_similar(self, row_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Link each item of the batch to its k nearest neighbours that are similar but neither exact nor near."""
        settings = self._settings
        score_by_pair = {}
        selector = None if self._allowed is None else self._allowed.selector
        hits_by_row = self._vector_index.search(vectors, settings.k + 1, selector=selector) if len(row_ids) else []
        for row_id, hits in zip(row_ids.tolist(), hits_by_row):
            neighbours = [hit for hit in hits if hit.row_id != row_id][: settings.k]
            for hit in neighbours:
                if hit.score >= settings.min_similar_score and hit.row_id <= self._max_row_id:
                    score_by_pair[(min(row_id, hit.row_id), max(row_id, hit.row_id))] = hit.score
        if not score_by_pair:
            return

        pairs = list(score_by_pair)
        firsts, seconds = (np.array(side, dtype=np.int64) for side in zip(*pairs))
        linked = self._exact.same_group(firsts, seconds) | self._near_mask(pairs, list(score_by_pair.values()))
        for (first, second), excluded in zip(pairs, linked.tolist()):
            if not excluded:
                self._similar.union(first, second)

    def _near_mask(self, pairs: list[tuple[int, int]], scores: list[float]) -> np.ndarray:
        """Return, per pair, whether the pair is near under the policy (its fingerprints read from the indexes)."""
        policy = self._settings.policy
        row_ids = np.array(sorted({row_id for pair in pairs for row_id in pair}), dtype=np.int64)
        found, phashes, versions = self._phash_index.lookup(row_ids)
        usable = {
            int(row_id): int(phash)
            for row_id, ok, phash, version in zip(row_ids, found, phashes, versions)
            if ok and version == FINGERPRINT_VERSION
        }
        candidates = [
            index
            for index, ((first, second), score) in enumerate(zip(pairs, scores))
            if first in usable
            and second in usable
            and score >= policy.min_score
            and phash_distance(usable[first], usable[second]) <= policy.max_phash_distance
        ]
        near = np.zeros(len(pairs), dtype=bool)
        differences = self._local_differences.measure([pairs[index] for index in candidates], self._check)
        for index, difference in zip(candidates, differences):
            near[index] = difference <= policy.max_local_difference
        return near

    def _pair_scores(
        self, firsts: np.ndarray, seconds: np.ndarray, batch_row_ids: np.ndarray, batch_vectors: np.ndarray
    ) -> np.ndarray:
        """Return the score of each pair whose first item is in the batch, and -inf where the second was removed."""
        scores = np.empty(len(firsts), dtype=np.float32)
        present = np.empty(len(firsts), dtype=bool)
        for start in range(0, len(firsts), _PAIR_CHUNK):
            chunk = slice(start, start + _PAIR_CHUNK)
            first_vectors = batch_vectors[np.searchsorted(batch_row_ids, firsts[chunk])]
            partners, partner_positions = np.unique(seconds[chunk], return_inverse=True)
            found, partner_vectors = self._vector_index.vectors_if_present(partners)
            present[chunk] = found[partner_positions]
            scores[chunk] = np.einsum("ij,ij->i", first_vectors, partner_vectors[partner_positions])
        scores = np.clip(scores, -1.0, 1.0)
        scores[~present] = -np.inf
        return scores

    def _groups(self) -> list[tuple[MatchKind, list[int]]]:
        """Return (kind, sorted row ids) of every group of the requested kinds, largest first."""
        kinds = self._settings.kinds
        groups = []
        if MatchKind.EXACT in kinds:
            groups += [(MatchKind.EXACT, rows) for rows in self._exact.groups]
        if MatchKind.NEAR in kinds:
            groups += [(MatchKind.NEAR, rows) for rows in self._near.components() if not self._exact.all_one(rows)]
        if MatchKind.SIMILAR in kinds:
            groups += [(MatchKind.SIMILAR, rows) for rows in self._similar.components()]
        return sorted(groups, key=lambda group: (-len(group[1]), MATCH_RANK[group[0]], group[1][0]))

    def _members(self, row_ids: list[int]) -> list[GroupMember]:
        """Return the group's members that are still stored, each measured against the first (the earliest stored)."""
        first = None
        members = []
        for start in range(0, len(row_ids), _MEASURE_CHUNK):
            self._check()
            chunk = row_ids[start : start + _MEASURE_CHUNK]
            items = self._store.items_by_row_id(chunk)
            found, vectors = self._vector_index.vectors_if_present(np.array(chunk, dtype=np.int64))
            present = [(row_id, vector) for row_id, vector, ok in zip(chunk, vectors, found) if ok and row_id in items]
            if first is None and present:
                first = items[present[0][0]]
            pairs = [
                (first.row_id, row_id) for row_id, _ in present if comparable(first.fingerprint, items[row_id].fingerprint)
            ]
            difference_by_pair = dict(zip(pairs, self._local_differences.measure(pairs, self._check)))
            for row_id, vector in present:
                score = float(np.clip(vector @ first.vector, -1.0, 1.0))
                difference = difference_by_pair.get((first.row_id, row_id))
                members.append(_member(items[row_id], score, first, None if difference == math.inf else difference))
        return members


def _member(item: StoredItem, score: float, first: StoredItem, local_difference: float | None) -> GroupMember:
    """Describe item as a member of the group whose first member is first; local_difference is None when unknown."""
    known = comparable(first.fingerprint, item.fingerprint)
    return GroupMember(
        item_id=item.item_id,
        uri=item.uri,
        score=score,
        phash_distance=phash_distance(first.fingerprint.phash, item.fingerprint.phash) if known else None,
        local_difference=local_difference,
        width=item.width,
        height=item.height,
    )


class _ExactGroups:
    """The sets of items with the same pixels, with vectorised membership tests."""

    def __init__(self, groups: list[list[int]]):
        self.groups = groups
        rows = np.array([row_id for group in groups for row_id in group], dtype=np.int64)
        labels = np.array([label for label, group in enumerate(groups) for _ in group], dtype=np.int64)
        order = np.argsort(rows)
        self._rows, self._labels = rows[order], labels[order]

    def labels_of(self, row_ids: np.ndarray) -> np.ndarray:
        """Return the group label of each row id, or -1 for row ids with no exact duplicate."""
        if len(self._rows) == 0:
            return np.full(len(row_ids), -1, dtype=np.int64)
        positions = np.minimum(np.searchsorted(self._rows, row_ids), len(self._rows) - 1)
        return np.where(self._rows[positions] == row_ids, self._labels[positions], -1)

    def same_group(self, firsts: np.ndarray, seconds: np.ndarray) -> np.ndarray:
        first_labels = self.labels_of(firsts)
        return (first_labels >= 0) & (first_labels == self.labels_of(seconds))

    def all_one(self, row_ids: list[int]) -> bool:
        """Return whether every row id belongs to one and the same exact group."""
        labels = self.labels_of(np.array(row_ids, dtype=np.int64))
        return bool(labels[0] >= 0 and np.all(labels == labels[0]))


class _LocalDifferences:
    """Local differences of item pairs, each measured once, with fingerprints read from the store in chunks."""

    def __init__(self, store: Store):
        self._store = store
        self._by_pair: dict[tuple[int, int], float] = {}

    def measure(self, pairs: list[tuple[int, int]], check: Callable[[], None]) -> list[float]:
        """Return the local difference of each (first, second) pair; both items must have comparable fingerprints.

        A pair with an item removed since it was found gets infinity, so that it never counts as near.
        """
        missing = list(dict.fromkeys(pair for pair in pairs if pair not in self._by_pair))
        for start in range(0, len(missing), _MEASURE_CHUNK):
            check()
            chunk = missing[start : start + _MEASURE_CHUNK]
            fingerprints = self._store.fingerprints_by_row_id({row_id for pair in chunk for row_id in pair})
            self._by_pair.update(dict.fromkeys(chunk, math.inf))
            chunk = [(first, second) for first, second in chunk if first in fingerprints and second in fingerprints]
            differences = local_differences(
                [fingerprints[first].layout for first, _ in chunk], [fingerprints[second].layout for _, second in chunk]
            )
            self._by_pair.update(zip(chunk, differences.tolist()))
        return [self._by_pair[pair] for pair in pairs]


def _allowed_groups(groups: list[list[int]], allowed: Allowed | None) -> list[list[int]]:
    """Return the groups with only their allowed row ids, leaving out those left with fewer than two."""
    if allowed is None:
        return groups
    kept = [[row_id for row_id, ok in zip(group, allowed.contains(group)) if ok] for group in groups]
    return [group for group in kept if len(group) >= 2]


def _capped(
    firsts: np.ndarray, seconds: np.ndarray, distances: np.ndarray, max_per_first: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keep, for each first item, its max_per_first partners of smallest pHash distance (then row_id)."""
    order = np.lexsort((seconds, distances, firsts))
    firsts, seconds = firsts[order], seconds[order]
    ranks = np.arange(len(firsts)) - np.searchsorted(firsts, firsts, side="left")
    keep = ranks < max_per_first
    if not np.all(keep):
        log.warning("near_candidates_truncated", pairs=len(firsts), measured=int(keep.sum()))
    return firsts[keep], seconds[keep]
