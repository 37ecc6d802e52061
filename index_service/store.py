"""The durable store of the collection's items: a SQLite file in WAL mode with synchronous=FULL.

Fsync policy: every write is one transaction, and with WAL and synchronous=FULL SQLite fsyncs the
write-ahead log before the commit returns, so an item that add_items has returned survives a crash
or power loss, and so do removals and metadata changes. The store is the source of truth; the faiss
and pHash indexes are caches of it (see index_service.recovery). One process at a time may open the
file, because the store holds an exclusive lock on it.

Each item may carry the fingerprint that the embed service sent with its embedding. Files written
before fingerprints existed get the fingerprint columns when they are opened, with NULL for their
items, which then never count as exact or near duplicates. An item added as an embedding has no
image, so its sha256 and fingerprint are NULL and its width and height 0.

Removing an item deletes its row and writes a tombstone with its item_id and row_id into
removed_items, in one transaction. A trigger rejects any later insert of a tombstoned item_id, so
item_ids are never reused, and AUTOINCREMENT never hands out a row_id twice. The tombstones'
removal_id increases with each removal, so that an index snapshot can name the last removal it
contains.
"""

import dataclasses
import datetime
import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import structlog

from imgsearch_common.config import ConfigError
from imgsearch_common.fingerprints import Fingerprint
from index_service.filters import ItemFilter

log = structlog.get_logger(__name__)

FILE_NAME = "items.sqlite3"

# SQLite allows at least 999 bound parameters per statement in every version.
_MAX_PARAMETERS = 500

# The items table; {name} lets the migration build a copy under another name.
_ITEMS_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    row_id INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id TEXT NOT NULL UNIQUE,
    sha256 TEXT UNIQUE,
    uri TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    vector BLOB NOT NULL,
    model_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    fingerprint_version INTEGER,
    pixel_sha256 TEXT,
    phash INTEGER,
    layout BLOB
)
"""
_SCHEMA = (
    _ITEMS_TABLE.format(name="items")
    + """;
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS removed_items (
    removal_id INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id TEXT NOT NULL UNIQUE,
    row_id INTEGER NOT NULL,
    removed_at TEXT NOT NULL
);
"""
)
# Created after the migration, because rebuilding the items table drops its trigger.
_RESERVED_ITEM_ID_TRIGGER = """
CREATE TRIGGER IF NOT EXISTS items_reject_removed_item_id BEFORE INSERT ON items
WHEN EXISTS (SELECT 1 FROM removed_items WHERE item_id = NEW.item_id)
BEGIN
    SELECT RAISE(ABORT, 'item_id belonged to a removed item');
END
"""

# The columns that fingerprints added to the items table, with their types, for migrating older files.
_FINGERPRINT_COLUMNS = (
    ("fingerprint_version", "INTEGER"),
    ("pixel_sha256", "TEXT"),
    ("phash", "INTEGER"),
    ("layout", "BLOB"),
)
# Exact duplicates are looked up by pixel_sha256, which several items may share.
_PIXEL_SHA256_INDEX = "CREATE INDEX IF NOT EXISTS items_pixel_sha256 ON items (pixel_sha256)"

_ITEM_COLUMNS = (
    "row_id, item_id, sha256, uri, width, height, metadata, vector, model_id, created_at, "
    "fingerprint_version, pixel_sha256, phash, layout"
)
# The same columns with an empty blob for the vector, for callers that need everything else.
_ITEM_COLUMNS_WITHOUT_VECTOR = _ITEM_COLUMNS.replace("vector", "x'' AS vector")
# The sequence names of the two AUTOINCREMENT tables in sqlite_sequence.
_ITEMS_SEQUENCE = "items"
_REMOVALS_SEQUENCE = "removed_items"
_PHASH_OFFSET = 2**64
_MAX_SIGNED_64 = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class NewItem:
    """An item to store; the store assigns its row_id. sha256 is None for an item added as an embedding."""

    item_id: str
    sha256: str | None
    uri: str
    width: int
    height: int
    metadata: Mapping[str, str]
    vector: np.ndarray
    model_id: str
    fingerprint: Fingerprint | None = None


@dataclasses.dataclass(frozen=True)
class StoredItem:
    """An item read back from the store. row_id is also its id in the faiss index.

    fingerprint is None for items whose embed service sent none, for items stored before
    fingerprints existed, and for items added as embeddings, whose sha256 is empty.
    """

    row_id: int
    item_id: str
    sha256: str
    uri: str
    width: int
    height: int
    metadata: dict[str, str]
    vector: np.ndarray
    model_id: str
    created_at: str
    fingerprint: Fingerprint | None = None


class Store:
    """SQLite store of items and collection settings, safe to share between threads.

    One connection serves every thread, guarded by a lock, because writes are short and
    SQLite allows one writer at a time anyway.
    """

    def __init__(self, data_dir: str | Path, lock_timeout_s: float = 5.0):
        """Open or create DATA_DIR/items.sqlite3 and lock it for this process.

        Raises ConfigError when another process keeps the file locked for longer than lock_timeout_s.
        """
        self.path = Path(data_dir) / FILE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: transactions are opened explicitly with BEGIN IMMEDIATE.
        self._connection = sqlite3.connect(
            self.path, timeout=lock_timeout_s, check_same_thread=False, isolation_level=None
        )
        try:
            self._configure()
        except sqlite3.OperationalError as error:
            self._connection.close()
            raise ConfigError(
                f"{self.path} could not be opened ({error}); another index service may be using it, "
                "so give each service its own IMGSEARCH_INDEX_DATA_DIR"
            ) from error
        log.info("store_opened", path=str(self.path), last_row_id=self.last_row_id())

    def _configure(self) -> None:
        # The faiss index of this process mirrors the file, so no other process may write to it.
        # EXCLUSIVE must be set before WAL, and the first write takes the lock for good.
        self._connection.execute("PRAGMA locking_mode=EXCLUSIVE")
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=FULL")
        self._connection.executescript(_SCHEMA)
        self._migrate()
        self._connection.execute("BEGIN IMMEDIATE")
        self._connection.execute("COMMIT")

    def _migrate(self) -> None:
        """Bring a file written by an older version up to the current schema, in one transaction.

        Adds the fingerprint columns, lets sha256 be NULL for items added as embeddings, and
        creates the index and trigger that the current schema has.
        """
        columns = {row[1]: row for row in self._connection.execute("PRAGMA table_info(items)")}
        missing = [(name, kind) for name, kind in _FINGERPRINT_COLUMNS if name not in columns]
        # PRAGMA table_info rows are (cid, name, type, notnull, default, pk).
        sha256_required = bool(columns["sha256"][3])
        self._connection.execute("BEGIN IMMEDIATE")
        try:
            for name, kind in missing:
                self._connection.execute(f"ALTER TABLE items ADD COLUMN {name} {kind}")
            if sha256_required:
                self._rebuild_items_table()
            self._connection.execute(_PIXEL_SHA256_INDEX)
            self._connection.execute(_RESERVED_ITEM_ID_TRIGGER)
            self._connection.execute("COMMIT")
        except BaseException:
            self._connection.execute("ROLLBACK")
            raise
        if missing or sha256_required:
            log.info(
                "store_migrated",
                path=str(self.path),
                added_columns=[name for name, _ in missing],
                sha256_made_optional=sha256_required,
            )

    def _rebuild_items_table(self) -> None:
        """Copy the items into a table of the current schema, keeping the AUTOINCREMENT high-water mark.

        SQLite cannot drop a NOT NULL constraint in place. Dropping the old table also drops its
        sqlite_sequence row, and without restoring it the row_ids of items removed last would be
        handed out again.
        """
        last_row_id = self._sequence(_ITEMS_SEQUENCE)
        self._connection.execute(_ITEMS_TABLE.format(name="items_migrated"))
        self._connection.execute(f"INSERT INTO items_migrated ({_ITEM_COLUMNS}) SELECT {_ITEM_COLUMNS} FROM items")
        self._connection.execute("DROP TABLE items")
        self._connection.execute("ALTER TABLE items_migrated RENAME TO items")
        self._connection.execute("DELETE FROM sqlite_sequence WHERE name = ?", (_ITEMS_SEQUENCE,))
        self._connection.execute(
            "INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (_ITEMS_SEQUENCE, last_row_id)
        )

    def _sequence(self, name: str) -> int:
        row = self._connection.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (name,)).fetchone()
        return 0 if row is None else int(row[0])

    def close(self) -> None:
        with self._lock:
            self._connection.close()
        log.info("store_closed", path=str(self.path))

    def add_items(self, items: Sequence[NewItem], settings: Mapping[str, str] | None = None) -> list[int]:
        """Insert items and upsert settings in one durable transaction; return the new row ids.

        Raises sqlite3.IntegrityError, and stores nothing, when an item_id or sha256 is taken or an
        item_id belonged to a removed item.
        """
        created_at = _now()
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                row_ids = [self._insert(item, created_at) for item in items]
                for key, value in (settings or {}).items():
                    self._connection.execute(
                        "INSERT INTO settings (key, value) VALUES (?, ?) "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        (key, value),
                    )
                self._connection.execute("COMMIT")
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
        return row_ids

    def _insert(self, item: NewItem, created_at: str) -> int:
        fingerprint = item.fingerprint
        cursor = self._connection.execute(
            "INSERT INTO items (item_id, sha256, uri, width, height, metadata, vector, model_id, created_at, "
            "fingerprint_version, pixel_sha256, phash, layout) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                item.item_id,
                item.sha256,
                item.uri,
                item.width,
                item.height,
                json.dumps(dict(item.metadata), sort_keys=True),
                np.ascontiguousarray(item.vector, dtype="<f4").tobytes(),
                item.model_id,
                created_at,
                None if fingerprint is None else fingerprint.version,
                None if fingerprint is None else fingerprint.pixel_sha256,
                None if fingerprint is None else _signed_phash(fingerprint.phash),
                None if fingerprint is None else fingerprint.layout,
            ),
        )
        return int(cursor.lastrowid)

    def remove_items(self, item_ids: Iterable[str]) -> dict[str, int]:
        """Remove the stored items of item_ids in one durable transaction, leaving a tombstone for each.

        Returns the row_id of each item removed, keyed by item_id. item_ids that name no stored
        item, removed ones included, are skipped.
        """
        requested = list(dict.fromkeys(item_ids))
        removed_at = _now()
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                row_id_by_item_id = dict(self._rows_in("SELECT item_id, row_id FROM items", "item_id", requested))
                self._connection.executemany(
                    "INSERT INTO removed_items (item_id, row_id, removed_at) VALUES (?, ?, ?)",
                    [(item_id, row_id, removed_at) for item_id, row_id in row_id_by_item_id.items()],
                )
                self._connection.executemany(
                    "DELETE FROM items WHERE row_id = ?", [(row_id,) for row_id in row_id_by_item_id.values()]
                )
                self._connection.execute("COMMIT")
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
        return row_id_by_item_id

    def update_metadata(
        self, item_id: str, change: Callable[[dict[str, str]], dict[str, str]]
    ) -> dict[str, str] | None:
        """Replace an item's metadata with change(metadata) in one durable transaction, and return it.

        Returns None, changing nothing, when item_id names no stored item. An exception raised by
        change rolls the transaction back and propagates.
        """
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                row = self._connection.execute("SELECT metadata FROM items WHERE item_id = ?", (item_id,)).fetchone()
                if row is None:
                    self._connection.execute("ROLLBACK")
                    return None
                metadata = change(json.loads(row[0]))
                self._connection.execute(
                    "UPDATE items SET metadata = ? WHERE item_id = ?", (json.dumps(metadata, sort_keys=True), item_id)
                )
                self._connection.execute("COMMIT")
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
        return metadata

    def removed_item_ids(self, item_ids: Iterable[str]) -> set[str]:
        """Return the item_ids among item_ids that belonged to removed items."""
        with self._lock:
            rows = self._rows_in("SELECT item_id FROM removed_items", "item_id", list(item_ids))
        return {row[0] for row in rows}

    def removed_row_ids(self, after_removal_id: int) -> np.ndarray:
        """Return the row_ids, as int64, of the items removed after the removal numbered after_removal_id."""
        with self._lock:
            rows = self._connection.execute(
                "SELECT row_id FROM removed_items WHERE removal_id > ? ORDER BY removal_id", (after_removal_id,)
            ).fetchall()
        return np.array([row[0] for row in rows], dtype=np.int64)

    def last_row_id(self) -> int:
        """Return the largest row_id ever assigned, removed items included, or 0 before the first add."""
        with self._lock:
            return self._sequence(_ITEMS_SEQUENCE)

    def last_removal_id(self) -> int:
        """Return the number of the latest removal, or 0 before the first one."""
        with self._lock:
            return self._sequence(_REMOVALS_SEQUENCE)

    def row_ids(self) -> np.ndarray:
        """Return the row_ids of every stored item as a sorted int64 array."""
        return self._row_id_array("SELECT row_id FROM items")

    def fingerprinted_row_ids(self) -> np.ndarray:
        """Return the row_ids of every stored item that has a pHash, as a sorted int64 array."""
        # A fingerprint sets pixel_sha256 and phash together, and the pixel_sha256 index serves this
        # query without reading the rows.
        return self._row_id_array("SELECT row_id FROM items WHERE pixel_sha256 IS NOT NULL")

    def row_ids_matching(self, item_filter: ItemFilter) -> np.ndarray:
        """Return the row_ids of the stored items that pass item_filter, as a sorted int64 array.

        It reads every item's metadata and uri, so it takes time in proportion to the collection.
        """
        clauses, parameters = [], []
        for condition in item_filter.metadata:
            clause = "EXISTS (SELECT 1 FROM json_each(items.metadata) WHERE json_each.key = ?"
            parameters.append(condition.key)
            if condition.any_of:
                clause += f" AND json_each.value IN ({', '.join('?' * len(condition.any_of))})"
                parameters.extend(condition.any_of)
            clauses.append(clause + ")")
        if item_filter.uri_prefixes:
            clauses.append("(" + " OR ".join("substr(uri, 1, ?) = ?" for _ in item_filter.uri_prefixes) + ")")
            for prefix in item_filter.uri_prefixes:
                parameters.extend((len(prefix), prefix))
        where = " AND ".join(clauses) or "1"
        return self._row_id_array(f"SELECT row_id FROM items WHERE {where}", parameters)

    def _row_id_array(self, query: str, parameters: Sequence = ()) -> np.ndarray:
        # Without ORDER BY, SQLite scans a small covering index instead of the rows and their vectors.
        with self._lock:
            rows = self._connection.execute(query, parameters).fetchall()
        return np.sort(np.array([row[0] for row in rows], dtype=np.int64))

    def _rows_in(self, select: str, column: str, values: list) -> list[tuple]:
        """Run `select WHERE column IN (...)` over values in chunks; the caller holds the lock."""
        found = []
        for start in range(0, len(values), _MAX_PARAMETERS):
            chunk = values[start : start + _MAX_PARAMETERS]
            placeholders = ", ".join("?" * len(chunk))
            found.extend(self._connection.execute(f"{select} WHERE {column} IN ({placeholders})", chunk).fetchall())
        return found

    def items_by_sha256(self, hashes: Iterable[str]) -> dict[str, StoredItem]:
        """Return the stored items whose sha256 is in hashes, keyed by sha256."""
        return {item.sha256: item for item in self._select_in("sha256", list(hashes))}

    def items_by_pixel_sha256(self, hashes: Iterable[str]) -> dict[str, list[StoredItem]]:
        """Return the stored items whose fingerprint's pixel_sha256 is in hashes, in row_id order."""
        found: dict[str, list[StoredItem]] = {}
        for item in sorted(self._select_in("pixel_sha256", list(hashes)), key=lambda item: item.row_id):
            found.setdefault(item.fingerprint.pixel_sha256, []).append(item)
        return found

    def items_by_item_id(self, item_ids: Iterable[str]) -> dict[str, StoredItem]:
        """Return the stored items whose item_id is in item_ids, keyed by item_id."""
        return {item.item_id: item for item in self._select_in("item_id", list(item_ids))}

    def items_by_row_id(self, row_ids: Iterable[int], with_vectors: bool = True) -> dict[int, StoredItem]:
        """Return the stored items whose row_id is in row_ids, keyed by row_id.

        with_vectors False leaves each item's vector empty, which saves reading 2 KB per item of dim 512.
        """
        columns = _ITEM_COLUMNS if with_vectors else _ITEM_COLUMNS_WITHOUT_VECTOR
        return {item.row_id: item for item in self._select_in("row_id", [int(r) for r in row_ids], columns)}

    def fingerprints_by_row_id(self, row_ids: Iterable[int]) -> dict[int, Fingerprint]:
        """Return the fingerprints of the items in row_ids that have one, keyed by row_id."""
        values = [int(row_id) for row_id in row_ids]
        found = {}
        for start in range(0, len(values), _MAX_PARAMETERS):
            chunk = values[start : start + _MAX_PARAMETERS]
            placeholders = ", ".join("?" * len(chunk))
            with self._lock:
                rows = self._connection.execute(
                    "SELECT row_id, width, height, fingerprint_version, pixel_sha256, phash, layout FROM items "
                    f"WHERE row_id IN ({placeholders}) AND fingerprint_version IS NOT NULL",
                    chunk,
                ).fetchall()
            found.update((row[0], _fingerprint_from_row(*row[1:])) for row in rows)
        return found

    def _select_in(self, column: str, values: list, columns: str = _ITEM_COLUMNS) -> list[StoredItem]:
        found = []
        for start in range(0, len(values), _MAX_PARAMETERS):
            chunk = values[start : start + _MAX_PARAMETERS]
            placeholders = ", ".join("?" * len(chunk))
            with self._lock:
                rows = self._connection.execute(
                    f"SELECT {columns} FROM items WHERE {column} IN ({placeholders})", chunk
                ).fetchall()
            found.extend(_item_from_row(row) for row in rows)
        return found

    def vector_batches(
        self, batch_size: int = 10_000, max_row_id: int = _MAX_SIGNED_64, after_row_id: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (row_ids, vectors) of the stored items with row_ids in (after_row_id, max_row_id], in order.

        Each batch has at most batch_size rows. row_ids is an int64 array of shape (n,) and vectors
        a float32 array of shape (n, dim).
        """
        last_row_id = after_row_id
        while True:
            with self._lock:
                rows = self._connection.execute(
                    "SELECT row_id, vector FROM items WHERE row_id > ? AND row_id <= ? ORDER BY row_id LIMIT ?",
                    (last_row_id, max_row_id, batch_size),
                ).fetchall()
            if not rows:
                return
            row_ids = np.array([row[0] for row in rows], dtype=np.int64)
            vectors = np.stack([np.frombuffer(row[1], dtype="<f4") for row in rows]).astype(np.float32)
            yield row_ids, vectors
            last_row_id = int(row_ids[-1])

    def phash_batches(
        self, batch_size: int = 100_000, after_row_id: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield (row_ids, phashes, versions) of every item with a fingerprint after after_row_id, in row_id order.

        The arrays are int64, uint64 and uint32, of shape (n,).
        """
        last_row_id = after_row_id
        while True:
            with self._lock:
                rows = self._connection.execute(
                    "SELECT row_id, phash, fingerprint_version FROM items "
                    "WHERE row_id > ? AND phash IS NOT NULL ORDER BY row_id LIMIT ?",
                    (last_row_id, batch_size),
                ).fetchall()
            if not rows:
                return
            row_ids = np.array([row[0] for row in rows], dtype=np.int64)
            phashes = np.array([_unsigned_phash(row[1]) for row in rows], dtype=np.uint64)
            versions = np.array([row[2] for row in rows], dtype=np.uint32)
            yield row_ids, phashes, versions
            last_row_id = int(row_ids[-1])

    def exact_groups(self, max_row_id: int) -> list[list[int]]:
        """Return the row ids, sorted, of each set of two or more items up to max_row_id with the same pixels.

        Items share pixels when their fingerprints have the same version and pixel_sha256.
        """
        with self._lock:
            rows = self._connection.execute(
                "SELECT group_concat(row_id) FROM items WHERE pixel_sha256 IS NOT NULL AND row_id <= ? "
                "GROUP BY fingerprint_version, pixel_sha256 HAVING COUNT(*) > 1",
                (max_row_id,),
            ).fetchall()
        return sorted(sorted(int(row_id) for row_id in row[0].split(",")) for row in rows)

    def max_row_id(self) -> int:
        """Return the largest row_id stored so far, or 0 when the store is empty."""
        with self._lock:
            return int(self._connection.execute("SELECT COALESCE(MAX(row_id), 0) FROM items").fetchone()[0])

    def count(self, max_row_id: int = _MAX_SIGNED_64) -> int:
        """Return the number of stored items, counting only those up to max_row_id."""
        with self._lock:
            row = self._connection.execute("SELECT COUNT(*) FROM items WHERE row_id <= ?", (max_row_id,)).fetchone()
        return int(row[0])

    def settings(self) -> dict[str, str]:
        """Return the collection settings stored so far, such as model_id and dim."""
        with self._lock:
            rows = self._connection.execute("SELECT key, value FROM settings").fetchall()
        return dict(rows)


def _item_from_row(row: tuple) -> StoredItem:
    row_id, item_id, sha256, uri, width, height, metadata, vector, model_id, created_at = row[:10]
    version, pixel_sha256, phash, layout = row[10:]
    fingerprint = None
    if version is not None:
        fingerprint = _fingerprint_from_row(width, height, version, pixel_sha256, phash, layout)
    return StoredItem(
        row_id=row_id,
        item_id=item_id,
        sha256=sha256 or "",
        uri=uri,
        width=width,
        height=height,
        metadata=json.loads(metadata),
        vector=np.frombuffer(vector, dtype="<f4").astype(np.float32),
        model_id=model_id,
        created_at=created_at,
        fingerprint=fingerprint,
    )


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def _fingerprint_from_row(
    width: int, height: int, version: int, pixel_sha256: str, phash: int, layout: bytes
) -> Fingerprint:
    return Fingerprint(
        version=version,
        pixel_sha256=pixel_sha256,
        phash=_unsigned_phash(phash),
        width=width,
        height=height,
        layout=bytes(layout),
    )


def _signed_phash(phash: int) -> int:
    """Return an unsigned 64-bit pHash as the signed integer that SQLite can store."""
    return phash - _PHASH_OFFSET if phash > _MAX_SIGNED_64 else phash


def _unsigned_phash(value: int) -> int:
    """Return a pHash read back from SQLite as the unsigned 64-bit integer it was."""
    return value + _PHASH_OFFSET if value < 0 else value
