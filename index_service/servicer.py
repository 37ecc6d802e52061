"""The gRPC servicer of IndexService: converts messages and calls the collection core."""

import structlog

from imgsearch.common.v1 import common_pb2
from imgsearch.index.v1 import index_service_pb2, index_service_pb2_grpc
from imgsearch_common.errors import InvalidInputError
from imgsearch_common.grpc_errors import abort_on_error, item_error
from imgsearch_common.serving import remaining_seconds
from imgsearch_common.streams import RequestBatcher
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


class IndexServicer(index_service_pb2_grpc.IndexServiceServicer):
    """IndexService over one collection."""

    def __init__(self, collection: Collection, ingest_batch_size: int, embed_timeout_s: float):
        self._collection = collection
        self._batch_size = ingest_batch_size
        self._embed_timeout_s = embed_timeout_s

    def IngestImages(self, request_iterator, context):
        reader = RequestBatcher(request_iterator, max_buffered=self._batch_size, name="ingest-reader")
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
