"""The embedder that calls the embed service over gRPC."""

import re
from collections.abc import Sequence

import grpc
import numpy as np
import structlog

from imgsearch.common.v1 import common_pb2
from imgsearch.embed.v1 import embed_service_pb2, embed_service_pb2_grpc
from imgsearch_common import errors
from imgsearch_common.fingerprints import FINGERPRINT_VERSION, LAYOUT_BYTES, Fingerprint
from imgsearch_common.rpc_log import outgoing_metadata
from imgsearch_common.security import open_channel
from imgsearch_common.serving import message_size_options
from index_service.embedder import Embedding, ModelInfo

log = structlog.get_logger(__name__)

# Status codes of the embed service's per-item errors, mapped back to the domain exceptions that
# raised them there. Any other code means the embed service failed, so the item is unavailable.
_ERROR_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT.value[0]: errors.InvalidInputError,
    grpc.StatusCode.NOT_FOUND.value[0]: errors.NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS.value[0]: errors.AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION.value[0]: errors.FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]: errors.TooLargeError,
    grpc.StatusCode.UNAVAILABLE.value[0]: errors.UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED.value[0]: errors.DeadlineExceededError,
}
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")


class EmbedClient:
    """Embeds images and text with the embed service at address; safe to share between threads."""

    def __init__(
        self,
        address: str,
        max_message_bytes: int,
        credentials: grpc.ChannelCredentials | None = None,
        token: str = "",
    ):
        """Open the channel: TLS when credentials are given, and token as a bearer token on every call when set."""
        self.address = address
        self._channel = open_channel(address, message_size_options(max_message_bytes), credentials, token)
        self._stub = embed_service_pb2_grpc.EmbedServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def model_info(self, timeout_s: float) -> ModelInfo:
        """Return the embed service's model. Raises UnavailableError or DeadlineExceededError."""
        try:
            response = self._stub.GetModelInfo(
                embed_service_pb2.GetModelInfoRequest(), timeout=timeout_s, metadata=outgoing_metadata()
            )
        except grpc.RpcError as error:
            raise _call_error(error, "GetModelInfo") from error
        return ModelInfo(model_id=response.model_id, dim=response.dim, backend=response.backend)

    def embed_images(
        self, images: Sequence[bytes], timeout_s: float
    ) -> list[Embedding | errors.ImgsearchError]:
        """Embed images in one EmbedImages call with a deadline of timeout_s.

        Returns one Embedding or ImgsearchError per image, in order. When the call itself fails,
        every image without a response gets UnavailableError or DeadlineExceededError.
        """
        requests = [
            embed_service_pb2.EmbedImagesRequest(image=image, correlation_id=str(position))
            for position, image in enumerate(images)
        ]
        outputs: list[Embedding | errors.ImgsearchError] = []
        ignored_fingerprints: list[str] = []
        try:
            for response in self._stub.EmbedImages(iter(requests), timeout=timeout_s, metadata=outgoing_metadata()):
                if len(outputs) == len(images):
                    log.warning("embed_response_unexpected", images=len(images))
                    continue
                outputs.append(_output_of(response, str(len(outputs)), ignored_fingerprints))
        except grpc.RpcError as error:
            failure = _call_error(error, "EmbedImages")
            log.warning("embed_call_failed", code=error.code().name, images=len(images), received=len(outputs))
            outputs.extend(failure for _ in range(len(images) - len(outputs)))
            return outputs

        if ignored_fingerprints:
            # One line per call, not per image: a misconfigured embed service would send every image so.
            log.warning(
                "embed_fingerprints_ignored", count=len(ignored_fingerprints), first_reason=ignored_fingerprints[0]
            )
        if len(outputs) < len(images):
            log.warning("embed_responses_missing", images=len(images), received=len(outputs))
            failure = errors.UnavailableError(
                f"the embed service sent {len(outputs)} responses for {len(images)} images"
            )
            outputs.extend(failure for _ in range(len(images) - len(outputs)))
        return outputs


    def embed_text(self, text: str, timeout_s: float) -> Embedding:
        """Embed text in one EmbedText call with a deadline of timeout_s.

        Raises the domain error of the call's status (see _text_call_error).
        """
        try:
            response = self._stub.EmbedText(
                embed_service_pb2.EmbedTextRequest(text=text), timeout=timeout_s, metadata=outgoing_metadata()
            )
        except grpc.RpcError as error:
            raise _text_call_error(error) from error
        vector = np.asarray(response.embedding.values, dtype=np.float32)
        return Embedding(vector=vector, model_id=response.embedding.model_id)


def item_error_to_exception(code: int, code_name: str, message: str) -> errors.ImgsearchError:
    """Convert a per-item error from the embed service into the matching domain exception."""
    error_type = _ERROR_BY_CODE.get(code, errors.UnavailableError)
    return error_type(f"the embed service rejected the image with {code_name}: {message}")


def fingerprint_of(message: common_pb2.ImageFingerprint) -> Fingerprint:
    """Convert a fingerprint sent by the embed service into a Fingerprint.

    Raises ValueError naming the problem when its version is not FINGERPRINT_VERSION, the only
    one this server can compare, or when a field is malformed.
    """
    if message.version != FINGERPRINT_VERSION:
        raise ValueError(f"fingerprint version {message.version} is not the supported {FINGERPRINT_VERSION}")
    if not _HEX_SHA256.fullmatch(message.pixel_sha256):
        raise ValueError(f"pixel_sha256 {message.pixel_sha256[:80]!r} is not 64 lowercase hex digits")
    if len(message.layout) != LAYOUT_BYTES:
        raise ValueError(f"layout has {len(message.layout)} bytes, expected {LAYOUT_BYTES}")
    return Fingerprint(
        version=message.version,
        pixel_sha256=message.pixel_sha256,
        phash=message.phash,
        width=message.width,
        height=message.height,
        layout=message.layout,
    )


def _output_of(
    response: embed_service_pb2.EmbedImagesResponse, expected_correlation_id: str, ignored_fingerprints: list[str]
) -> Embedding | errors.ImgsearchError:
    if response.correlation_id != expected_correlation_id:
        return errors.UnavailableError(
            f"the embed service sent responses out of order: expected correlation_id "
            f"{expected_correlation_id!r}, got {response.correlation_id!r}"
        )
    result = response.WhichOneof("result")
    if result == "error":
        error = response.error
        return item_error_to_exception(error.code, error.code_name, error.message)
    if result == "embedding":
        vector = np.asarray(response.embedding.values, dtype=np.float32)
        return Embedding(
            vector=vector,
            model_id=response.embedding.model_id,
            fingerprint=_checked_fingerprint(response, ignored_fingerprints),
        )
    return errors.UnavailableError("the embed service sent a response with neither an embedding nor an error")


def _checked_fingerprint(
    response: embed_service_pb2.EmbedImagesResponse, ignored_fingerprints: list[str]
) -> Fingerprint | None:
    """Return the response's fingerprint, or None when it has none or one that cannot be used.

    An unusable fingerprint is recorded in ignored_fingerprints and the image is stored without
    one, as from an embed service older than fingerprints: it never counts as an exact or near
    duplicate.
    """
    if not response.HasField("fingerprint"):
        return None
    try:
        return fingerprint_of(response.fingerprint)
    except ValueError as error:
        ignored_fingerprints.append(str(error))
        return None


def _text_call_error(error: grpc.RpcError) -> errors.ImgsearchError:
    """Convert a failed EmbedText call into the domain error of its status.

    The statuses that name a problem of the text or of the embed service's model keep their
    meaning. UNIMPLEMENTED, from an embed service without EmbedText, is FailedPreconditionError,
    and any other status is UnavailableError.
    """
    code = error.code()
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return errors.DeadlineExceededError("the embed service did not respond to EmbedText before the deadline")
    if code is grpc.StatusCode.UNIMPLEMENTED:
        return errors.FailedPreconditionError(
            "the embed service does not implement EmbedText; run an embed service version with text search"
        )
    error_type = _ERROR_BY_CODE.get(code.value[0], errors.UnavailableError)
    return error_type(f"the embed service call EmbedText failed with {code.name}: {error.details()}")


def _call_error(error: grpc.RpcError, method: str) -> errors.ImgsearchError:
    code = error.code()
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return errors.DeadlineExceededError(f"the embed service did not respond to {method} before the deadline")
    return errors.UnavailableError(f"the embed service call {method} failed with {code.name}: {error.details()}")
