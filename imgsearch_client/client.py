"""A thin client for the index service: ingest streams, search, stats and duplicates, with plain Python types."""

import dataclasses
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imgsearch.common.v1 import common_pb2
from imgsearch.index.v1 import index_service_pb2, index_service_pb2_grpc
from imgsearch_common.security import open_channel
from imgsearch_common.serving import message_size_options

DEFAULT_MAX_MESSAGE_BYTES = 32 * 1024 * 1024


class ClientError(Exception):
    """A call failed; code is the gRPC status code name, for example "UNAVAILABLE"."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> "ClientError":
        return cls(error.code().name, error.details() or "")


@dataclasses.dataclass(frozen=True)
class IngestItem:
    """One image, or one embedding computed elsewhere, to ingest, with optional item_id, uri and metadata.

    Give either image bytes or embedding, a sequence of floats, with the model_id of the model that
    produced it. The server stores an embedding as it is, without calling the embed service. on_duplicate is "add",
    "skip" or "reject" (empty: the server's default, skip); duplicate_match is "exact" or "near"
    (empty: exact), the matches that count as duplicates. An embedding is matched by item_id only.
    """

    image: bytes = b""
    item_id: str = ""
    uri: str = ""
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    on_duplicate: str = ""
    duplicate_match: str = ""
    embedding: Sequence[float] | None = None
    model_id: str = ""

    def __post_init__(self):
        # Checked here, in the caller's thread, rather than while gRPC reads the request stream.
        _check_choice("on_duplicate", self.on_duplicate, _ON_DUPLICATE_CHOICES)
        _check_choice("duplicate_match", self.duplicate_match, _DUPLICATE_MATCH_CHOICES)
        if self.image and self.embedding is not None:
            raise ValueError("give either image or embedding, not both")
        if self.embedding is not None and not self.model_id:
            raise ValueError("an embedding needs the model_id of the model that produced it")


@dataclasses.dataclass(frozen=True)
class RemoveOutcome:
    """The outcome of a removal: the number of items removed, and the requested item_ids that named no stored item."""

    removed_count: int
    not_found_item_ids: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class IngestOutcome:
    """The result for one ingested image; error_code and error_message are set when it failed."""

    item_id: str
    status: str
    uri: str
    error_code: str = ""
    error_message: str = ""
    # The stored item that this image duplicates ("exact" or "near"), when it duplicates one.
    duplicate_of_item_id: str = ""
    duplicate_match: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "failed"


@dataclasses.dataclass(frozen=True)
class Neighbour:
    """One search hit; score is the cosine similarity to the query, higher is closer."""

    item_id: str
    score: float
    uri: str
    metadata: dict[str, str]
    width: int
    height: int
    sha256: str
    # "exact", "near" or "similar"; "unspecified" when a fingerprint is missing, as for vector queries.
    match: str = "unspecified"
    phash_distance: int | None = None
    local_difference: float | None = None


@dataclasses.dataclass(frozen=True)
class DuplicateCriteria:
    """Criteria of a FindDuplicates call. None, an empty kinds tuple and k=0 take the server's defaults.

    kinds contains "exact", "near" or "similar", and the server's default is exact and near. The last
    three fields are the near-duplicate policy, where min_score=-1 lets only the perceptual signals decide.
    """

    kinds: tuple[str, ...] = ()
    k: int = 0
    min_similar_score: float | None = None
    max_phash_distance: int | None = None
    max_local_difference: float | None = None
    min_score: float | None = None
    item_filter: "ItemFilter | None" = None


@dataclasses.dataclass(frozen=True)
class SearchQuery:
    """One search of IndexClient.search_stream(): exactly one of image, embedding, item_id or text, and its settings."""

    image: bytes | None = None
    embedding: Sequence[float] | None = None
    item_id: str | None = None
    text: str | None = None
    k: int = 10
    min_score: float | None = None
    item_filter: "ItemFilter | None" = None
    nprobe: int | None = None
    ef_search: int | None = None

    def to_proto(self) -> index_service_pb2.SearchRequest:
        """Return the request; raises ValueError unless exactly one query is set."""
        request = _search_request(self.image, self.embedding, self.item_id, self.text, self.k, self.min_score)
        if self.item_filter is not None:
            request.filter.CopyFrom(self.item_filter.to_proto())
        if self.nprobe is not None:
            request.search_params.nprobe = self.nprobe
        if self.ef_search is not None:
            request.search_params.ef_search = self.ef_search
        return request


@dataclasses.dataclass(frozen=True)
class ItemFilter:
    """Conditions on the items a search or audit may return, all of which must hold.

    where maps a metadata key to the values it may have, and an empty tuple requires only that the key
    is present. uri_prefixes, when not empty, requires that the item's uri starts with one of them, for
    example a source folder.
    """

    where: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    uri_prefixes: tuple[str, ...] = ()

    def to_proto(self) -> index_service_pb2.Filter:
        return index_service_pb2.Filter(
            metadata=[index_service_pb2.MetadataCondition(key=key, any_of=list(values))
                      for key, values in self.where.items()],
            uri_prefixes=list(self.uri_prefixes),
        )


@dataclasses.dataclass(frozen=True)
class DuplicateMember:
    """One item of a duplicate group, measured against the group's first member."""

    item_id: str
    uri: str
    score: float
    phash_distance: int | None
    local_difference: float | None
    width: int
    height: int


@dataclasses.dataclass(frozen=True)
class DuplicateGroup:
    """Items linked as duplicates; kind is "exact", "near" or "similar", and the first member is the reference."""

    kind: str
    members: tuple[DuplicateMember, ...]


@dataclasses.dataclass(frozen=True)
class DuplicatesProgress:
    """How far a FindDuplicates call has come: items_done of item_count items examined."""

    items_done: int
    item_count: int


@dataclasses.dataclass(frozen=True)
class DuplicatesSummary:
    """The totals that end a FindDuplicates call; group_counts maps a kind such as "exact" to its group count."""

    item_count: int
    group_counts: dict[str, int]
    grouped_item_count: int


DuplicatesEvent = DuplicatesProgress | DuplicateGroup | DuplicatesSummary

DUPLICATE_KINDS = ("exact", "near", "similar")
_ON_DUPLICATE_CHOICES = ("add", "skip", "reject")
_DUPLICATE_MATCH_CHOICES = ("exact", "near")
_MATCH_KIND_PREFIX = "MATCH_KIND_"
# uint32 fields cannot carry a negative number, so the client rejects one before sending.
_UINT32_MAX = 2**32 - 1

_STATUS_NAMES = {
    index_service_pb2.INGEST_STATUS_ADDED: "added",
    index_service_pb2.INGEST_STATUS_ALREADY_PRESENT: "already_present",
    index_service_pb2.INGEST_STATUS_FAILED: "failed",
}


class IndexClient:
    """Client of one index service. Use as a context manager, or call close()."""

    def __init__(
        self,
        addr: str,
        timeout_s: float = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str = "",
    ):
        """Open a channel to addr: TLS when credentials are given, and token as a bearer token on every call when set.

        imgsearch_common.security.channel_credentials builds credentials from PEM files.
        """
        self._timeout_s = timeout_s
        self._max_message_bytes = max_message_bytes
        self._channel = open_channel(addr, message_size_options(max_message_bytes), credentials, token)
        self._stub = index_service_pb2_grpc.IndexServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> "IndexClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def ingest(
        self, items: Iterable[IngestItem], max_in_flight: int = 64, timeout_s: float | None = None
    ) -> Iterator[IngestOutcome]:
        """Stream items to the service and yield one outcome per item, in order.

        At most max_in_flight items are sent ahead of their results, so a large folder is read lazily.
        timeout_s bounds the whole stream; by default there is no deadline for ingest streams.

        An item whose request is larger than the client's max_message_bytes is not sent, because
        gRPC would fail the whole stream: its outcome fails with RESOURCE_EXHAUSTED, and the
        stream goes on. When iterating items raises, nothing more is sent, the outcomes of the
        items already sent are yielded, and then that exception is raised. Closing the iterator
        early cancels the call.
        """
        stream = _IngestRequests(items, self._max_message_bytes, max_in_flight)
        responses = self._stub.IngestImages(stream.requests(), timeout=timeout_s)
        try:
            while (slot := stream.next_slot(responses)) is not _END_OF_ITEMS:
                if isinstance(slot, _ItemsFailed):
                    raise slot.error
                yield slot if isinstance(slot, IngestOutcome) else _outcome_from_proto(_next_response(responses))
                stream.release_slot()
            # Every item has its outcome. Reading the stream to its end lets the server's handler finish
            # with OK; cancelling it now would log the call as CANCELLED.
            for _ in responses:
                pass
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error) from None
        finally:
            stream.finish()
            responses.cancel()

    def search(
        self,
        *,
        image: bytes | None = None,
        embedding: Iterable[float] | None = None,
        item_id: str | None = None,
        text: str | None = None,
        k: int = 10,
        min_score: float | None = None,
        item_filter: ItemFilter | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> list[Neighbour]:
        """Return the neighbours of exactly one query: image bytes, an embedding, a stored item_id or a text.

        A text is embedded with the text tower of the collection's CLIP model, for example "a dog on a sofa".
        item_filter limits the neighbours to the items that pass it. nprobe (IVF) and ef_search (HNSW)
        set how hard an approximate index searches; None takes the server's default.
        """
        query = SearchQuery(image, embedding, item_id, text, k, min_score, item_filter, nprobe, ef_search)
        try:
            response = self._stub.Search(query.to_proto(), timeout=self._timeout_s)
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error) from None
        return [_neighbour_from_proto(neighbour) for neighbour in response.neighbours]

    def search_stream(
        self, queries: Iterable["SearchQuery"], timeout_s: float | None = None
    ) -> Iterator[list[Neighbour] | ClientError]:
        """Run many searches over one SearchStream; yield each query's neighbours, or its ClientError, in order.

        The server searches the queries that arrive together in one faiss call, so this costs far less
        per query than as many search() calls. A failed query does not end the stream. timeout_s bounds
        the whole stream; by default there is none. Raises ValueError, before anything is sent, for a
        query that does not set exactly one of image, embedding, item_id or text, and ClientError when
        the call itself fails.
        """
        requests = [query.to_proto() for query in queries]
        responses = self._stub.SearchStream(iter(requests), timeout=timeout_s)
        try:
            for response in responses:
                if response.HasField("error"):
                    yield ClientError(response.error.code_name, response.error.message)
                else:
                    yield [_neighbour_from_proto(n) for n in response.response.neighbours]
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error) from None
        finally:
            responses.cancel()

    def stats(self) -> dict[str, object]:
        """Return the collection's item count, dim, model_id and index details."""
        try:
            response = self._stub.GetStats(index_service_pb2.GetStatsRequest(), timeout=self._timeout_s)
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error) from None
        return {
            "item_count": response.item_count,
            "dim": response.dim,
            "model_id": response.model_id,
            "index_type": response.index_type,
            "index_device": response.index_device,
            "index_kind": response.index_kind,
            "index_memory_bytes": response.index_memory_bytes,
            "nlist": response.nlist,
            "default_search_effort": response.default_search_effort,
        }

    def find_duplicates(
        self, criteria: DuplicateCriteria | None = None, timeout_s: float | None = None
    ) -> Iterator[DuplicatesEvent]:
        """Yield FindDuplicates' progress, then each group, then the summary, as they arrive.

        timeout_s bounds the whole stream; by default there is no deadline, as for ingest streams.
        Raises ValueError for criteria that the request cannot carry, and ClientError when the call fails.
        Closing the iterator early cancels the call.
        """
        request = _find_duplicates_request(criteria or DuplicateCriteria())
        responses = self._stub.FindDuplicates(request, timeout=timeout_s)
        try:
            for response in responses:
                event = _duplicates_event_from_proto(response)
                if event is not None:
                    yield event
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error) from None
        finally:
            responses.cancel()


    def remove_items(self, item_ids: Iterable[str]) -> RemoveOutcome:
        """Remove items by item_id; item_ids that name no stored item are reported, not raised.

        Raises ValueError for no item_ids, and ClientError when the call fails. Removal is
        idempotent, so a call that failed with UNAVAILABLE or DEADLINE_EXCEEDED can be repeated.
        """
        request = index_service_pb2.RemoveItemsRequest(item_ids=list(item_ids))
        if not request.item_ids:
            raise ValueError("give at least one item_id to remove")
        try:
            response = self._stub.RemoveItems(request, timeout=self._timeout_s)
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error) from None
        return RemoveOutcome(
            removed_count=response.removed_count, not_found_item_ids=tuple(response.not_found_item_ids)
        )

    def update_metadata(
        self,
        item_id: str,
        set_values: Mapping[str, str] | None = None,
        remove_keys: Iterable[str] = (),
        replace: bool = False,
    ) -> dict[str, str]:
        """Set and remove metadata keys of one item, or with replace, make set_values its whole metadata.

        Returns the item's metadata after the change. Raises ClientError: NOT_FOUND for an unknown
        item_id, INVALID_ARGUMENT for a key in both set_values and remove_keys or remove_keys with
        replace, RESOURCE_EXHAUSTED above the server's limits.
        """
        request = index_service_pb2.UpdateMetadataRequest(
            item_id=item_id, set=dict(set_values or {}), remove_keys=list(remove_keys), replace=replace
        )
        try:
            response = self._stub.UpdateMetadata(request, timeout=self._timeout_s)
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error) from None
        return dict(response.metadata)


# How often the threads of an ingest stream check whether the call has ended while they wait.
_INGEST_POLL_S = 0.2
# The slot that ends an ingest stream's items.
_END_OF_ITEMS = object()
# The slot of an item that was sent, whose outcome is the next response.
_SENT = object()


@dataclasses.dataclass(frozen=True)
class _ItemsFailed:
    """The slot after the last item sent, when iterating the caller's items raised `error`."""

    error: Exception


class _IngestRequests:
    """The request side of one ingest stream.

    requests() runs on gRPC's sending thread. For each item, in order, it puts a slot on a queue:
    _SENT for an item sent to the server, the outcome of an item rejected before sending,
    _ItemsFailed when the items raised, and finally _END_OF_ITEMS. The caller reads the slots in the
    same order, so local outcomes and server responses come back in item order.
    """

    def __init__(self, items: Iterable[IngestItem], max_message_bytes: int, max_in_flight: int):
        self._items = items
        self._max_message_bytes = max_message_bytes
        self._window = threading.Semaphore(max_in_flight)
        self._finished = threading.Event()
        self._slots: queue.Queue = queue.Queue()

    def requests(self) -> Iterator[index_service_pb2.IngestImagesRequest]:
        try:
            iterator = iter(self._items)
            while self._wait_for_window():
                item = next(iterator, _END_OF_ITEMS)
                if item is _END_OF_ITEMS:
                    break
                request = _ingest_request(item)
                size = request.ByteSize()
                if size > self._max_message_bytes:
                    self._slots.put(_too_large_outcome(item, size, self._max_message_bytes))
                    continue
                self._slots.put(_SENT)
                yield request
        except Exception as error:  # noqa: BLE001 - the caller's thread raises it, after earlier outcomes
            self._slots.put(_ItemsFailed(error))
            return
        self._slots.put(_END_OF_ITEMS)

    def next_slot(self, responses) -> object:
        """Return the next slot, or raise the call's error when the call ends before the slot comes."""
        while True:
            try:
                return self._slots.get(timeout=_INGEST_POLL_S)
            except queue.Empty:
                pass
            if responses.done():
                # Each slot is put before its request is sent, so every slot exists once the call has ended.
                try:
                    return self._slots.get_nowait()
                except queue.Empty:
                    next(responses, None)  # raises the call's error, if it failed
                    raise ClientError("INTERNAL", "the server ended the ingest stream before every item was sent")

    def release_slot(self) -> None:
        self._window.release()

    def finish(self) -> None:
        self._finished.set()

    def _wait_for_window(self) -> bool:
        """Wait until another item may be in flight; return False when the call has ended meanwhile."""
        while not self._window.acquire(timeout=_INGEST_POLL_S):
            if self._finished.is_set():
                return False
        return not self._finished.is_set()


def _next_response(
    responses: Iterator[index_service_pb2.IngestImagesResponse],
) -> index_service_pb2.IngestImagesResponse:
    response = next(responses, None)
    if response is None:
        raise ClientError("INTERNAL", "the server ended the ingest stream before it sent a response for every item")
    return response


def _too_large_outcome(item: IngestItem, size: int, max_message_bytes: int) -> IngestOutcome:
    return IngestOutcome(
        item_id="",
        status="failed",
        uri=item.uri,
        error_code="RESOURCE_EXHAUSTED",
        error_message=(
            f"the request for this item is {size} bytes, above the client's message limit of "
            f"{max_message_bytes} bytes, so it was not sent; send a smaller image, or raise "
            "max_message_bytes on the client and the server"
        ),
    )


def check_health(
    addr: str, service: str = "", timeout_s: float = 5.0, *, credentials: grpc.ChannelCredentials | None = None
) -> str:
    """Return the health status name (for example "SERVING") that the server at addr reports.

    credentials are needed for a server with TLS. Health checks need no token.
    """
    with open_channel(addr, [], credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error) from None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def _search_request(image, embedding, item_id, text, k, min_score) -> index_service_pb2.SearchRequest:
    given = [value is not None for value in (image, embedding, item_id, text)]
    if sum(given) != 1:
        raise ValueError("search needs exactly one of image, embedding, item_id or text")
    request = index_service_pb2.SearchRequest(k=k)
    if image is not None:
        request.image = image
    elif embedding is not None:
        request.embedding.CopyFrom(common_pb2.Embedding(values=list(embedding)))
    elif item_id is not None:
        request.item_id = item_id
    else:
        request.text = text
    if min_score is not None:
        request.min_score = min_score
    return request


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value and value not in choices:
        raise ValueError(f"{field} must be one of {', '.join(choices)} or empty, got {value!r}")


def _ingest_request(item: IngestItem) -> index_service_pb2.IngestImagesRequest:
    request = index_service_pb2.IngestImagesRequest(item_id=item.item_id, uri=item.uri, metadata=dict(item.metadata))
    if item.embedding is not None:
        request.embedding.CopyFrom(common_pb2.Embedding(values=list(item.embedding), model_id=item.model_id))
    else:
        request.image = item.image
    if item.on_duplicate:
        request.on_duplicate = index_service_pb2.OnDuplicate.Value("ON_DUPLICATE_" + item.on_duplicate.upper())
    if item.duplicate_match:
        request.duplicate_match = index_service_pb2.MatchKind.Value(_MATCH_KIND_PREFIX + item.duplicate_match.upper())
    return request


def _outcome_from_proto(response: index_service_pb2.IngestImagesResponse) -> IngestOutcome:
    failed = response.status == index_service_pb2.INGEST_STATUS_FAILED
    duplicate_match = ""
    if response.duplicate_of_item_id:
        duplicate_match = _group_kind(response.duplicate_match)
    return IngestOutcome(
        item_id=response.item_id,
        status=_STATUS_NAMES.get(response.status, "unknown"),
        uri=response.uri,
        error_code=response.error.code_name if failed else "",
        error_message=response.error.message if failed else "",
        duplicate_of_item_id=response.duplicate_of_item_id,
        duplicate_match=duplicate_match,
    )


def _neighbour_from_proto(neighbour: index_service_pb2.Neighbour) -> Neighbour:
    return Neighbour(
        item_id=neighbour.item_id,
        score=neighbour.score,
        uri=neighbour.uri,
        metadata=dict(neighbour.metadata),
        width=neighbour.width,
        height=neighbour.height,
        sha256=neighbour.sha256,
        match=_group_kind(neighbour.match),
        phash_distance=neighbour.phash_distance if neighbour.HasField("phash_distance") else None,
        local_difference=neighbour.local_difference if neighbour.HasField("local_difference") else None,
    )


def _find_duplicates_request(criteria: DuplicateCriteria) -> index_service_pb2.FindDuplicatesRequest:
    unknown = [kind for kind in criteria.kinds if kind not in DUPLICATE_KINDS]
    if unknown:
        raise ValueError(f"unknown duplicate kind {unknown[0]!r}; expected one of {', '.join(DUPLICATE_KINDS)}")
    _check_uint32("k", criteria.k)
    request = index_service_pb2.FindDuplicatesRequest(
        kinds=[index_service_pb2.MatchKind.Value(_MATCH_KIND_PREFIX + kind.upper()) for kind in criteria.kinds],
        k=criteria.k,
    )
    if criteria.min_similar_score is not None:
        request.min_similar_score = criteria.min_similar_score
    if criteria.item_filter is not None:
        request.filter.CopyFrom(criteria.item_filter.to_proto())

    policy = request.near_duplicate_policy
    if criteria.max_phash_distance is not None:
        _check_uint32("max_phash_distance", criteria.max_phash_distance)
        policy.max_phash_distance = criteria.max_phash_distance
    if criteria.max_local_difference is not None:
        policy.max_local_difference = criteria.max_local_difference
    if criteria.min_score is not None:
        policy.min_score = criteria.min_score
    return request


def _check_uint32(name: str, value: int) -> None:
    if not 0 <= value <= _UINT32_MAX:
        raise ValueError(f"{name} must be from 0 to {_UINT32_MAX}, got {value}")


def _duplicates_event_from_proto(response: index_service_pb2.FindDuplicatesResponse) -> DuplicatesEvent | None:
    """Convert one stream message. A message with no event set, as a newer server might send, gives None."""
    event = response.WhichOneof("event")
    if event == "progress":
        return DuplicatesProgress(items_done=response.progress.items_done, item_count=response.progress.item_count)
    if event == "group":
        return DuplicateGroup(
            kind=_group_kind(response.group.kind),
            members=tuple(_member_from_proto(member) for member in response.group.members),
        )
    if event == "summary":
        return DuplicatesSummary(
            item_count=response.summary.item_count,
            group_counts={_kind_name(name): count for name, count in response.summary.group_counts.items()},
            grouped_item_count=response.summary.grouped_item_count,
        )
    return None


def _group_kind(match_kind: int) -> str:
    """Name a group's MatchKind. A number that this client does not know, from a newer server, stays visible."""
    if match_kind not in index_service_pb2.MatchKind.values():
        return f"unknown ({match_kind})"
    return _kind_name(index_service_pb2.MatchKind.Name(match_kind))


def _kind_name(match_kind_name: str) -> str:
    """Turn a MatchKind name such as "MATCH_KIND_EXACT" into the client's kind, "exact"."""
    return match_kind_name.removeprefix(_MATCH_KIND_PREFIX).lower()


def _member_from_proto(member: index_service_pb2.DuplicateMember) -> DuplicateMember:
    return DuplicateMember(
        item_id=member.item_id,
        uri=member.uri,
        score=member.score,
        phash_distance=member.phash_distance if member.HasField("phash_distance") else None,
        local_difference=member.local_difference if member.HasField("local_difference") else None,
        width=member.width,
        height=member.height,
    )
