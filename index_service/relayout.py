"""Rebuilding the vector index in the layout that its spec wants for its size, in the background while ingest goes on."""

import threading
import time
from collections.abc import Callable

import structlog

from index_service.store import Store
from index_service.vector_index import VectorIndex

log = structlog.get_logger(__name__)


class Relayout:
    """Builds the wanted layout from the store on a thread, then replays what changed meanwhile and swaps it in.

    Searches and ingest go on while the new index is built and trained. Adds and removals wait
    only for the replay and the swap, which take the commit lock. on_installed runs under that
    lock after the swap. A failed build is logged, and none is tried again until a restart.
    """

    def __init__(
        self, store: Store, index: VectorIndex, commit_lock: threading.Lock, on_installed: Callable[[], None]
    ):
        self._store = store
        self._index = index
        self._commit_lock = commit_lock
        self._on_installed = on_installed
        self._thread: threading.Thread | None = None
        self._closed = False
        self._failed = False

    def start_if_wanted(self) -> bool:
        """Start a rebuild when the index wants another layout and none runs; the caller holds the commit lock."""
        if self._closed or self._failed or self.running or not self._index.wants_relayout:
            return False
        self._thread = threading.Thread(target=self._run, name="relayout", daemon=True)
        self._thread.start()
        return True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for a running rebuild to end; return whether none runs any more."""
        if self._thread is not None:
            self._thread.join(timeout_s)
        return not self.running

    def close(self, timeout_s: float) -> None:
        """Keep any running rebuild from swapping its index in, and wait up to timeout_s for it to end."""
        with self._commit_lock:
            self._closed = True
        self.wait(timeout_s)

    def _run(self) -> None:
        started = time.perf_counter()
        log.info("relayout_started", index_type=self._index.index_type, item_count=len(self._index),
                 wanted=self._index.spec.layout_for(len(self._index)).description)
        try:
            with self._commit_lock:
                max_row_id, last_removal_id = self._store.max_row_id(), self._store.last_removal_id()
            built = self._index.build(self._store.vector_batches(max_row_id=max_row_id))
            built_at = time.perf_counter()
            with self._commit_lock:
                if self._closed:
                    return
                self._install(built, max_row_id, last_removal_id)
        except Exception:  # noqa: BLE001 - the old index goes on serving
            self._failed = True
            log.exception("relayout_failed")
            return
        log.info("relayout_finished", index_type=built.layout.description, item_count=len(self._index),
                 build_seconds=round(built_at - started, 3), total_seconds=round(time.perf_counter() - started, 3))

    def _install(self, built, max_row_id: int, last_removal_id: int) -> None:
        """Replay the adds and removals after the build's start, swap the index in; the caller holds the commit lock."""
        for row_ids, vectors in self._store.vector_batches(after_row_id=max_row_id):
            built.add(row_ids, vectors)
        removed = self._store.removed_row_ids(after_removal_id=last_removal_id)
        if built.layout.removes_in_place:
            built.remove(removed)
        self._index.install(built)
        if not built.layout.removes_in_place:
            self._index.remove(removed)
        self._on_installed()
