"""The gRPC edge of the embed service: streams images into batches and embeddings back out."""

import math
import queue
import threading
import time
from collections.abc import Iterable, Iterator

import grpc
import numpy as np
import structlog

from embed_service.backends.base import Embedder
from imgsearch.common.v1 import common_pb2
from imgsearch.embed.v1 import embed_service_pb2, embed_service_pb2_grpc
from imgsearch_common import grpc_errors
from imgsearch_common.errors import InvalidInputError
from imgsearch_common.serving import remaining_seconds

log = structlog.get_logger(__name__)

SERVICE_NAME = embed_service_pb2.DESCRIPTOR.services_by_name["EmbedService"].full_name

_END_OF_STREAM = object()
# How often a reader blocked on a full queue checks whether the RPC has finished.
_PUT_POLL_S = 0.1


class EmbedServicer(embed_service_pb2_grpc.EmbedServiceServicer):
    """Serves EmbedImages and GetModelInfo over one embedder."""

    def __init__(self, embedder: Embedder, batch_size: int):
        self._embedder = embedder
        self._batch_size = batch_size

    def EmbedImages(self, request_iterator, context):
        reader = _RequestReader(request_iterator, capacity=2 * self._batch_size)
        try:
            while (batch := reader.next_batch(self._batch_size)) is not None:
                yield from self._embed_batch(batch, context)
        except Exception:
            # Per-item errors never reach this point, so this is a bug and the stream ends as INTERNAL.
            log.exception("embed_stream_failed_unexpectedly")
            context.abort(grpc.StatusCode.INTERNAL, "internal error; the server logged the details")
        finally:
            reader.stop()

    @grpc_errors.abort_on_error
    def GetModelInfo(self, request, context):
        info = self._embedder.info()
        return embed_service_pb2.GetModelInfoResponse(
            model_id=info.model_id, dim=info.dim, backend=info.backend
        )

    def _embed_batch(
        self, batch: list[embed_service_pb2.EmbedImagesRequest], context: grpc.ServicerContext
    ) -> list[embed_service_pb2.EmbedImagesResponse]:
        started = time.monotonic()
        results, model_id = self._embed_requests(batch, remaining_seconds(context, math.inf))

        item_errors: dict[int, common_pb2.ItemError] = {}
        responses = []
        for request, result in zip(batch, results, strict=True):
            response = embed_service_pb2.EmbedImagesResponse(correlation_id=request.correlation_id)
            if isinstance(result, np.ndarray):
                response.embedding.values.extend(result.tolist())
                response.embedding.model_id = model_id
            else:
                # A batch-wide error is one object shared by every item, so it is converted and logged once.
                if id(result) not in item_errors:
                    item_errors[id(result)] = grpc_errors.item_error(result)
                response.error.CopyFrom(item_errors[id(result)])
            responses.append(response)

        failed = sum(1 for result in results if not isinstance(result, np.ndarray))
        log.debug(
            "embed_batch_finished", images=len(batch), failed=failed, duration_s=time.monotonic() - started
        )
        return responses

    def _embed_requests(
        self, batch: list[embed_service_pb2.EmbedImagesRequest], timeout_s: float
    ) -> tuple[list[np.ndarray | BaseException], str]:
        """Return one vector or exception per request, and the model_id of the vectors."""
        results: list[np.ndarray | BaseException] = [
            InvalidInputError("image is empty (0 bytes)") for _ in batch
        ]
        positions = [index for index, request in enumerate(batch) if request.image]
        if not positions:
            return results, ""

        try:
            embedded = self._embedder.embed_images([batch[index].image for index in positions], timeout_s)
            # info() runs only after a success, because the Inference backend learns its dim from the
            # first embedding and would otherwise send a probe request.
            model_id = self._embedder.info().model_id if _any_vector(embedded) else ""
        except Exception as error:  # noqa: BLE001 - every item gets the error, mapped by grpc_errors
            embedded, model_id = [error] * len(positions), ""
        for index, result in zip(positions, embedded, strict=True):
            results[index] = result
        return results, model_id


def _any_vector(results: list) -> bool:
    return any(isinstance(result, np.ndarray) for result in results)


class _RequestReader:
    """Reads a request stream on its own thread, so a batch holds only what has already arrived.

    A client that sends one image and waits gets its response without the server waiting for a
    full batch. The bounded queue stops reading ahead when embedding falls behind.
    """

    def __init__(self, requests: Iterable, capacity: int):
        self._queue: queue.Queue = queue.Queue(maxsize=capacity)
        self._stopped = threading.Event()
        self._ended = False
        self._thread = threading.Thread(
            target=self._read, args=(iter(requests),), name="embed-reader", daemon=True
        )
        self._thread.start()

    def next_batch(self, max_size: int) -> list | None:
        """Block for one request, then add those already queued, up to max_size. Return None at the end."""
        if self._ended:
            return None
        first = self._queue.get()
        if first is _END_OF_STREAM:
            self._ended = True
            return None

        batch = [first]
        while len(batch) < max_size:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _END_OF_STREAM:
                self._ended = True
                break
            batch.append(item)
        return batch

    def stop(self) -> None:
        """Let the reading thread finish. Requests that it has not handed out are dropped."""
        self._stopped.set()

    def _read(self, requests: Iterator) -> None:
        try:
            for request in requests:
                if not self._put(request):
                    return
        except grpc.RpcError as error:
            # The client cancelled or the call ended, so the stream stops here.
            log.debug("embed_request_stream_ended", error=str(error))
        finally:
            self._put(_END_OF_STREAM)

    def _put(self, item) -> bool:
        while not self._stopped.is_set():
            try:
                self._queue.put(item, timeout=_PUT_POLL_S)
                return True
            except queue.Full:
                continue
        return False
