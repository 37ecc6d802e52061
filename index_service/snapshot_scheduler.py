"""A background thread that saves index snapshots at an interval and whenever it is woken."""

import threading
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)


class SnapshotScheduler:
    """Calls save every interval_s seconds (never, when it is 0) and after each wake(), on one thread, until stop().

    save decides itself whether anything needs writing. An exception from it is logged, and the
    next interval or wake tries again.
    """

    def __init__(self, save: Callable[[], object], interval_s: float):
        self._save = save
        self._interval_s = interval_s if interval_s > 0 else None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        # A daemon thread, so that a process that exits without stop() is not held up. A snapshot
        # interrupted that way leaves only a temporary file, which the next start deletes.
        self._thread = threading.Thread(target=self._run, name="snapshot-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Ask for a save now, without waiting for it."""
        self._wake.set()

    def stop(self) -> None:
        """Stop the thread, after the save in progress, if any, has finished."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while True:
            self._wake.wait(timeout=self._interval_s)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self._save()
            except Exception:  # noqa: BLE001 - the thread must outlive a failed save, such as a full disk
                log.exception("snapshot_failed")
