"""Batching of a gRPC request stream on a reader thread, shared by both services' streaming RPCs."""

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
    so reading stops running ahead when the handler falls behind.
    """

    _END = object()

    def __init__(self, requests: Iterable, max_buffered: int, name: str):
        self._queue: queue.Queue = queue.Queue(maxsize=max_buffered)
        self._closed = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._read, args=(requests,), name=name, daemon=True)
        self._thread.start()

    def next_batch(self, max_size: int) -> list | None:
        """Return up to max_size requests, waiting for the first; None when the stream has ended."""
        if self._ended:
            return None
        batch = [self._queue.get()]
        while len(batch) < max_size and batch[-1] is not self._END:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if batch[-1] is self._END:
            self._ended = True
            batch.pop()
        return batch or None

    def close(self) -> None:
        """Let the reader thread finish; requests it has not handed out are dropped."""
        self._closed.set()

    def _read(self, requests: Iterable) -> None:
        try:
            for request in requests:
                if not self._put(request):
                    return
        except grpc.RpcError:
            # gRPC raises a bare RpcError, without a code, when the client cancels the stream.
            log.info("request_stream_cancelled")
        except Exception:  # noqa: BLE001 - the stream must end even when reading fails
            log.exception("request_stream_read_failed")
        self._put(self._END)

    def _put(self, item) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=_PUT_POLL_S)
                return True
            except queue.Full:
                continue
        return False
