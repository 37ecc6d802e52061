"""The gRPC servicer of IndexService: converts messages and calls the collection core."""

import queue
import threading
from collections.abc import Iterable

import grpc
import structlog

from imgsearch.common.v1 import common_pb2
from imgsearch.index.v1 import index_service_pb2, index_service_pb2_grpc
from imgsearch_common.errors import InvalidInputError
from imgsearch_common.grpc_errors import abort_on_error, item_error
from imgsearch_common.serving import remaining_seconds
from index_service.collection import (
    Collection,
    ImageQuery,
    IngestItem,
    IngestResult,
    IngestStatus,
    ItemQuery,
    Neighbour,
    Query,
    VectorQuery,
)

log = structlog.get_logger(__name__)

_STATUS_MESSAGES = {
    IngestStatus.ADDED: index_service_pb2.INGEST_STATUS_ADDED,
    IngestStatus.ALREADY_PRESENT: index_service_pb2.INGEST_STATUS_ALREADY_PRESENT,
    IngestStatus.FAILED: index_service_pb2.INGEST_STATUS_FAILED,
}

# How long the request reader waits on a full queue before it checks again whether the servicer
# has stopped reading.
_PUT_POLL_S = 0.1


class IndexServicer(index_service_pb2_grpc.IndexServiceServicer):
    """IndexService over one collection."""

    def __init__(self, collection: Collection, ingest_batch_size: int, embed_timeout_s: float):
        self._collection = collection
        self._batch_size = ingest_batch_size
        self._embed_timeout_s = embed_timeout_s

    def IngestImages(self, request_iterator, context):
        reader = _RequestReader(request_iterator, max_buffered=self._batch_size)
        counts = dict.fromkeys(_STATUS_MESSAGES.values(), 0)
        try:
            while (requests := reader.next_batch(self._batch_size)) is not None:
                for response in self._ingest_batch(requests, context):
                    counts[response.status] += 1
                    yield response
        finally:
            reader.close()
            log.info(
                "ingest_stream_finished",
                added=counts[index_service_pb2.INGEST_STATUS_ADDED],
                already_present=counts[index_service_pb2.INGEST_STATUS_ALREADY_PRESENT],
                failed=counts[index_service_pb2.INGEST_STATUS_FAILED],
            )

    def _ingest_batch(
        self, requests: list[index_service_pb2.IngestImagesRequest], context
    ) -> list[index_service_pb2.IngestImagesResponse]:
        items = [
            IngestItem(image=r.image, item_id=r.item_id, uri=r.uri, metadata=dict(r.metadata)) for r in requests
        ]
        timeout_s = remaining_seconds(context, self._embed_timeout_s)
        try:
            results = self._collection.ingest(items, timeout_s)
        except Exception as error:  # noqa: BLE001 - one broken batch must not end the stream
            failure = item_error(error)
            return [_ingest_response_failed(failure, r.uri) for r in requests]
        return [_ingest_response(result, r.uri) for result, r in zip(results, requests, strict=True)]

    @abort_on_error
    def Search(self, request, context):
        min_score = request.min_score if request.HasField("min_score") else None
        neighbours = self._collection.search(
            _query_of(request),
            k=request.k,
            min_score=min_score,
            timeout_s=remaining_seconds(context, self._embed_timeout_s),
        )
        return index_service_pb2.SearchResponse(
            neighbours=[_neighbour_message(n) for n in neighbours], model_id=self._collection.model_id
        )

    @abort_on_error
    def GetStats(self, request, context):
        stats = self._collection.stats()
        return index_service_pb2.GetStatsResponse(
            item_count=stats.item_count,
            dim=stats.dim,
            model_id=stats.model_id,
            index_type=stats.index_type,
            index_device=stats.index_device,
        )


class _RequestReader:
    """Reads a request stream on its own thread and hands out batches of what has arrived.

    next_batch waits only for the first request of a batch, so a client that sends one image and
    waits for its response gets it.
    """

    _END = object()

    def __init__(self, requests: Iterable, max_buffered: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max_buffered)
        self._closed = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._read, args=(requests,), name="ingest-reader", daemon=True)
        self._thread.start()

    def next_batch(self, max_size: int) -> list | None:
        """Return up to max_size requests, waiting for the first; None when the stream has ended."""
        if self._ended:
            return None
        batch = [self._queue.get()]
        while len(batch) < max_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if batch[-1] is self._END:
            self._ended = True
            batch.pop()
        return batch or None

    def close(self) -> None:
        self._closed.set()

    def _read(self, requests: Iterable) -> None:
        try:
            for request in requests:
                if not self._put(request):
                    return
        except grpc.RpcError:
            # gRPC raises a bare RpcError, without a code, when the client cancels the stream.
            log.info("ingest_stream_cancelled")
        except Exception:  # noqa: BLE001 - the stream must end even when reading fails
            log.exception("ingest_stream_read_failed")
        self._put(self._END)

    def _put(self, item) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=_PUT_POLL_S)
                return True
            except queue.Full:
                continue
        return False


def _query_of(request: index_service_pb2.SearchRequest) -> Query:
    which = request.WhichOneof("query")
    if which == "image":
        return ImageQuery(image=request.image)
    if which == "embedding":
        return VectorQuery(values=request.embedding.values, model_id=request.embedding.model_id)
    if which == "item_id":
        return ItemQuery(item_id=request.item_id)
    raise InvalidInputError("query is not set; set one of image, embedding or item_id")


def _ingest_response(result: IngestResult, uri: str) -> index_service_pb2.IngestImagesResponse:
    if result.status is IngestStatus.FAILED:
        return _ingest_response_failed(item_error(result.error), uri)
    return index_service_pb2.IngestImagesResponse(
        item_id=result.item_id, status=_STATUS_MESSAGES[result.status], uri=uri
    )


def _ingest_response_failed(error: common_pb2.ItemError, uri: str) -> index_service_pb2.IngestImagesResponse:
    return index_service_pb2.IngestImagesResponse(
        status=index_service_pb2.INGEST_STATUS_FAILED, error=error, uri=uri
    )


def _neighbour_message(neighbour: Neighbour) -> index_service_pb2.Neighbour:
    return index_service_pb2.Neighbour(
        item_id=neighbour.item_id,
        score=neighbour.score,
        uri=neighbour.uri,
        metadata=neighbour.metadata,
        width=neighbour.width,
        height=neighbour.height,
        sha256=neighbour.sha256,
    )
