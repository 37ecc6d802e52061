"""The gRPC edge of the embed service: streams images into batches and embeddings back out, and embeds text."""

import math
import time

import grpc
import numpy as np
import structlog

from embed_service.analysis import AnalysedImage, ImageAnalyser
from embed_service.backends.base import Embedder
from imgsearch.common.v1 import common_pb2
from imgsearch.embed.v1 import embed_service_pb2, embed_service_pb2_grpc
from imgsearch_common import grpc_errors
from imgsearch_common.errors import InvalidInputError
from imgsearch_common.fingerprints import Fingerprint
from imgsearch_common.serving import remaining_seconds
from imgsearch_common.streams import RequestBatcher

log = structlog.get_logger(__name__)

SERVICE_NAME = embed_service_pb2.DESCRIPTOR.services_by_name["EmbedService"].full_name
# Maximum size of one text in UTF-8 bytes. CLIP reads at most 75 tokens, a few hundred bytes of English.
# The limit leaves room for scripts that take more bytes a token, and bounds the tokenizer's work.
MAX_TEXT_BYTES = 4096


class EmbedServicer(embed_service_pb2_grpc.EmbedServiceServicer):
    """Serves EmbedImages, EmbedText and GetModelInfo over one embedder."""

    def __init__(self, embedder: Embedder, batch_size: int, analyser: ImageAnalyser | None = None):
        self._embedder = embedder
        self._batch_size = batch_size
        self._analyser = analyser or ImageAnalyser()

    def EmbedImages(self, request_iterator, context):
        reader = RequestBatcher(request_iterator, max_buffered=2 * self._batch_size, name="embed-reader")
        try:
            while (batch := reader.next_batch(self._batch_size)) is not None:
                yield from self._embed_batch(batch, context)
        except Exception:
            # Per-item errors never reach this point, so this is a bug and the stream ends as INTERNAL.
            log.exception("embed_stream_failed_unexpectedly")
            context.abort(grpc.StatusCode.INTERNAL, "internal error; the server logged the details")
        finally:
            reader.close()

    @grpc_errors.abort_on_error
    def EmbedText(self, request, context):
        _check_text(request.text)
        vector = self._embedder.embed_text(request.text, remaining_seconds(context, math.inf))
        # After the embedding, as for images: the Inference backend learns its dim from the first one.
        model_id = self._embedder.info().model_id
        return embed_service_pb2.EmbedTextResponse(
            embedding=common_pb2.Embedding(values=vector.tolist(), model_id=model_id)
        )

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
        analysed = self._analyser.analyse([request.image for request in batch])
        results, model_id = self._embed_analysed(analysed, remaining_seconds(context, math.inf))

        item_errors: dict[int, common_pb2.ItemError] = {}
        responses = []
        for request, analysis, result in zip(batch, analysed, results, strict=True):
            response = embed_service_pb2.EmbedImagesResponse(correlation_id=request.correlation_id)
            if isinstance(result, np.ndarray):
                response.embedding.values.extend(result.tolist())
                response.embedding.model_id = model_id
                response.fingerprint.CopyFrom(_fingerprint_message(analysis.fingerprint))
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

    def _embed_analysed(
        self, analysed: list[AnalysedImage | Exception], timeout_s: float
    ) -> tuple[list[np.ndarray | BaseException], str]:
        """Return one vector or exception per image, and the model_id of the vectors."""
        results: list[np.ndarray | BaseException] = list(analysed)
        positions = [index for index, analysis in enumerate(analysed) if isinstance(analysis, AnalysedImage)]
        if not positions:
            return results, ""

        try:
            embedded = self._embedder.embed_images([analysed[index].decoded for index in positions], timeout_s)
            # info() runs only after a success, because the Inference backend learns its dim from the
            # first embedding and would otherwise send a probe request.
            model_id = self._embedder.info().model_id if _any_vector(embedded) else ""
        except Exception as error:  # noqa: BLE001 - every item gets the error, mapped by grpc_errors
            embedded, model_id = [error] * len(positions), ""
        for index, result in zip(positions, embedded, strict=True):
            results[index] = result
        return results, model_id


def _check_text(text: str) -> None:
    if not text.strip():
        raise InvalidInputError("text is empty or only whitespace; give the words to search for")
    size = len(text.encode("utf-8"))
    if size > MAX_TEXT_BYTES:
        raise InvalidInputError(
            f"text is {size} bytes in UTF-8, above the limit of {MAX_TEXT_BYTES} bytes; CLIP reads only "
            "its first 75 tokens, so send a shorter text"
        )


def _fingerprint_message(fingerprint: Fingerprint) -> common_pb2.ImageFingerprint:
    return common_pb2.ImageFingerprint(
        version=fingerprint.version,
        pixel_sha256=fingerprint.pixel_sha256,
        phash=fingerprint.phash,
        width=fingerprint.width,
        height=fingerprint.height,
        layout=fingerprint.layout,
    )


def _any_vector(results: list) -> bool:
    return any(isinstance(result, np.ndarray) for result in results)
