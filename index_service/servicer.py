"""The gRPC servicer of IndexService: converts messages and calls the collection core."""

import contextvars
from collections.abc import Callable
from concurrent import futures

import structlog

from imgsearch.common.v1 import common_pb2
from imgsearch.index.v1 import index_service_pb2, index_service_pb2_grpc
from imgsearch_common.errors import DeadlineExceededError, InvalidInputError
from imgsearch_common.grpc_errors import abort_on_error, abort_on_stream_error, item_error
from imgsearch_common.serving import remaining_seconds
from imgsearch_common.streams import RequestBatcher, pipelined
from index_service.audit import AuditEvent, AuditProgress, AuditSummary, DuplicateGroup, GroupMember
from index_service.collection import (
    Collection,
    ImageQuery,
    IngestItem,
    IngestResult,
    IngestStatus,
    ItemQuery,
    Neighbour,
    Query,
    SearchEffort,
    SearchSpec,
    TextQuery,
    VectorQuery,
)
from index_service.duplicates import MatchKind, OnDuplicate, PolicyOverrides
from index_service.filters import ItemFilter, MetadataCondition
from index_service.metadata import MetadataUpdate

log = structlog.get_logger(__name__)

_STATUS_MESSAGES = {
    IngestStatus.ADDED: index_service_pb2.INGEST_STATUS_ADDED,
    IngestStatus.ALREADY_PRESENT: index_service_pb2.INGEST_STATUS_ALREADY_PRESENT,
    IngestStatus.FAILED: index_service_pb2.INGEST_STATUS_FAILED,
}
_MATCH_KIND_MESSAGES = {
    MatchKind.UNSPECIFIED: index_service_pb2.MATCH_KIND_UNSPECIFIED,
    MatchKind.EXACT: index_service_pb2.MATCH_KIND_EXACT,
    MatchKind.NEAR: index_service_pb2.MATCH_KIND_NEAR,
    MatchKind.SIMILAR: index_service_pb2.MATCH_KIND_SIMILAR,
}
_MATCH_KINDS = {message: kind for kind, message in _MATCH_KIND_MESSAGES.items()}
_ON_DUPLICATES = {
    index_service_pb2.ON_DUPLICATE_UNSPECIFIED: OnDuplicate.SKIP,
    index_service_pb2.ON_DUPLICATE_ADD: OnDuplicate.ADD,
    index_service_pb2.ON_DUPLICATE_SKIP: OnDuplicate.SKIP,
    index_service_pb2.ON_DUPLICATE_REJECT: OnDuplicate.REJECT,
}


class _CallEnded(Exception):
    """The caller of a long RPC cancelled it or went away, so the work stops."""


class IndexServicer(index_service_pb2_grpc.IndexServiceServicer):
    """IndexService over one collection."""

    def __init__(
        self,
        collection: Collection,
        ingest_batch_size: int,
        embed_timeout_s: float,
        search_batch_size: int = 1024,
        vector_batch_size: int = 512,
    ):
        self._collection = collection
        self._batch_size = ingest_batch_size
        self._embed_timeout_s = embed_timeout_s
        self._search_batch_size = search_batch_size
        self._vector_batch_size = max(vector_batch_size, ingest_batch_size)

    def IngestImages(self, request_iterator, context):
        reader = RequestBatcher(
            request_iterator,
            max_buffered=self._vector_batch_size,
            name="ingest-reader",
            is_heavy=_is_image,
            max_heavy_buffered=2 * self._batch_size,
        )
        # Embeds the next batch while this thread stores the current one and sends its responses.
        embedder = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-embed")
        counts = dict.fromkeys(_STATUS_MESSAGES.values(), 0)
        responses = pipelined(
            lambda wait: reader.next_batch(self._vector_batch_size, max_heavy=self._batch_size, wait=wait),
            lambda requests: self._start_batch(requests, embedder, context),
            lambda started: self._finish_batch(*started),
        )
        try:
            for response in responses:
                counts[response.status] += 1
                yield response
        finally:
            reader.close()
            embedder.shutdown(wait=False, cancel_futures=True)
            log.info(
                "ingest_stream_finished",
                added=counts[index_service_pb2.INGEST_STATUS_ADDED],
                already_present=counts[index_service_pb2.INGEST_STATUS_ALREADY_PRESENT],
                failed=counts[index_service_pb2.INGEST_STATUS_FAILED],
            )

    def _start_batch(self, requests: list, embedder: futures.Executor, context) -> tuple:
        items, invalid_by_position = [], {}
        for position, request in enumerate(requests):
            try:
                items.append(_ingest_item_of(request))
            except InvalidInputError as error:
                invalid_by_position[position] = error
        timeout_s = remaining_seconds(context, self._embed_timeout_s)
        # The copied context carries the call's request id to the embed service's call.
        embedding = embedder.submit(contextvars.copy_context().run, self._collection.embed_batch, items, timeout_s)
        return requests, invalid_by_position, embedding

    def _finish_batch(
        self, requests: list, invalid_by_position: dict, embedding: futures.Future
    ) -> list[index_service_pb2.IngestImagesResponse]:
        try:
            results = iter(self._collection.store_embedded(embedding.result()))
        except Exception as error:  # noqa: BLE001 - one broken batch must not end the stream
            log.warning("ingest_batch_failed", items=len(requests), error=str(error))
            failure = item_error(error)
            return [_ingest_response_failed(failure, r.uri) for r in requests]
        return [
            _ingest_response_failed(item_error(invalid_by_position[position]), request.uri)
            if position in invalid_by_position
            else _ingest_response(next(results), request.uri)
            for position, request in enumerate(requests)
        ]

    @abort_on_error
    def Search(self, request, context):
        spec = _search_spec_of(request)
        neighbours = self._collection.search(
            spec.query,
            k=spec.k,
            min_score=spec.min_score,
            timeout_s=remaining_seconds(context, self._embed_timeout_s),
            overrides=spec.overrides,
            effort=spec.effort,
            item_filter=spec.item_filter,
        )
        return self._search_response(neighbours)

    def SearchStream(self, request_iterator, context):
        # A flat search reads every vector once per faiss call, so a stream's queries are searched in
        # batches as large as SEARCH_BATCH_SIZE; the next batch is searched while one's responses are sent.
        batch_size = self._search_batch_size
        reader = RequestBatcher(request_iterator, max_buffered=2 * batch_size, name="search-reader")
        # Searches the next batch while this thread sends the current one's responses.
        searcher = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="search-stream")
        responses = pipelined(
            lambda wait: reader.next_batch(batch_size, wait=wait),
            lambda requests: searcher.submit(contextvars.copy_context().run, self._search_batch, requests, context),
            lambda searching: searching.result(),
        )
        counts = {"ok": 0, "failed": 0}
        try:
            for response in responses:
                counts["failed" if response.HasField("error") else "ok"] += 1
                yield response
        finally:
            reader.close()
            searcher.shutdown(wait=False, cancel_futures=True)
            log.info("search_stream_finished", searched=counts["ok"], failed=counts["failed"])

    def _search_batch(self, requests: list, context) -> list[index_service_pb2.SearchStreamResponse]:
        specs, invalid_by_position = [], {}
        for position, request in enumerate(requests):
            try:
                specs.append(_search_spec_of(request))
            except InvalidInputError as error:
                invalid_by_position[position] = error
        try:
            results = iter(self._collection.search_many(specs, remaining_seconds(context, self._embed_timeout_s)))
        except Exception as error:  # noqa: BLE001 - one broken batch must not end the stream
            log.warning("search_batch_failed", queries=len(requests), error=str(error))
            failure = item_error(error)
            return [index_service_pb2.SearchStreamResponse(error=failure) for _ in requests]
        responses = []
        for position in range(len(requests)):
            result = invalid_by_position.get(position) or next(results)
            if isinstance(result, Exception):
                responses.append(index_service_pb2.SearchStreamResponse(error=item_error(result)))
            else:
                responses.append(index_service_pb2.SearchStreamResponse(response=self._search_response(result)))
        return responses

    def _search_response(self, neighbours: list[Neighbour]) -> index_service_pb2.SearchResponse:
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
            index_kind=stats.index_kind,
            index_memory_bytes=stats.index_memory_bytes,
            nlist=stats.nlist,
            default_search_effort=stats.default_search_effort,
        )

    @abort_on_error
    def RemoveItems(self, request, context):
        result = self._collection.remove_items(list(request.item_ids))
        return index_service_pb2.RemoveItemsResponse(
            removed_count=result.removed_count, not_found_item_ids=result.not_found_item_ids
        )

    @abort_on_error
    def UpdateMetadata(self, request, context):
        update = MetadataUpdate(
            set_values=dict(request.set), remove_keys=list(request.remove_keys), replace=request.replace
        )
        metadata = self._collection.update_metadata(request.item_id, update)
        return index_service_pb2.UpdateMetadataResponse(metadata=metadata)

    @abort_on_stream_error
    def FindDuplicates(self, request, context):
        events = self._collection.find_duplicates(
            kinds=[_match_kind_of("kinds", value) for value in request.kinds],
            overrides=_overrides_of(request.near_duplicate_policy),
            min_similar_score=request.min_similar_score if request.HasField("min_similar_score") else None,
            k=request.k,
            check=_stop_check(context),
            item_filter=_filter_of(request.filter),
        )
        try:
            for event in events:
                yield _audit_message(event)
        except _CallEnded:
            log.info("find_duplicates_stopped", reason="the caller cancelled the call or went away")


def _stop_check(context) -> Callable[[], None]:
    """Return a check that raises when the caller went away or its deadline passed."""

    def check() -> None:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceededError("FindDuplicates timed out before it finished; call it with a longer deadline")
        if not context.is_active():
            raise _CallEnded

    return check


def _ingest_item_of(request: index_service_pb2.IngestImagesRequest) -> IngestItem:
    if request.on_duplicate not in _ON_DUPLICATES:
        raise InvalidInputError(f"on_duplicate {request.on_duplicate} is not a known OnDuplicate value")
    duplicate_match = _match_kind_of("duplicate_match", request.duplicate_match)
    given = request.embedding if request.WhichOneof("content") == "embedding" else None
    return IngestItem(
        image=request.image,
        item_id=request.item_id,
        uri=request.uri,
        metadata=dict(request.metadata),
        on_duplicate=_ON_DUPLICATES[request.on_duplicate],
        duplicate_match=MatchKind.EXACT if duplicate_match is MatchKind.UNSPECIFIED else duplicate_match,
        embedding=None if given is None else list(given.values),
        model_id="" if given is None else given.model_id,
    )


def _match_kind_of(field: str, value: int) -> MatchKind:
    if value not in _MATCH_KINDS:
        raise InvalidInputError(f"{field} {value} is not a known MatchKind value")
    return _MATCH_KINDS[value]


def _overrides_of(policy: index_service_pb2.NearDuplicatePolicy) -> PolicyOverrides:
    return PolicyOverrides(
        max_phash_distance=policy.max_phash_distance if policy.HasField("max_phash_distance") else None,
        max_local_difference=policy.max_local_difference if policy.HasField("max_local_difference") else None,
        min_score=policy.min_score if policy.HasField("min_score") else None,
    )


def _query_of(request: index_service_pb2.SearchRequest) -> Query:
    which = request.WhichOneof("query")
    if which == "image":
        return ImageQuery(image=request.image)
    if which == "embedding":
        return VectorQuery(values=request.embedding.values, model_id=request.embedding.model_id)
    if which == "item_id":
        return ItemQuery(item_id=request.item_id)
    if which == "text":
        return TextQuery(text=request.text)
    raise InvalidInputError("query is not set; set one of image, embedding, item_id or text")


def _is_image(request: index_service_pb2.IngestImagesRequest) -> bool:
    """Return whether an ingest request carries an image, which costs far more than an embedding."""
    return request.WhichOneof("content") != "embedding"


def _search_spec_of(request: index_service_pb2.SearchRequest) -> SearchSpec:
    return SearchSpec(
        query=_query_of(request),
        k=request.k,
        min_score=request.min_score if request.HasField("min_score") else None,
        overrides=_overrides_of(request.near_duplicate_policy),
        effort=_effort_of(request.search_params),
        item_filter=_filter_of(request.filter),
    )


def _filter_of(message: index_service_pb2.Filter) -> ItemFilter:
    return ItemFilter(
        metadata=tuple(MetadataCondition(c.key, tuple(c.any_of)) for c in message.metadata),
        uri_prefixes=tuple(message.uri_prefixes),
    )


def _effort_of(params: index_service_pb2.SearchParams) -> SearchEffort:
    for name in ("nprobe", "ef_search"):
        if params.HasField(name) and getattr(params, name) == 0:
            raise InvalidInputError(f"search_params.{name} is 0; give at least 1, or leave it unset for the default")
    return SearchEffort(
        nprobe=params.nprobe if params.HasField("nprobe") else None,
        ef_search=params.ef_search if params.HasField("ef_search") else None,
    )


def _ingest_response(result: IngestResult, uri: str) -> index_service_pb2.IngestImagesResponse:
    response = index_service_pb2.IngestImagesResponse(
        item_id=result.item_id,
        status=_STATUS_MESSAGES[result.status],
        uri=uri,
        duplicate_of_item_id=result.duplicate_of_item_id,
        duplicate_match=_MATCH_KIND_MESSAGES[result.duplicate_match],
    )
    if result.status is IngestStatus.FAILED:
        response.error.CopyFrom(item_error(result.error))
    return response


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
        match=_MATCH_KIND_MESSAGES[neighbour.match],
        phash_distance=neighbour.phash_distance,
        local_difference=neighbour.local_difference,
    )


def _audit_message(event: AuditEvent) -> index_service_pb2.FindDuplicatesResponse:
    if isinstance(event, AuditProgress):
        progress = index_service_pb2.FindDuplicatesProgress(items_done=event.items_done, item_count=event.item_count)
        return index_service_pb2.FindDuplicatesResponse(progress=progress)
    if isinstance(event, DuplicateGroup):
        group = index_service_pb2.DuplicateGroup(
            kind=_MATCH_KIND_MESSAGES[event.kind], members=[_member_message(m) for m in event.members]
        )
        return index_service_pb2.FindDuplicatesResponse(group=group)
    if isinstance(event, AuditSummary):
        group_counts = {
            index_service_pb2.MatchKind.Name(_MATCH_KIND_MESSAGES[kind]): count
            for kind, count in event.group_counts.items()
        }
        summary = index_service_pb2.FindDuplicatesSummary(
            item_count=event.item_count, group_counts=group_counts, grouped_item_count=event.grouped_item_count
        )
        return index_service_pb2.FindDuplicatesResponse(summary=summary)
    raise TypeError(f"unsupported audit event {type(event).__name__}")


def _member_message(member: GroupMember) -> index_service_pb2.DuplicateMember:
    message = index_service_pb2.DuplicateMember(
        item_id=member.item_id, uri=member.uri, score=member.score, width=member.width, height=member.height
    )
    # Unknown distances stay unset, so that a reader cannot mistake them for 0, a perfect match.
    if member.phash_distance is not None:
        message.phash_distance = member.phash_distance
    if member.local_difference is not None:
        message.local_difference = member.local_difference
    return message
