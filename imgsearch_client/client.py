"""A thin client for the index service: ingest streams, search and stats, with plain Python types."""

import dataclasses
import threading
from collections.abc import Iterable, Iterator, Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imgsearch.common.v1 import common_pb2
from imgsearch.index.v1 import index_service_pb2, index_service_pb2_grpc
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
    """One image to ingest: its bytes and optional item_id, uri and metadata."""

    image: bytes
    item_id: str = ""
    uri: str = ""
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class IngestOutcome:
    """The result for one ingested image; error_code and error_message are set when it failed."""

    item_id: str
    status: str
    uri: str
    error_code: str = ""
    error_message: str = ""

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


_STATUS_NAMES = {
    index_service_pb2.INGEST_STATUS_ADDED: "added",
    index_service_pb2.INGEST_STATUS_ALREADY_PRESENT: "already_present",
    index_service_pb2.INGEST_STATUS_FAILED: "failed",
}


class IndexClient:
    """Client of one index service. Use as a context manager, or call close()."""

    def __init__(self, addr: str, timeout_s: float = 30.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self._timeout_s = timeout_s
        self._channel = grpc.insecure_channel(addr, options=message_size_options(max_message_bytes))
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
        """
        window = threading.Semaphore(max_in_flight)
        finished = threading.Event()

        def requests():
            for item in items:
                # Wake up now and then, so that the sending thread ends when the call has ended.
                while not window.acquire(timeout=0.2):
                    if finished.is_set():
                        return
                yield index_service_pb2.IngestImagesRequest(
                    image=item.image, item_id=item.item_id, uri=item.uri, metadata=dict(item.metadata)
                )

        try:
            for response in self._stub.IngestImages(requests(), timeout=timeout_s):
                window.release()
                yield _outcome_from_proto(response)
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error) from None
        finally:
            finished.set()

    def search(
        self,
        *,
        image: bytes | None = None,
        embedding: Iterable[float] | None = None,
        item_id: str | None = None,
        k: int = 10,
        min_score: float | None = None,
    ) -> list[Neighbour]:
        """Return the neighbours of exactly one query: image bytes, an embedding or a stored item_id."""
        request = _search_request(image, embedding, item_id, k, min_score)
        try:
            response = self._stub.Search(request, timeout=self._timeout_s)
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error) from None
        return [_neighbour_from_proto(neighbour) for neighbour in response.neighbours]

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
        }


def check_health(addr: str, service: str = "", timeout_s: float = 5.0) -> str:
    """Return the health status name (for example "SERVING") that the server at addr reports."""
    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error) from None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def _search_request(image, embedding, item_id, k, min_score) -> index_service_pb2.SearchRequest:
    given = [value is not None for value in (image, embedding, item_id)]
    if sum(given) != 1:
        raise ValueError("search needs exactly one of image, embedding or item_id")
    request = index_service_pb2.SearchRequest(k=k)
    if image is not None:
        request.image = image
    elif embedding is not None:
        request.embedding.CopyFrom(common_pb2.Embedding(values=list(embedding)))
    else:
        request.item_id = item_id
    if min_score is not None:
        request.min_score = min_score
    return request


def _outcome_from_proto(response: index_service_pb2.IngestImagesResponse) -> IngestOutcome:
    failed = response.status == index_service_pb2.INGEST_STATUS_FAILED
    return IngestOutcome(
        item_id=response.item_id,
        status=_STATUS_NAMES.get(response.status, "unknown"),
        uri=response.uri,
        error_code=response.error.code_name if failed else "",
        error_message=response.error.message if failed else "",
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
    )
