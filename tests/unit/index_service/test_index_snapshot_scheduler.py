"""Tests of index_service.snapshot_scheduler with a recording save function."""

import threading
import time

from structlog.testing import capture_logs

from index_service.snapshot_scheduler import SnapshotScheduler

_WAIT_S = 5.0


class _RecordingSave:
    """A save function that counts its calls, can fail, and lets a test wait for the next call."""

    def __init__(self, fail: bool = False):
        self.calls = 0
        self.fail = fail
        self.called = threading.Event()

    def __call__(self):
        self.calls += 1
        self.called.set()
        if self.fail:
            raise OSError("disk full")


def test_saves_at_interval():
    save = _RecordingSave()
    scheduler = SnapshotScheduler(save, interval_s=0.05)
    scheduler.start()
    try:
        deadline = time.monotonic() + _WAIT_S
        while save.calls < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        scheduler.stop()

    assert save.calls >= 2


def test_wake_saves_without_interval():
    save = _RecordingSave()
    scheduler = SnapshotScheduler(save, interval_s=0)
    scheduler.start()
    try:
        time.sleep(0.1)
        assert save.calls == 0
        scheduler.wake()
        assert save.called.wait(_WAIT_S)
    finally:
        scheduler.stop()

    assert save.calls == 1


def test_stop_ends_thread_without_saving():
    save = _RecordingSave()
    scheduler = SnapshotScheduler(save, interval_s=60)
    scheduler.start()

    scheduler.stop()

    assert save.calls == 0
    assert not [thread for thread in threading.enumerate() if thread.name == "snapshot-scheduler"]


def test_stop_before_start():
    SnapshotScheduler(_RecordingSave(), interval_s=1).stop()


def test_failed_save_logged_and_retried():
    save = _RecordingSave(fail=True)
    scheduler = SnapshotScheduler(save, interval_s=0)
    with capture_logs() as logs:
        scheduler.start()
        try:
            scheduler.wake()
            assert save.called.wait(_WAIT_S)
            save.called.clear()
            scheduler.wake()
            assert save.called.wait(_WAIT_S)
        finally:
            scheduler.stop()

    assert save.calls == 2
    assert [entry["event"] for entry in logs].count("snapshot_failed") == 2
