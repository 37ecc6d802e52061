"""Bringing the faiss and pHash indexes in line with the store: snapshot capture, restore at start, check and repair.

The store is the source of truth and the two indexes are caches of it. At start, restore_indexes
loads the snapshot when it is valid and matches the store, then replays what the store recorded
after it: the items stored after its last_row_id, and the removals after its last_removal_id.
Without a usable snapshot it rebuilds both indexes from the store. Either way, it then compares
the row ids in each index with the store's and repairs any difference.
"""

import dataclasses
import datetime
import time
from concurrent import futures
from pathlib import Path

import numpy as np
import structlog

from index_service import snapshot as snapshot_file
from index_service.phash_index import PhashIndex
from index_service.snapshot import Snapshot, SnapshotError, SnapshotHeader
from index_service.store import Store
from index_service.index_layout import Layout
from index_service.vector_index import IndexState, VectorIndex

log = structlog.get_logger(__name__)

# Row ids named in a repair log line, so that a large repair does not flood the log.
_LOGGED_ROW_IDS = 10
# Items read from the store at once when missing vectors are added back.
_REPAIR_CHUNK = 1000


@dataclasses.dataclass(frozen=True)
class Repair:
    """The changes that the consistency check made to the indexes so that they match the store."""

    vectors_added: int = 0
    vectors_removed: int = 0
    vector_index_rebuilt: bool = False
    phash_index_rebuilt: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.vectors_added or self.vectors_removed or self.vector_index_rebuilt or self.phash_index_rebuilt)


@dataclasses.dataclass(frozen=True)
class RestoreReport:
    """The outcome of restore_indexes: the source of the indexes (snapshot or store) and what was replayed or repaired.

    changes counts what the indexes gained beyond the snapshot file: the items and removals
    replayed after it, or every item when they were rebuilt. A new snapshot is due when it is
    above 0.
    """

    source: str
    item_count: int
    added_after_snapshot: int
    removed_after_snapshot: int
    repair: Repair
    changes: int


def capture_snapshot(
    store: Store, vector_index: VectorIndex, phash_index: PhashIndex, model_id: str, dim: int
) -> Snapshot:
    """Copy both indexes into a Snapshot of the store's current state.

    The caller must keep adds and removals out meanwhile, so that the indexes match the store's
    high-water marks that the header records.
    """
    state = vector_index.state()
    row_ids, phashes, versions = phash_index.arrays()
    header = SnapshotHeader(
        model_id=model_id,
        dim=dim,
        last_row_id=store.last_row_id(),
        last_removal_id=store.last_removal_id(),
        item_count=state.item_count,
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        index_layout=state.layout.to_dict(),
    )
    return Snapshot(
        header=header,
        vector_row_ids=state.row_ids,
        vectors=state.vectors,
        vector_index=state.serialized,
        masked_row_ids=state.masked,
        phash_row_ids=row_ids,
        phash_values=phashes,
        phash_versions=versions,
    )


def restore_indexes(
    store: Store, vector_index: VectorIndex, phash_index: PhashIndex, snapshot_path: Path | None
) -> RestoreReport:
    """Fill both empty indexes from the snapshot at snapshot_path and the store, check them, and repair them.

    snapshot_path None means rebuilding from the store. See the module docstring.
    """
    started = time.perf_counter()
    # Nothing changes the store until the service starts, so its row ids are read while the snapshot loads.
    with futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="restore-row-ids") as reader:
        stored = reader.submit(store.row_ids)
        loaded = _load_snapshot(store, vector_index, phash_index, snapshot_path) if snapshot_path else None
    if loaded is None:
        item_count = _rebuild(store, vector_index, phash_index)
        added = removed = 0
        changes = item_count
    else:
        added, removed = _replay_after(store, vector_index, phash_index, loaded)
        changes = added + removed
    if vector_index.needs_rebuild or vector_index.wants_relayout:
        log.info("vector_index_rebuilding", index_type=vector_index.index_type,
                 wanted=vector_index.spec.layout_for(len(vector_index)).description,
                 masked_count=vector_index.masked_count)
        vector_index.rebuild(store.vector_batches())
        changes += 1

    repair = check_and_repair(store, vector_index, phash_index, stored.result())
    report = RestoreReport(
        source="store" if loaded is None else "snapshot",
        item_count=len(vector_index),
        added_after_snapshot=added,
        removed_after_snapshot=removed,
        repair=repair,
        changes=changes + int(repair.changed),
    )
    event = "index_rebuilt" if loaded is None else "snapshot_loaded"
    log.info(
        event,
        item_count=report.item_count,
        fingerprinted_count=len(phash_index),
        added_after_snapshot=added,
        removed_after_snapshot=removed,
        seconds=round(time.perf_counter() - started, 3),
    )
    return report


def check_and_repair(
    store: Store, vector_index: VectorIndex, phash_index: PhashIndex, stored: np.ndarray | None = None
) -> Repair:
    """Compare the row ids of both indexes with the store's, fix the indexes where they differ, and log it.

    stored, when given, is store.row_ids() read beforehand.
    """
    stored = store.row_ids() if stored is None else stored
    indexed = vector_index.row_ids()
    repair = Repair()
    # Both arrays are sorted, so a repeated row id sits next to its twin.
    if len(indexed) > 1 and np.any(indexed[1:] == indexed[:-1]):
        log.warning("index_repaired", problem="the vector index contains a row id twice", action="rebuilt")
        vector_index.rebuild(store.vector_batches())
        repair = dataclasses.replace(repair, vector_index_rebuilt=True)
    else:
        repair = _repair_vectors(store, vector_index, stored, indexed)

    fingerprinted = store.fingerprinted_row_ids()
    in_phash_index = phash_index.row_ids()
    if not np.array_equal(fingerprinted, in_phash_index):
        log.warning(
            "index_repaired",
            index="phash",
            missing=len(np.setdiff1d(fingerprinted, in_phash_index)),
            extra=len(np.setdiff1d(in_phash_index, fingerprinted)),
            action="rebuilt",
        )
        _rebuild_phash_index(store, phash_index)
        repair = dataclasses.replace(repair, phash_index_rebuilt=True)
    if not repair.changed:
        log.info("index_checked", item_count=len(stored), fingerprinted_count=len(fingerprinted))
    return repair


def _load_snapshot(
    store: Store, vector_index: VectorIndex, phash_index: PhashIndex, path: Path
) -> SnapshotHeader | None:
    """Load the snapshot into both indexes and return its header, or None when there is no usable one."""
    if snapshot_file.remove_temp_file(path):
        log.info("snapshot_temp_file_removed", path=str(path), reason="a snapshot write was interrupted")
    try:
        snapshot = snapshot_file.read_snapshot(path)
        _check_matches_store(snapshot.header, store)
        vector_index.load_state(_index_state(snapshot))
        phash_index.load(snapshot.phash_row_ids, snapshot.phash_values, snapshot.phash_versions)
        _check_loaded(snapshot.header, vector_index)
    except FileNotFoundError:
        log.info("snapshot_missing", path=str(path))
        return None
    except (SnapshotError, ValueError, RuntimeError) as error:
        # The rebuild that follows replaces whatever part of the snapshot was loaded.
        log.warning("snapshot_ignored", path=str(path), reason=str(error))
        return None
    return snapshot.header


def _index_state(snapshot: Snapshot) -> IndexState:
    header = snapshot.header
    dim = header.dim if len(snapshot.vector_row_ids) else 0
    return IndexState(
        layout=Layout.from_dict(header.index_layout),
        dim=dim,
        row_ids=snapshot.vector_row_ids,
        vectors=snapshot.vectors,
        serialized=snapshot.vector_index,
        masked=snapshot.masked_row_ids,
    )


def _check_matches_store(header: SnapshotHeader, store: Store) -> None:
    """Raise SnapshotError unless the snapshot can be a past state of this store."""
    settings = store.settings()
    stored_model = (settings.get("model_id", ""), int(settings.get("dim", 0)))
    if (header.model_id, header.dim) != stored_model:
        raise SnapshotError(
            f"the snapshot contains model {header.model_id!r} (dim {header.dim}), "
            f"but the store contains model {stored_model[0]!r} (dim {stored_model[1]})"
        )
    if header.last_row_id > store.last_row_id() or header.last_removal_id > store.last_removal_id():
        raise SnapshotError(
            f"the snapshot covers row ids up to {header.last_row_id} and removals up to {header.last_removal_id}, "
            f"past the store's {store.last_row_id()} and {store.last_removal_id()}: it belongs to another store"
        )


def _check_loaded(header: SnapshotHeader, vector_index: VectorIndex) -> None:
    if vector_index.dim not in (None, header.dim) or len(vector_index) != header.item_count:
        raise SnapshotError(
            f"the snapshot's vector index has dim {vector_index.dim} and {len(vector_index)} items, "
            f"but its header says dim {header.dim} and {header.item_count} items"
        )


def _replay_after(
    store: Store, vector_index: VectorIndex, phash_index: PhashIndex, header: SnapshotHeader
) -> tuple[int, int]:
    """Apply the removals and adds that the store recorded after the snapshot; return (added, removed)."""
    removed_row_ids = store.removed_row_ids(after_removal_id=header.last_removal_id)
    removed = vector_index.remove(removed_row_ids)
    phash_index.remove(removed_row_ids)

    added = 0
    for row_ids, vectors in store.vector_batches(after_row_id=header.last_row_id):
        vector_index.add(row_ids, vectors)
        added += len(row_ids)
    for row_ids, phashes, versions in store.phash_batches(after_row_id=header.last_row_id):
        phash_index.add(row_ids, phashes, versions)
    return added, removed


def _rebuild(store: Store, vector_index: VectorIndex, phash_index: PhashIndex) -> int:
    item_count = vector_index.rebuild(store.vector_batches())
    _rebuild_phash_index(store, phash_index)
    return item_count


def _rebuild_phash_index(store: Store, phash_index: PhashIndex) -> None:
    batches = list(store.phash_batches())
    if not batches:
        phash_index.load(*(np.empty(0, dtype=dtype) for dtype in (np.int64, np.uint64, np.uint32)))
        return
    phash_index.load(*(np.concatenate(parts) for parts in zip(*batches)))


def _repair_vectors(store: Store, vector_index: VectorIndex, stored: np.ndarray, indexed: np.ndarray) -> Repair:
    if np.array_equal(stored, indexed):
        return Repair()
    missing = np.setdiff1d(stored, indexed)
    extra = np.setdiff1d(indexed, stored)
    if len(extra):
        vector_index.remove(extra)
    for start in range(0, len(missing), _REPAIR_CHUNK):
        chunk = missing[start : start + _REPAIR_CHUNK]
        items = store.items_by_row_id(chunk.tolist())
        vector_index.add(chunk, np.stack([items[int(row_id)].vector for row_id in chunk]))
    if len(missing) or len(extra):
        log.warning(
            "index_repaired",
            index="vector",
            added=len(missing),
            removed=len(extra),
            added_row_ids=missing[:_LOGGED_ROW_IDS].tolist(),
            removed_row_ids=extra[:_LOGGED_ROW_IDS].tolist(),
        )
    return Repair(vectors_added=len(missing), vectors_removed=len(extra))
