"""Tests of the request batching shared by the streaming RPCs, without a gRPC server."""

import queue
import threading

from imgsearch_common.streams import RequestBatcher, pipelined

_END = object()


def _stream_from(source: queue.Queue):
    """Yield what arrives on source until _END, as gRPC's request iterator would."""
    while (item := source.get(timeout=5)) is not _END:
        yield item


def test_reader_batches_what_has_arrived():
    reader = RequestBatcher(iter(range(10)), max_buffered=20, name="test-reader")
    reader._thread.join(timeout=5)

    batches = [reader.next_batch(4), reader.next_batch(4), reader.next_batch(4), reader.next_batch(4)]

    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], None]


def test_reader_does_not_wait_for_a_full_batch():
    source = queue.Queue()
    reader = RequestBatcher(_stream_from(source), max_buffered=8, name="test-reader")

    source.put("first")
    first_batch = reader.next_batch(4)
    source.put("second")
    second_batch = reader.next_batch(4)
    source.put(_END)
    after_end = reader.next_batch(4)

    assert first_batch == ["first"]
    assert second_batch == ["second"]
    assert after_end is None
    assert reader.next_batch(4) is None


def test_reader_of_empty_stream():
    reader = RequestBatcher(iter(()), max_buffered=4, name="test-reader")

    assert reader.next_batch(4) is None


def test_reader_ends_when_stream_fails():
    def failing_stream():
        yield "only"
        raise RuntimeError("connection reset")

    reader = RequestBatcher(failing_stream(), max_buffered=4, name="test-reader")
    reader._thread.join(timeout=5)

    assert reader.next_batch(4) == ["only"]
    assert reader.next_batch(4) is None


def test_reader_thread_stops_after_close_with_full_queue():
    stop = threading.Event()

    def endless_stream():
        while not stop.is_set():
            yield "image"

    reader = RequestBatcher(endless_stream(), max_buffered=2, name="test-reader")
    reader.next_batch(1)
    reader.close()
    reader._thread.join(timeout=5)
    stop.set()

    assert not reader._thread.is_alive()


def test_heavy_requests_limit_a_batch_and_carry_over():
    requests = ["v1", "IMG1", "v2", "IMG2", "IMG3", "v3"]
    reader = RequestBatcher(iter(requests), max_buffered=10, name="test-reader",
                            is_heavy=lambda request: request.startswith("IMG"), max_heavy_buffered=4)
    while reader._queue.qsize() < len(requests) + 1:  # noqa: SLF001 - waits for the reader to buffer the stream
        threading.Event().wait(0.01)

    assert reader.next_batch(10, max_heavy=2) == ["v1", "IMG1", "v2", "IMG2"]
    assert reader.next_batch(10, max_heavy=2) == ["IMG3", "v3"]
    assert reader.next_batch(10, max_heavy=2) is None


def test_heavy_requests_buffered_are_bounded():
    requests = iter(["IMG1", "IMG2", "IMG3", "v1"])
    reader = RequestBatcher(requests, max_buffered=10, name="test-reader",
                            is_heavy=lambda request: request.startswith("IMG"), max_heavy_buffered=2)
    threading.Event().wait(0.3)

    assert reader._queue.qsize() == 2  # noqa: SLF001 - the third image waits for a free slot
    assert reader.next_batch(1) == ["IMG1"]
    threading.Event().wait(0.3)
    assert reader._queue.qsize() == 4  # noqa: SLF001 - IMG3, v1 and the end of the stream followed
    reader.close()


def test_next_batch_without_waiting():
    source: queue.Queue = queue.Queue()
    reader = RequestBatcher(_stream_from(source), max_buffered=4, name="test-reader")

    assert reader.next_batch(4, wait=False) == []
    source.put("a")
    assert reader.next_batch(4) == ["a"]
    source.put(_END)
    threading.Event().wait(0.2)
    assert reader.next_batch(4, wait=False) is None


def test_pipelined_starts_the_next_batch_before_finishing_one():
    arrived = [["a", "b"], ["c"]]
    events = []

    def next_batch(wait):
        return arrived.pop(0) if arrived else None

    def start(batch):
        events.append(f"start {''.join(batch)}")
        return batch

    def finish(batch):
        events.append(f"finish {''.join(batch)}")
        return [item.upper() for item in batch]

    assert list(pipelined(next_batch, start, finish)) == ["A", "B", "C"]
    assert events == ["start ab", "start c", "finish ab", "finish c"]


def test_pipelined_waits_only_when_nothing_is_ahead():
    calls = []
    batches = iter([["a"], [], ["b"], None, None])

    def next_batch(wait):
        calls.append(wait)
        return next(batches)

    assert list(pipelined(next_batch, lambda batch: batch, lambda batch: batch)) == ["a", "b"]
    assert calls == [True, False, True, False, True]
