"""The durable store of the collection's items: a SQLite file in WAL mode with synchronous=FULL.

Fsync policy: every write is one transaction, and with WAL and synchronous=FULL SQLite fsyncs the
write-ahead log before the commit returns, so an item that add_items has returned survives a crash
or power loss. The store is the source of truth; the faiss index is rebuilt from it at start.
One process at a time may open the file, because the store holds an exclusive lock on it.
"""

import dataclasses
import datetime
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import structlog

from imgsearch_common.config import ConfigError

log = structlog.get_logger(__name__)

FILE_NAME = "items.sqlite3"

# SQLite allows at least 999 bound parameters per statement in every version.
_MAX_PARAMETERS = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    row_id INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL UNIQUE,
    uri TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    vector BLOB NOT NULL,
    model_id TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

_ITEM_COLUMNS = "row_id, item_id, sha256, uri, width, height, metadata, vector, model_id, created_at"


@dataclasses.dataclass(frozen=True)
class NewItem:
    """An item to store; the store assigns its row_id."""

    item_id: str
    sha256: str
    uri: str
    width: int
    height: int
    metadata: Mapping[str, str]
    vector: np.ndarray
    model_id: str


@dataclasses.dataclass(frozen=True)
class StoredItem:
    """An item read back from the store. row_id is also its id in the faiss index."""

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
        log.info("store_opened", path=str(self.path), item_count=self.count())

    def _configure(self) -> None:
        # The faiss index of this process mirrors the file, so no other process may write to it.
        # EXCLUSIVE must be set before WAL, and the first write takes the lock for good.
        self._connection.execute("PRAGMA locking_mode=EXCLUSIVE")
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=FULL")
        self._connection.executescript(_SCHEMA)
        self._connection.execute("BEGIN IMMEDIATE")
        self._connection.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._connection.close()
        log.info("store_closed", path=str(self.path))

    def add_items(self, items: Sequence[NewItem], settings: Mapping[str, str] | None = None) -> list[int]:
        """Insert items and upsert settings in one durable transaction; return the new row ids.

        Raises sqlite3.IntegrityError, and stores nothing, when an item_id or sha256 is taken.
        """
        created_at = datetime.datetime.now(datetime.timezone.utc).isoformat()
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
        cursor = self._connection.execute(
            "INSERT INTO items (item_id, sha256, uri, width, height, metadata, vector, model_id, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            ),
        )
        return int(cursor.lastrowid)

    def items_by_sha256(self, hashes: Iterable[str]) -> dict[str, StoredItem]:
        """Return the stored items whose sha256 is in hashes, keyed by sha256."""
        return {item.sha256: item for item in self._select_in("sha256", list(hashes))}

    def items_by_item_id(self, item_ids: Iterable[str]) -> dict[str, StoredItem]:
        """Return the stored items whose item_id is in item_ids, keyed by item_id."""
        return {item.item_id: item for item in self._select_in("item_id", list(item_ids))}

    def items_by_row_id(self, row_ids: Iterable[int]) -> dict[int, StoredItem]:
        """Return the stored items whose row_id is in row_ids, keyed by row_id."""
        return {item.row_id: item for item in self._select_in("row_id", [int(r) for r in row_ids])}

    def _select_in(self, column: str, values: list) -> list[StoredItem]:
        found = []
        for start in range(0, len(values), _MAX_PARAMETERS):
            chunk = values[start : start + _MAX_PARAMETERS]
            placeholders = ", ".join("?" * len(chunk))
            with self._lock:
                rows = self._connection.execute(
                    f"SELECT {_ITEM_COLUMNS} FROM items WHERE {column} IN ({placeholders})", chunk
                ).fetchall()
            found.extend(_item_from_row(row) for row in rows)
        return found

    def vector_batches(self, batch_size: int = 10_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (row_ids, vectors) of every stored item in row_id order, batch_size rows at a time.

        row_ids is an int64 array of shape (n,) and vectors a float32 array of shape (n, dim).
        """
        last_row_id = 0
        while True:
            with self._lock:
                rows = self._connection.execute(
                    "SELECT row_id, vector FROM items WHERE row_id > ? ORDER BY row_id LIMIT ?",
                    (last_row_id, batch_size),
                ).fetchall()
            if not rows:
                return
            row_ids = np.array([row[0] for row in rows], dtype=np.int64)
            vectors = np.stack([np.frombuffer(row[1], dtype="<f4") for row in rows]).astype(np.float32)
            yield row_ids, vectors
            last_row_id = int(row_ids[-1])

    def count(self) -> int:
        with self._lock:
            return int(self._connection.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def settings(self) -> dict[str, str]:
        """Return the collection settings stored so far, such as model_id and dim."""
        with self._lock:
            rows = self._connection.execute("SELECT key, value FROM settings").fetchall()
        return dict(rows)


def _item_from_row(row: tuple) -> StoredItem:
    row_id, item_id, sha256, uri, width, height, metadata, vector, model_id, created_at = row
    return StoredItem(
        row_id=row_id,
        item_id=item_id,
        sha256=sha256,
        uri=uri,
        width=width,
        height=height,
        metadata=json.loads(metadata),
        vector=np.frombuffer(vector, dtype="<f4").astype(np.float32),
        model_id=model_id,
        created_at=created_at,
    )
