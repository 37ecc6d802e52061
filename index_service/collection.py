"""The collection core: ingest, search, removal, metadata updates, duplicate audits and stats.

It works over the store, the faiss and pHash indexes, and an embedder. The store is the source of
truth, and the indexes are caches that index_service.recovery restores at start and that snapshots
persist.
"""

import dataclasses
import hashlib
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import structlog

from imgsearch_common.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    ImgsearchError,
    InvalidInputError,
    NotFoundError,
)
from imgsearch_common.fingerprints import Fingerprint
from imgsearch_common.images import describe_image
from index_service.audit import AuditEvent, DuplicateAudit, audit_settings
from index_service.candidates import CandidateFinder, Duplicate, MatchedItem, PendingItem
from index_service.duplicates import (
    MATCH_RANK,
    MatchKind,
    NearDuplicatePolicy,
    OnDuplicate,
    PolicyOverrides,
    classify,
    measurable,
)
from index_service.embedder import Embedder, Embedding
from index_service.filters import Allowed, ItemFilter
from index_service.ingest_items import (
    Candidate,
    IngestItem,
    IngestResult,
    IngestStatus,
    added,
    check_image_bytes,
    drop_batch_duplicates,
    failed,
    follow,
    given_vector_mismatch,
    invalid_embedding_from_service,
    item_id_removed,
    model_mismatch,
    new_item,
    new_item_id,
    normalised,
    pending_item,
    rejected,
    skipped,
    stored_item_id_result,
    unit_vector,
    validate_item_id,
)
from index_service.metadata import MetadataLimits, MetadataUpdate, validate_metadata, validate_update
from index_service.phash_index import PhashIndex
from index_service.recovery import capture_snapshot, restore_indexes
from index_service.relayout import Relayout
from index_service.search_batcher import IndexQuery, SearchBatcher
from index_service.snapshot import write_snapshot
from index_service.snapshot_scheduler import SnapshotScheduler
from index_service.store import Store, StoredItem
from index_service.vector_index import Hit, VectorIndex

log = structlog.get_logger(__name__)

# How long close() waits for a background rebuild of the vector index, whose result it then drops.
_RELAYOUT_CLOSE_WAIT_S = 5.0
_SETTING_MODEL_ID = "model_id"
_SETTING_DIM = "dim"


class EmbedModelMismatchError(FailedPreconditionError):
    """The embed service runs another model than the one whose embeddings the collection contains."""


@dataclasses.dataclass(frozen=True)
class CollectionLimits:
    """Limits that the collection enforces on requests."""

    default_k: int = 10
    max_k: int = 1000
    max_image_bytes: int = 24 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    near_max_candidates: int = 200
    metadata: MetadataLimits = MetadataLimits()
    search_batch_size: int = 1024


@dataclasses.dataclass(frozen=True)
class ImageQuery:
    """A search by an encoded image, which the embedder embeds."""

    image: bytes


@dataclasses.dataclass(frozen=True)
class VectorQuery:
    """A search by an embedding; model_id, when not empty, must match the collection's."""

    values: Sequence[float]
    model_id: str = ""


@dataclasses.dataclass(frozen=True)
class ItemQuery:
    """A search by the stored embedding of an item."""

    item_id: str


@dataclasses.dataclass(frozen=True)
class TextQuery:
    """A search by a text, which the embedder embeds with the text tower of the collection's CLIP model."""

    text: str


Query = ImageQuery | VectorQuery | ItemQuery | TextQuery


@dataclasses.dataclass(frozen=True)
class Neighbour:
    """A stored item found by a search, with its cosine similarity score to the query and how it matches it.

    phash_distance is None unless both fingerprints are known, and local_difference is None unless
    the pair also passed the pHash test.
    """

    item_id: str
    score: float
    uri: str
    metadata: dict[str, str]
    width: int
    height: int
    sha256: str
    match: MatchKind = MatchKind.UNSPECIFIED
    phash_distance: int | None = None
    local_difference: float | None = None


@dataclasses.dataclass(frozen=True)
class RemoveResult:
    """The outcome of a removal: the number of items removed, and the requested item_ids that named no stored item."""

    removed_count: int
    not_found_item_ids: list[str]


@dataclasses.dataclass(frozen=True)
class CollectionStats:
    """Counts and settings of the collection; dim is 0 and model_id empty until the first add."""

    item_count: int
    dim: int
    model_id: str
    index_type: str
    index_device: str
    index_kind: str = "flat"
    index_memory_bytes: int = 0
    nlist: int = 0
    default_search_effort: int = 0


@dataclasses.dataclass(frozen=True)
class SearchEffort:
    """The search effort of an approximate index: nprobe for IVF, ef_search for HNSW; None means the default."""

    nprobe: int | None = None
    ef_search: int | None = None

    def for_layout(self, kind: str) -> int | None:
        """Return the setting that applies to an index of kind, or None."""
        return {"ivf": self.nprobe, "hnsw": self.ef_search}.get(kind)


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    """One search of search_many(): its query and the other fields of search()."""

    query: "Query"
    k: int = 0
    min_score: float | None = None
    overrides: PolicyOverrides = PolicyOverrides()
    effort: SearchEffort = SearchEffort()
    item_filter: ItemFilter = ItemFilter()


@dataclasses.dataclass(frozen=True)
class _QueryTarget:
    """The query's unit vector and, for an image or item query, its fingerprint, which a search compares items with."""

    vector: np.ndarray
    fingerprint: Fingerprint | None


@dataclasses.dataclass(frozen=True)
class EmbeddedBatch:
    """An ingest batch between Collection.embed_batch() and store_embedded(): results so far, and what to store."""

    results: list
    embedded: list
    leader_by_follower: dict[int, int]


@dataclasses.dataclass(frozen=True)
class _PreparedSearch:
    """A checked search, ready for the vector index: its spec, k, policy, query target and index query."""

    spec: SearchSpec
    k: int
    policy: NearDuplicatePolicy
    target: _QueryTarget
    index_query: IndexQuery
    allowed: Allowed | None


class Collection:
    """Images' embeddings in a faiss index, backed by a durable store that is the source of truth.

    Call load() once before serving. Ingest, search, removal and metadata updates may run from many
    threads. With snapshot_path set, the indexes are loaded from that snapshot at start when it is
    usable, and written to it by save_snapshot(), by the scheduler of start_snapshots(), and by
    close().
    """

    def __init__(
        self,
        store: Store,
        vector_index: VectorIndex,
        embedder: Embedder,
        limits: CollectionLimits,
        near_policy: NearDuplicatePolicy = NearDuplicatePolicy(),
        snapshot_path: Path | None = None,
    ):
        self._store = store
        self._index = vector_index
        self._embedder = embedder
        self._limits = limits
        self._near_policy = near_policy
        self._snapshot_path = snapshot_path
        self._phash_index = PhashIndex()
        self._candidates = CandidateFinder(store, vector_index, self._phash_index, limits.near_max_candidates)
        self._batcher = SearchBatcher(vector_index, limits.search_batch_size)
        # Serialises the re-check, store write and index change of ingests and removals, so that
        # concurrent streams cannot store the same bytes or item_id twice, and so that the indexes
        # match the store whenever the lock is free.
        self._commit_lock = threading.Lock()
        self._relayout = Relayout(store, vector_index, self._commit_lock, lambda: self._record_changes(1))
        self._model_id: str | None = None
        self._dim: int | None = None
        # Adds and removals since the snapshot file was written; guarded by the commit lock.
        self._changes_since_snapshot = 0
        self._snapshot_lock = threading.Lock()
        self._scheduler: SnapshotScheduler | None = None
        self._snapshot_after_changes = 0
        self._loaded = False

    @property
    def model_id(self) -> str:
        """The model whose embeddings the collection contains; empty until the first add."""
        return self._model_id or ""

    def load(self) -> int:
        """Restore the faiss and pHash indexes from the snapshot and the store, and return the item count."""
        settings = self._store.settings()
        self._model_id = settings.get(_SETTING_MODEL_ID)
        self._dim = int(settings[_SETTING_DIM]) if _SETTING_DIM in settings else None

        report = restore_indexes(self._store, self._index, self._phash_index, self._snapshot_path)
        with self._commit_lock:
            self._changes_since_snapshot = report.changes
            self._loaded = True
        log.info(
            "index_loaded",
            source=report.source,
            item_count=report.item_count,
            fingerprinted_count=len(self._phash_index),
            model_id=self._model_id,
            dim=self._dim,
        )
        return report.item_count

    def wait_for_relayout(self, timeout_s: float | None = None) -> bool:
        """Wait for a background rebuild of the vector index in a new layout; return whether none runs any more."""
        return self._relayout.wait(timeout_s)

    def check_embedder(self, timeout_s: float) -> None:
        """Check that the embedder runs the collection's model; log it, or a warning when it is unreachable.

        Raises EmbedModelMismatchError when the embedder returns another model or dim than the
        collection contains. An unreachable embedder is only logged, so that the service can start
        and reject images per item until the embedder is back.
        """
        try:
            info = self._embedder.model_info(timeout_s)
        except ImgsearchError as error:
            log.warning("embed_service_unreachable", error=str(error))
            return
        if self._model_id is not None and (info.model_id, info.dim) != (self._model_id, self._dim):
            log.error(
                "embed_model_mismatched",
                collection_model_id=self._model_id,
                collection_dim=self._dim,
                embed_model_id=info.model_id,
                embed_dim=info.dim,
            )
            raise EmbedModelMismatchError(
                f"the data directory contains embeddings of model {self._model_id!r} (dim {self._dim}), but the embed "
                f"service runs model {info.model_id!r} (dim {info.dim}); run the embed service with model "
                f"{self._model_id!r}, or give the index service another data directory"
            )
        log.info("embed_service_checked", model_id=info.model_id, dim=info.dim, backend=info.backend)

    def start_snapshots(self, interval_s: float, after_changes: int) -> None:
        """Save a snapshot every interval_s seconds and after every after_changes adds and removals, in the background.

        0 turns either trigger off. A snapshot is written only when something changed since the last one.
        """
        if self._snapshot_path is None or (interval_s <= 0 and after_changes <= 0):
            return
        self._snapshot_after_changes = after_changes
        self._scheduler = SnapshotScheduler(self.save_snapshot, interval_s)
        self._scheduler.start()
        with self._commit_lock:
            due = 0 < after_changes <= self._changes_since_snapshot
        if due:
            self._scheduler.wake()

    def save_snapshot(self) -> bool:
        """Write the indexes to the snapshot file when anything changed since it was written; return whether it was.

        Adds and removals wait while the indexes are copied, but not while the copy is written.
        """
        if self._snapshot_path is None:
            return False
        with self._snapshot_lock:
            started = time.perf_counter()
            with self._commit_lock:
                if not self._loaded or self._changes_since_snapshot == 0:
                    return False
                changes = self._changes_since_snapshot
                snapshot = capture_snapshot(
                    self._store, self._index, self._phash_index, self._model_id or "", self._dim or 0
                )
            captured = time.perf_counter()
            size = write_snapshot(self._snapshot_path, snapshot)
            with self._commit_lock:
                self._changes_since_snapshot -= changes
        log.info(
            "snapshot_saved",
            path=str(self._snapshot_path),
            item_count=snapshot.header.item_count,
            last_row_id=snapshot.header.last_row_id,
            last_removal_id=snapshot.header.last_removal_id,
            bytes=size,
            capture_seconds=round(captured - started, 3),
            write_seconds=round(time.perf_counter() - captured, 3),
        )
        return True

    def close(self) -> None:
        """Stop the snapshot scheduler, save a last snapshot when anything changed, and close the embedder and store."""
        if self._scheduler is not None:
            self._scheduler.stop()
        self._relayout.close(timeout_s=_RELAYOUT_CLOSE_WAIT_S)
        try:
            self.save_snapshot()
        except Exception:  # noqa: BLE001 - the store must still close; the next start rebuilds from it
            log.exception("snapshot_failed", path=str(self._snapshot_path))
        self._embedder.close()
        self._store.close()

    def _record_changes(self, count: int) -> None:
        """Count adds or removals towards the next snapshot; the caller holds the commit lock."""
        self._changes_since_snapshot += count
        after = self._snapshot_after_changes
        if self._scheduler is not None and 0 < after <= self._changes_since_snapshot:
            self._scheduler.wake()

    def stats(self) -> CollectionStats:
        layout = self._index.layout
        return CollectionStats(
            # The vector index contains every stored item whenever the commit lock is free. Counting the
            # store's rows instead would read the whole table, which takes about 1 s per million items.
            item_count=len(self._index),
            dim=self._dim or 0,
            model_id=self.model_id,
            index_type=layout.description,
            index_device=self._index.device,
            index_kind=layout.kind,
            index_memory_bytes=self._index.memory_bytes,
            nlist=layout.nlist,
            default_search_effort=self._index.spec.default_effort(layout),
        )

    # Ingest

    def ingest(self, items: Sequence[IngestItem], timeout_s: float) -> list[IngestResult]:
        """Add a batch of images and embeddings and return one result per item, in order.

        Items are stored in one durable transaction before they are added to the index and before
        this returns. Bytes that are already stored, or appear earlier in the batch, come back as
        ALREADY_PRESENT with the stored item_id and are not embedded again. An image that
        duplicates a stored item or an earlier item of the batch, by its fingerprint, is added,
        skipped or rejected as its on_duplicate sets. CandidateFinder.duplicate_of chooses the item
        that it duplicates. An embedding is matched by item_id only: the same item_id with the same
        vector is ALREADY_PRESENT, with another vector ALREADY_EXISTS. The item_id of a removed item
        fails with FailedPreconditionError, because item_ids are never reused.
        """
        return self.store_embedded(self.embed_batch(items, timeout_s))

    def embed_batch(self, items: Sequence[IngestItem], timeout_s: float) -> "EmbeddedBatch":
        """Run the first half of ingest(): check the items, drop those already stored, and embed the images.

        Nothing is stored yet, so this may run while another batch is stored; store_embedded()
        checks again for duplicates under the commit lock.
        """
        results: list[IngestResult | None] = [None] * len(items)
        candidates = []
        for position, item in enumerate(items):
            try:
                candidates.append(self._prepare(position, item))
            except ImgsearchError as error:
                results[position] = failed(error)

        candidates = self._drop_stored(candidates, results)
        candidates, leader_by_follower = drop_batch_duplicates(candidates, results)
        embedded = self._embed([c for c in candidates if c.vector is None], timeout_s, results)
        given = [(c, Embedding(vector=c.vector, model_id=c.model_id)) for c in candidates if c.vector is not None]
        return EmbeddedBatch(results, sorted(embedded + given, key=lambda pair: pair[0].position), leader_by_follower)

    def store_embedded(self, batch: "EmbeddedBatch") -> list[IngestResult]:
        """Run the second half of ingest(): store the embedded items durably, index them, and return every result."""
        results = batch.results
        self._commit(batch.embedded, results)
        for follower, leader in batch.leader_by_follower.items():
            results[follower] = follow(results[leader])
        return results

    def _prepare(self, position: int, item: IngestItem) -> Candidate:
        if item.duplicate_match not in (MatchKind.EXACT, MatchKind.NEAR):
            raise InvalidInputError(f"duplicate_match must be EXACT or NEAR, got {item.duplicate_match.name}")
        if item.item_id:
            validate_item_id(item.item_id)
        validate_metadata(item.metadata, self._limits.metadata)
        if item.embedding is not None:
            return self._prepare_embedding(position, item)
        check_image_bytes(item.image, self._limits.max_image_bytes)
        info = describe_image(item.image, self._limits.max_image_pixels)
        return Candidate(
            position=position,
            item_id=item.item_id or new_item_id(),
            sha256=hashlib.sha256(item.image).hexdigest(),
            uri=item.uri,
            width=info.width,
            height=info.height,
            metadata=dict(item.metadata),
            image=item.image,
            on_duplicate=item.on_duplicate,
            duplicate_match=item.duplicate_match,
        )

    def _prepare_embedding(self, position: int, item: IngestItem) -> Candidate:
        if item.image:
            raise InvalidInputError("the item has both image bytes and an embedding; send one of them")
        if not item.model_id:
            raise InvalidInputError("the embedding's model_id is empty; name the model that produced the vector")
        vector = unit_vector(item.embedding)
        self._check_model_of_vector(len(vector), item.model_id)
        return Candidate(
            position=position,
            item_id=item.item_id or new_item_id(),
            sha256=None,
            uri=item.uri,
            width=0,
            height=0,
            metadata=dict(item.metadata),
            image=b"",
            on_duplicate=item.on_duplicate,
            duplicate_match=item.duplicate_match,
            vector=vector,
            model_id=item.model_id,
        )

    def _check_model_of_vector(self, dim: int, model_id: str) -> None:
        """Raise InvalidInputError naming both sides when a given vector's dim or model differs from the collection's."""
        if self._dim is not None and dim != self._dim:
            raise InvalidInputError(f"embedding has dim {dim}, but the collection contains dim {self._dim}")
        if model_id and self._model_id is not None and model_id != self._model_id:
            raise InvalidInputError(
                f"embedding is from model {model_id!r}, but the collection contains model {self._model_id!r}"
            )

    def _drop_stored(self, candidates: list[Candidate], results: list) -> list[Candidate]:
        """Set the results of candidates whose bytes or item_id are stored or were removed; return the others."""
        removed_item_ids = self._store.removed_item_ids(c.item_id for c in candidates)
        stored_by_sha256 = self._store.items_by_sha256(c.sha256 for c in candidates if c.sha256 is not None)
        stored_by_item_id = self._store.items_by_item_id(c.item_id for c in candidates)
        remaining = []
        for candidate in candidates:
            if candidate.item_id in removed_item_ids:
                results[candidate.position] = failed(item_id_removed(candidate.item_id))
            elif candidate.sha256 in stored_by_sha256:
                stored = stored_by_sha256[candidate.sha256]
                results[candidate.position] = IngestResult(IngestStatus.ALREADY_PRESENT, stored.item_id)
            elif candidate.item_id in stored_by_item_id:
                results[candidate.position] = stored_item_id_result(candidate, stored_by_item_id[candidate.item_id])
            else:
                remaining.append(candidate)
        return remaining

    def _embed(
        self, candidates: list[Candidate], timeout_s: float, results: list
    ) -> list[tuple[Candidate, Embedding]]:
        """Embed the candidates in one call; set the results of those that fail, return the others."""
        if not candidates:
            return []
        if timeout_s <= 0:
            error = DeadlineExceededError("the deadline ran out before the images could be embedded")
            for candidate in candidates:
                results[candidate.position] = failed(error)
            return []

        outputs = self._embedder.embed_images([c.image for c in candidates], timeout_s)
        embedded = []
        for candidate, output in zip(candidates, outputs, strict=True):
            if isinstance(output, ImgsearchError):
                results[candidate.position] = failed(output)
                continue
            vector = normalised(output.vector)
            if vector is None:
                results[candidate.position] = failed(invalid_embedding_from_service())
                continue
            embedded.append(
                (candidate, Embedding(vector=vector, model_id=output.model_id, fingerprint=output.fingerprint))
            )
        return embedded

    def _commit(self, embedded: list[tuple[Candidate, Embedding]], results: list) -> None:
        """Store the embedded candidates in one transaction, then add them to the indexes."""
        if not embedded:
            return
        with self._commit_lock:
            # Another stream may have stored the same bytes or item_id while this batch was embedded.
            still_new = {c.position for c in self._drop_stored([c for c, _ in embedded], results)}
            embedded = [(c, e) for c, e in embedded if c.position in still_new]
            embedded, settings = self._match_model(embedded, results)
            embedded, duplicate_by_position = self._apply_duplicate_policy(embedded, results)
            if not embedded:
                return

            row_ids = self._store.add_items([new_item(c, e) for c, e in embedded], settings)
            if settings:
                self._model_id, self._dim = settings[_SETTING_MODEL_ID], int(settings[_SETTING_DIM])
            # NOTE: if this add fails (out of memory), the items stay stored but are searchable
            # only after a restart rebuilds the indexes, and a retry reports them ALREADY_PRESENT.
            self._index.add(np.array(row_ids, dtype=np.int64), np.stack([e.vector for _, e in embedded]))
            self._add_phashes(row_ids, [e.fingerprint for _, e in embedded])
            self._record_changes(len(row_ids))
            self._relayout.start_if_wanted()

        for candidate, _ in embedded:
            duplicate = duplicate_by_position.get(candidate.position)
            results[candidate.position] = added(candidate.item_id, duplicate)
        log.debug("items_added", count=len(embedded), first_row_id=row_ids[0])

    def _add_phashes(self, row_ids: list[int], fingerprints: list[Fingerprint | None]) -> None:
        known = [(row_id, f) for row_id, f in zip(row_ids, fingerprints, strict=True) if f is not None]
        self._phash_index.add(
            np.array([row_id for row_id, _ in known], dtype=np.int64),
            np.array([f.phash for _, f in known], dtype=np.uint64),
            np.array([f.version for _, f in known], dtype=np.uint32),
        )

    def _apply_duplicate_policy(
        self, embedded: list[tuple[Candidate, Embedding]], results: list
    ) -> tuple[list[tuple[Candidate, Embedding]], dict[int, Duplicate]]:
        """Apply each candidate's on_duplicate to the item it duplicates, if any.

        Returns the candidates to store, and the duplicates of those among them that duplicate an
        item. Runs under the commit lock, so that the stored items it compares with cannot change.
        """
        hashes = {e.fingerprint.pixel_sha256 for _, e in embedded if e.fingerprint is not None}
        stored_by_pixel_sha256 = self._store.items_by_pixel_sha256(hashes)
        kept: list[tuple[Candidate, Embedding]] = []
        kept_pending: list[PendingItem] = []
        duplicate_by_position = {}
        for candidate, embedding in embedded:
            pending = pending_item(candidate, embedding)
            duplicate = None
            if embedding.fingerprint is not None:
                duplicate = self._candidates.duplicate_of(
                    pending, candidate.duplicate_match, stored_by_pixel_sha256, kept_pending, self._near_policy
                )
            if duplicate is None or candidate.on_duplicate is OnDuplicate.ADD:
                kept.append((candidate, embedding))
                kept_pending.append(pending)
                if duplicate is not None:
                    duplicate_by_position[candidate.position] = duplicate
            elif candidate.on_duplicate is OnDuplicate.SKIP:
                results[candidate.position] = skipped(duplicate)
            else:
                results[candidate.position] = rejected(duplicate)
        return kept, duplicate_by_position

    def _match_model(
        self, embedded: list[tuple[Candidate, Embedding]], results: list
    ) -> tuple[list[tuple[Candidate, Embedding]], dict[str, str]]:
        """Keep the embeddings of the collection's model and dim; the first add fixes both.

        Returns the kept embeddings and the settings to store, which are empty unless this is the
        first add.
        """
        model_id, dim = self._model_id, self._dim
        settings = {}
        if model_id is None:
            model_id, dim = embedded[0][1].model_id, embedded[0][1].vector.shape[0]
            settings = {_SETTING_MODEL_ID: model_id, _SETTING_DIM: str(dim)}

        kept = []
        for candidate, embedding in embedded:
            if (embedding.model_id, embedding.vector.shape[0]) == (model_id, dim):
                kept.append((candidate, embedding))
            elif candidate.vector is not None:
                # The caller sent this vector, so the mismatch is the caller's input, not the embed service's state.
                results[candidate.position] = failed(given_vector_mismatch(model_id, dim, embedding))
            else:
                results[candidate.position] = failed(model_mismatch(model_id, dim, embedding))
        return kept, settings

    # Removal and metadata

    def remove_items(self, item_ids: Sequence[str]) -> RemoveResult:
        """Remove the items of item_ids from the store, durably, and then from both indexes.

        item_ids that name no stored item, removed ones included, are reported in the result, so a
        repeated call is harmless. Raises InvalidInputError when item_ids is empty or has an empty
        item_id.
        """
        if not item_ids:
            raise InvalidInputError("item_ids is empty; give at least one item_id to remove")
        for position, item_id in enumerate(item_ids):
            if not item_id:
                raise InvalidInputError(f"item_ids[{position}] is empty; give the item_id of a stored item")

        with self._commit_lock:
            row_id_by_item_id = self._store.remove_items(item_ids)
            row_ids = np.array(list(row_id_by_item_id.values()), dtype=np.int64)
            self._index.remove(row_ids)
            self._phash_index.remove(row_ids)
            if self._index.needs_rebuild:
                self._index.rebuild(self._store.vector_batches())
            self._record_changes(len(row_ids))
        not_found = [item_id for item_id in dict.fromkeys(item_ids) if item_id not in row_id_by_item_id]
        log.info("items_removed", removed=len(row_id_by_item_id), not_found=len(not_found))
        return RemoveResult(removed_count=len(row_id_by_item_id), not_found_item_ids=not_found)

    def update_metadata(self, item_id: str, update: MetadataUpdate) -> dict[str, str]:
        """Change the metadata of one stored item durably and return its new metadata.

        Raises InvalidInputError for an empty item_id or contradicting fields, TooLargeError when a
        key, a value or the number of keys is above its limit, and NotFoundError for an item_id
        that names no stored item.
        """
        if not item_id:
            raise InvalidInputError("item_id is empty; give the item_id of a stored item")
        validate_update(update, self._limits.metadata)
        metadata = self._store.update_metadata(item_id, lambda current: update.apply(current, self._limits.metadata))
        if metadata is None:
            if self._store.removed_item_ids([item_id]):
                raise NotFoundError(f"item_id {item_id!r} belonged to an item that was removed")
            raise NotFoundError(f"item_id {item_id!r} not found in the collection")
        return metadata

    # Duplicate audit

    def find_duplicates(
        self,
        kinds: Iterable[MatchKind],
        overrides: PolicyOverrides,
        min_similar_score: float | None,
        k: int,
        check: Callable[[], None],
        item_filter: ItemFilter = ItemFilter(),
    ) -> Iterator[AuditEvent]:
        """Validate a duplicate audit and return the iterator of its events (see index_service.audit).

        kinds empty means EXACT and NEAR, k 0 means 10 and min_similar_score None means 0.95.
        Raises InvalidInputError for a bad field before any event. check is called between batches
        and groups, and stops the audit by raising. Only items that pass item_filter are examined
        and grouped.
        """
        policy = self._near_policy.with_overrides(overrides)
        settings = audit_settings(
            frozenset(kinds), policy, min_similar_score, k, self._limits.max_k, self._limits.near_max_candidates
        )
        # Under the commit lock, every item up to max_row_id is in both indexes as well as the store.
        with self._commit_lock:
            max_row_id = self._store.max_row_id()
        allowed = self._allowed(item_filter, {})
        audit = DuplicateAudit(self._store, self._index, self._phash_index, settings, max_row_id, check, allowed)
        return audit.run()

    # Search

    def search(
        self,
        query: Query,
        k: int,
        min_score: float | None,
        timeout_s: float,
        overrides: PolicyOverrides = PolicyOverrides(),
        effort: SearchEffort = SearchEffort(),
        item_filter: ItemFilter = ItemFilter(),
    ) -> list[Neighbour]:
        """Return up to k stored items closest to the query: exact duplicates, then near, then the rest.

        Each group is ordered by score, best first. The faiss top k are merged with the exact and
        near duplicates that the query's fingerprint finds, so a duplicate is returned however low
        its score. k 0 means the default k. min_score, when given, leaves out similar and
        unlabelled neighbours below it, never exact or near ones. overrides replaces thresholds of
        the near-duplicate policy for this search, and effort the index's search settings. Only
        items that pass item_filter are returned; faiss searches those alone.
        """
        spec = SearchSpec(query, k, min_score, overrides, effort, item_filter)
        result = self.search_many([spec], timeout_s)[0]
        if isinstance(result, ImgsearchError):
            raise result
        return result

    def search_many(self, specs: Sequence[SearchSpec], timeout_s: float) -> list[list[Neighbour] | ImgsearchError]:
        """Run several searches, their faiss part in one call; return each one's neighbours or its error, in order.

        Each search is as search() describes. A search that fails, for example on a bad field or an
        image that cannot be embedded, gets its error in its place, and the others go on.
        """
        prepared: list[_PreparedSearch | ImgsearchError | None] = []
        deadline = time.monotonic() + timeout_s
        allowed_by_filter: dict[ItemFilter, Allowed] = {}
        for spec in specs:
            try:
                prepared.append(self._prepare_search(spec, deadline - time.monotonic(), allowed_by_filter))
            except ImgsearchError as error:
                prepared.append(error)
        ready = [p for p in prepared if isinstance(p, _PreparedSearch)]
        hits = self._batcher.search([p.index_query for p in ready])
        stored = self._store.items_by_row_id({hit.row_id for found in hits for hit in found}, with_vectors=False)
        finished = iter([self._finish_search(p, found, stored) for p, found in zip(ready, hits)])
        return [next(finished) if isinstance(p, _PreparedSearch) else (p or []) for p in prepared]

    def _prepare_search(
        self, spec: SearchSpec, timeout_s: float, allowed_by_filter: dict[ItemFilter, Allowed]
    ) -> "_PreparedSearch | None":
        """Check a search's fields and find its query vector; None when the collection is empty."""
        k = self._resolve_k(spec.k)
        if spec.min_score is not None and math.isnan(spec.min_score):
            raise InvalidInputError("min_score is NaN; give a number in [-1, 1] or leave it unset")
        policy = self._near_policy.with_overrides(spec.overrides)
        allowed = self._allowed(spec.item_filter, allowed_by_filter)
        target = self._query_target(spec.query, timeout_s)
        if target is None:
            return None
        selector = None if allowed is None else allowed.selector
        query = IndexQuery(target.vector, k, spec.effort.for_layout(self._index.layout.kind), selector)
        return _PreparedSearch(spec, k, policy, target, query, allowed)

    def _allowed(self, item_filter: ItemFilter, known: dict[ItemFilter, Allowed]) -> Allowed | None:
        """Return the row ids that pass item_filter (None for an empty filter), reusing those in known."""
        if item_filter.is_empty:
            return None
        item_filter.check()
        if self._index.device == "gpu":
            # TODO: faiss GPU indexes take no ID selector; filtered searches need the CPU index for now.
            raise FailedPreconditionError("filters need a CPU index; this index service searches on a GPU")
        if item_filter not in known:
            known[item_filter] = Allowed.of(self._store.row_ids_matching(item_filter))
        return known[item_filter]

    def _finish_search(
        self, prepared: "_PreparedSearch", hits: list[Hit], stored: dict[int, StoredItem]
    ) -> list[Neighbour]:
        target, policy = prepared.target, prepared.policy
        beyond = self._duplicates_beyond(hits, target, policy)
        if prepared.allowed is not None:
            beyond = [m for m, ok in zip(beyond, prepared.allowed.contains([m.item.row_id for m in beyond])) if ok]
        matched = self._classified_hits(hits, target, policy, stored) + beyond
        kept = [m for m in matched if _within_min_score(m, prepared.spec.min_score)]
        kept.sort(key=lambda m: (MATCH_RANK[m.match.kind], -m.score, m.item.row_id))
        return [_neighbour(m) for m in kept[: prepared.k]]

    def _resolve_k(self, k: int) -> int:
        if k < 0:
            raise InvalidInputError(f"k must not be negative, got {k}")
        if k > self._limits.max_k:
            raise InvalidInputError(f"k is {k}, above the limit of {self._limits.max_k}; ask for fewer neighbours")
        return k or self._limits.default_k

    def _query_target(self, query: Query, timeout_s: float) -> _QueryTarget | None:
        """Return the normalised query vector and fingerprint, or None when the collection is empty."""
        if isinstance(query, ItemQuery):
            stored = self._stored_item(query.item_id)
            return _QueryTarget(stored.vector, stored.fingerprint)
        if isinstance(query, VectorQuery):
            vector = self._checked_query_vector(query)
            return None if vector is None else _QueryTarget(vector, None)
        if isinstance(query, ImageQuery):
            return self._embedded_query(query.image, timeout_s)
        if isinstance(query, TextQuery):
            return self._embedded_text_query(query.text, timeout_s)
        raise TypeError(f"unsupported query type {type(query).__name__}")

    def _stored_item(self, item_id: str) -> StoredItem:
        if not item_id:
            raise InvalidInputError("item_id is empty; give the item_id of a stored item")
        stored = self._store.items_by_item_id([item_id]).get(item_id)
        if stored is None:
            raise NotFoundError(f"item_id {item_id!r} not found in the collection")
        return stored

    def _checked_query_vector(self, query: VectorQuery) -> np.ndarray | None:
        vector = unit_vector(query.values)
        if self._dim is None:
            return None
        self._check_model_of_vector(len(vector), query.model_id)
        return vector

    def _embedded_query(self, image: bytes, timeout_s: float) -> _QueryTarget | None:
        check_image_bytes(image, self._limits.max_image_bytes)
        describe_image(image, self._limits.max_image_pixels)
        if self._dim is None:
            return None
        if timeout_s <= 0:
            raise DeadlineExceededError("the deadline ran out before the query image could be embedded")

        output = self._embedder.embed_images([image], timeout_s)[0]
        if isinstance(output, ImgsearchError):
            raise output
        if (output.model_id, output.vector.shape[0]) != (self._model_id, self._dim):
            raise model_mismatch(self._model_id, self._dim, output)
        vector = normalised(output.vector)
        if vector is None:
            raise invalid_embedding_from_service()
        return _QueryTarget(vector, output.fingerprint)

    def _embedded_text_query(self, text: str, timeout_s: float) -> _QueryTarget | None:
        """Embed a text query. It has no fingerprint, so its neighbours are unlabelled, never duplicates."""
        if not text.strip():
            raise InvalidInputError("text is empty or only whitespace; give the words to search for")
        if self._dim is None:
            return None
        if timeout_s <= 0:
            raise DeadlineExceededError("the deadline ran out before the query text could be embedded")

        output = self._embedder.embed_text(text, timeout_s)
        if (output.model_id, output.vector.shape[0]) != (self._model_id, self._dim):
            raise model_mismatch(self._model_id, self._dim, output)
        vector = normalised(output.vector)
        if vector is None:
            raise invalid_embedding_from_service()
        return _QueryTarget(vector, None)

    def _classified_hits(
        self, hits: list[Hit], target: _QueryTarget, policy: NearDuplicatePolicy, stored_by_row_id: dict
    ) -> list[MatchedItem]:
        matched = []
        for hit in hits:
            stored = stored_by_row_id.get(hit.row_id)
            if stored is None:
                log.warning("search_hit_not_stored", row_id=hit.row_id)
                continue
            match = classify(target.fingerprint, stored.fingerprint, hit.score, policy)
            matched.append(MatchedItem(item=stored, score=hit.score, match=match))
        return matched

    def _duplicates_beyond(
        self, hits: list[Hit], target: _QueryTarget, policy: NearDuplicatePolicy
    ) -> list[MatchedItem]:
        """Return the exact and near duplicates of the query that are not among the faiss hits."""
        if not measurable(target.fingerprint):
            return []
        seen = {hit.row_id for hit in hits}
        exact = self._candidates.exact_matches(target.fingerprint, target.vector)
        exact = [matched for matched in exact if matched.item.row_id not in seen]
        seen.update(m.item.row_id for m in exact)
        near = self._candidates.near_matches(target.fingerprint, target.vector, policy, exclude_row_ids=seen)
        return exact + list(near)


def _within_min_score(matched: MatchedItem, min_score: float | None) -> bool:
    """Return whether min_score keeps the neighbour; it never leaves out exact or near duplicates."""
    if min_score is None or matched.match.kind in (MatchKind.EXACT, MatchKind.NEAR):
        return True
    return matched.score >= min_score


def _neighbour(matched: MatchedItem) -> Neighbour:
    stored, match = matched.item, matched.match
    return Neighbour(
        item_id=stored.item_id,
        score=matched.score,
        uri=stored.uri,
        metadata=stored.metadata,
        width=stored.width,
        height=stored.height,
        sha256=stored.sha256,
        match=match.kind,
        phash_distance=match.phash_distance,
        local_difference=match.local_difference,
    )
