"""Batching of a gRPC request stream on a reader thread, shared by both services' streaming RPCs."""

import collections
import queue
import threading
from collections.abc import Iterable

import grpc
import structlog

log = structlog.get_logger(__name__)

# How long the reader waits on a full queue before it checks again whether the handler has stopped.
_PUT_POLL_S = 0.1


class RequestBatcher:
    """Reads a request stream on its own thread and hands out batches of what has already arrived.

    next_batch waits only for the first request of a batch, so a client that sends one image and
    waits for its response gets it without the server waiting for a full batch. The queue is bounded,
    so reading stops running ahead when the handler falls behind. Requests for which is_heavy is
    true, such as images among small vectors, have a tighter bound of their own, max_heavy_buffered.
    """

    _END = object()

    def __init__(
        self, requests: Iterable, max_buffered: int, name: str, is_heavy=None, max_heavy_buffered: int = 0
    ):
        self._queue: queue.Queue = queue.Queue(maxsize=max_buffered)
        self._is_heavy = is_heavy
        self._heavy_slots = threading.Semaphore(max(1, max_heavy_buffered))
        self._closed = threading.Event()
        self._ended = False
        self._carried = None
        self._thread = threading.Thread(target=self._read, args=(requests,), name=name, daemon=True)
        self._thread.start()

    def next_batch(self, max_size: int, max_heavy: int | None = None, wait: bool = True) -> list | None:
        """Return up to max_size requests, waiting for the first; None when the stream has ended.

        With max_heavy set, the batch also stops before its (max_heavy + 1)th heavy request (see the
        class docstring); that request starts the next batch. With wait False, an empty list comes
        back at once when no request has arrived.
        """
        if self._ended:
            return None
        batch, heavy = [], 0
        while len(batch) < max_size:
            carried = self._carried is not None
            if carried:
                request, self._carried = self._carried, None
            elif batch or not wait:
                try:
                    request = self._queue.get_nowait()
                except queue.Empty:
                    break
            else:
                request = self._queue.get()
            if request is self._END:
                self._ended = True
                break
            if self._is_heavy is not None and self._is_heavy(request):
                if not carried:
                    self._heavy_slots.release()
                if max_heavy is not None and batch and heavy >= max_heavy:
                    self._carried = request
                    break
                heavy += 1
            batch.append(request)
        if not batch and not wait and not self._ended:
            return []
        return batch or None

    def close(self) -> None:
        """Let the reader thread finish; requests it has not handed out are dropped."""
        self._closed.set()

    def _read(self, requests: Iterable) -> None:
        try:
            for request in requests:
                if self._is_heavy is not None and self._is_heavy(request) and not self._wait_for_heavy_slot():
                    return
                if not self._put(request):
                    return
        except grpc.RpcError:
            # gRPC raises a bare RpcError, without a code, when the client cancels the stream.
            log.info("request_stream_cancelled")
        except Exception:  # noqa: BLE001 - the stream must end even when reading fails
            log.exception("request_stream_read_failed")
        self._put(self._END)

    def _wait_for_heavy_slot(self) -> bool:
        while not self._closed.is_set():
            if self._heavy_slots.acquire(timeout=_PUT_POLL_S):
                return True
        return False

    def _put(self, item) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=_PUT_POLL_S)
                return True
            except queue.Full:
                continue
        return False


def pipelined(next_batch, start, finish):
    """Yield finish(start(batch)) for each batch, starting the next batch before the current one is finished.

    next_batch(wait) returns the next batch, None at the end, or (with wait False) an empty list when
    none has arrived yet. A batch is started ahead only when it has already arrived, so a client that
    waits for responses before it sends more is never kept waiting. finish returns an iterable.
    """
    ahead: collections.deque = collections.deque()
    while True:
        if not ahead:
            batch = next_batch(True)
            if batch is None:
                return
            ahead.append(start(batch))
        more = next_batch(False)
        if more:
            ahead.append(start(more))
        yield from finish(ahead.popleft())
