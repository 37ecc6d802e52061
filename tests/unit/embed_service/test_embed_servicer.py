"""Tests of EmbedServicer with a recording fake embedder and a fake servicer context."""

import math
import queue
import threading

import grpc
import numpy as np
import pytest

from embed_service.analysis import AnalysedImage
from embed_service.backends.base import ModelInfo
from embed_service.servicer import MAX_TEXT_BYTES, EmbedServicer
from imgsearch.embed.v1 import embed_service_pb2
from imgsearch_common.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    ImgsearchError,
    InvalidInputError,
    UnavailableError,
)
from imgsearch_common.fingerprints import LAYOUT_BYTES, Fingerprint
from imgsearch_common.images import DecodedImage

_DIM = 4


class FakeEmbedder:
    """Embeds b"vN" as the unit vector along axis N % dim, and b"bad" as an InvalidInputError.

    A text is embedded as the unit vector along axis len(text) % dim. Set `failure` to make
    embed_images and embed_text raise it, or drop_last_result to break its contract. Every call's
    images or text and timeout are recorded.
    """

    def __init__(self):
        self.calls: list[tuple[list[DecodedImage], float]] = []
        self.text_calls: list[tuple[str, float]] = []
        self.failure: Exception | None = None
        self.info_failure: Exception | None = None
        self.drop_last_result = False

    def info(self) -> ModelInfo:
        if self.info_failure:
            raise self.info_failure
        return ModelInfo(model_id="fake-model", dim=_DIM, backend="fake")

    def embed_images(self, images: list[DecodedImage], timeout_s: float) -> list[np.ndarray | ImgsearchError]:
        self.calls.append((list(images), timeout_s))
        if self.failure:
            raise self.failure
        results = [self._embed(image) for image in images]
        return results[:-1] if self.drop_last_result else results

    def embed_text(self, text: str, timeout_s: float) -> np.ndarray:
        self.text_calls.append((text, timeout_s))
        if self.failure:
            raise self.failure
        vector = np.zeros(_DIM, dtype=np.float32)
        vector[len(text) % _DIM] = 1.0
        return vector

    def check_ready(self) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def _embed(image: DecodedImage) -> np.ndarray | ImgsearchError:
        image = image.data
        if image == b"bad":
            return InvalidInputError("image format not recognised")
        vector = np.zeros(_DIM, dtype=np.float32)
        vector[int(image[1:]) % _DIM] = 1.0
        return vector


class FakeAnalyser:
    """Passes b"vN" and b"bad" through undecoded, with a fixed fingerprint; empty bytes are invalid."""

    FINGERPRINT = Fingerprint(
        version=1, pixel_sha256="0" * 64, phash=7, width=2, height=1, layout=b"\x00" * LAYOUT_BYTES
    )

    def analyse(self, images: list[bytes]) -> list[AnalysedImage | ImgsearchError]:
        return [self._analyse_one(image) for image in images]

    def _analyse_one(self, image: bytes) -> AnalysedImage | ImgsearchError:
        if not image:
            return InvalidInputError("image is empty (0 bytes)")
        decoded = DecodedImage(data=image, picture=None, had_transparency=False)
        return AnalysedImage(decoded=decoded, fingerprint=self.FINGERPRINT)


def _servicer(embedder, batch_size: int) -> EmbedServicer:
    return EmbedServicer(embedder, batch_size=batch_size, analyser=FakeAnalyser())


class AbortedError(Exception):
    """Raised by FakeContext.abort, as grpc raises after context.abort()."""


class FakeContext:
    """The parts of grpc.ServicerContext that the servicer uses."""

    def __init__(self, time_remaining: float | None = None):
        self._time_remaining = time_remaining
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def time_remaining(self) -> float | None:
        return self._time_remaining

    def abort(self, code: grpc.StatusCode, details: str):
        self.aborted = (code, details)
        raise AbortedError(details)

    def code(self):
        return self.aborted[0] if self.aborted else None


def _request(image: bytes, correlation_id: str) -> embed_service_pb2.EmbedImagesRequest:
    return embed_service_pb2.EmbedImagesRequest(image=image, correlation_id=correlation_id)


def _images(count: int) -> list[embed_service_pb2.EmbedImagesRequest]:
    return [_request(f"v{index}".encode(), f"id-{index}") for index in range(count)]


@pytest.fixture
def embedder():
    return FakeEmbedder()


def test_embed_images_order_and_ids(embedder):
    servicer = _servicer(embedder, batch_size=3)

    responses = list(servicer.EmbedImages(iter(_images(10)), FakeContext()))

    assert [response.correlation_id for response in responses] == [f"id-{index}" for index in range(10)]
    for index, response in enumerate(responses):
        assert response.WhichOneof("result") == "embedding"
        assert response.embedding.model_id == "fake-model"
        assert response.fingerprint.phash == FakeAnalyser.FINGERPRINT.phash
        assert list(response.embedding.values) == [
            1.0 if axis == index % _DIM else 0.0 for axis in range(_DIM)
        ]


def test_embed_images_batches_bounded(embedder):
    servicer = _servicer(embedder, batch_size=4)

    list(servicer.EmbedImages(iter(_images(19)), FakeContext()))

    sizes = [len(images) for images, _ in embedder.calls]
    assert sum(sizes) == 19
    assert max(sizes) <= 4


def test_embed_images_responds_before_full_batch(embedder):
    # The client sends the second image only after the first response, as an interactive caller does.
    servicer = _servicer(embedder, batch_size=16)
    first_answered = threading.Event()

    def requests():
        yield _request(b"v1", "first")
        assert first_answered.wait(timeout=5), "the first image got no response before a full batch"
        yield _request(b"v2", "second")

    responses = servicer.EmbedImages(requests(), FakeContext())
    first = next(responses)
    first_answered.set()
    rest = list(responses)

    assert first.correlation_id == "first"
    assert [response.correlation_id for response in rest] == ["second"]


def test_embed_images_bad_item_in_middle(embedder):
    servicer = _servicer(embedder, batch_size=8)
    requests = [_request(b"v0", "a"), _request(b"bad", "b"), _request(b"v2", "c")]

    responses = list(servicer.EmbedImages(iter(requests), FakeContext()))

    assert [response.WhichOneof("result") for response in responses] == ["embedding", "error", "embedding"]
    assert responses[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert responses[1].error.code_name == "INVALID_ARGUMENT"
    assert "not recognised" in responses[1].error.message


def test_embed_images_empty_image_invalid(embedder):
    servicer = _servicer(embedder, batch_size=8)
    requests = [_request(b"v0", "a"), _request(b"", "empty"), _request(b"v2", "c")]

    responses = list(servicer.EmbedImages(iter(requests), FakeContext()))

    assert responses[1].error.code_name == "INVALID_ARGUMENT"
    assert responses[1].error.message == "image is empty (0 bytes)"
    assert all(b"" not in images for images, _ in embedder.calls)
    assert responses[2].WhichOneof("result") == "embedding"


def test_embed_images_only_empty_images(embedder):
    servicer = _servicer(embedder, batch_size=8)

    responses = list(servicer.EmbedImages(iter([_request(b"", "x")]), FakeContext()))

    assert responses[0].error.code_name == "INVALID_ARGUMENT"
    assert embedder.calls == []


def test_embed_images_all_bad_skips_info(embedder):
    # Like the Inference backend before its first embedding: info() would fail, but is not needed.
    embedder.info_failure = UnavailableError("dim not learned yet")
    servicer = _servicer(embedder, batch_size=8)

    responses = list(
        servicer.EmbedImages(iter([_request(b"bad", "x"), _request(b"bad", "y")]), FakeContext())
    )

    assert [response.error.code_name for response in responses] == ["INVALID_ARGUMENT", "INVALID_ARGUMENT"]


def test_embed_images_backend_down_unavailable(embedder):
    embedder.failure = UnavailableError("the Inference server is down")
    servicer = _servicer(embedder, batch_size=2)

    responses = list(servicer.EmbedImages(iter(_images(5)), FakeContext()))

    assert len(responses) == 5
    assert {response.error.code_name for response in responses} == {"UNAVAILABLE"}
    assert {response.error.message for response in responses} == {"the Inference server is down"}


def test_embed_images_backend_bug_internal(embedder):
    embedder.failure = RuntimeError("index out of range in the backend")
    servicer = _servicer(embedder, batch_size=8)

    responses = list(servicer.EmbedImages(iter(_images(2)), FakeContext()))

    assert [response.error.code_name for response in responses] == ["INTERNAL", "INTERNAL"]
    assert "index out of range" not in responses[0].error.message


def test_embed_images_contract_bug_aborts_internal(embedder):
    embedder.drop_last_result = True
    servicer = _servicer(embedder, batch_size=8)
    context = FakeContext()

    with pytest.raises(AbortedError):
        list(servicer.EmbedImages(iter(_images(2)), context))

    assert context.aborted[0] is grpc.StatusCode.INTERNAL


def test_embed_images_cancelled_stream_ends(embedder):
    def cancelled_after_two():
        yield from _images(2)
        raise grpc.RpcError("the client cancelled the call")

    servicer = _servicer(embedder, batch_size=8)

    responses = list(servicer.EmbedImages(cancelled_after_two(), FakeContext()))

    assert [response.correlation_id for response in responses] == ["id-0", "id-1"]


def test_embed_images_passes_remaining_time(embedder):
    servicer = _servicer(embedder, batch_size=8)

    list(servicer.EmbedImages(iter(_images(1)), FakeContext(time_remaining=2.5)))
    list(servicer.EmbedImages(iter(_images(1)), FakeContext(time_remaining=None)))

    assert embedder.calls[0][1] == 2.5
    assert embedder.calls[1][1] == math.inf


def test_embed_images_empty_stream(embedder):
    servicer = _servicer(embedder, batch_size=8)

    assert list(servicer.EmbedImages(iter([]), FakeContext())) == []


def test_embed_images_closed_generator_stops_reader(embedder):
    # A cancelled RPC closes the response generator. The reader must not stay blocked on a full queue.
    servicer = _servicer(embedder, batch_size=1)
    requests: queue.Queue = queue.Queue()
    for request in _images(10):
        requests.put(request)

    def endless():
        while True:
            yield requests.get(timeout=5)

    threads_before = set(threading.enumerate())
    responses = servicer.EmbedImages(endless(), FakeContext())
    next(responses)
    [reader] = [
        thread for thread in set(threading.enumerate()) - threads_before if thread.name == "embed-reader"
    ]
    responses.close()

    reader.join(timeout=2)
    assert not reader.is_alive()
    assert not requests.empty()  # the reader stopped early instead of draining the stream


def test_get_model_info(embedder):
    servicer = _servicer(embedder, batch_size=8)

    response = servicer.GetModelInfo(embed_service_pb2.GetModelInfoRequest(), FakeContext())

    assert response.model_id == "fake-model"
    assert response.dim == _DIM
    assert response.backend == "fake"


def test_get_model_info_unavailable(embedder):
    embedder.info_failure = UnavailableError("ONNX model not found: models/x/visual.onnx does not exist")
    servicer = _servicer(embedder, batch_size=8)
    context = FakeContext()

    with pytest.raises(AbortedError):
        servicer.GetModelInfo(embed_service_pb2.GetModelInfoRequest(), context)

    assert context.aborted == (
        grpc.StatusCode.UNAVAILABLE,
        "ONNX model not found: models/x/visual.onnx does not exist",
    )


def _embed_text(servicer: EmbedServicer, text: str, context: FakeContext | None = None):
    return servicer.EmbedText(embed_service_pb2.EmbedTextRequest(text=text), context or FakeContext())


def test_embed_text_vector_and_model_id(embedder):
    servicer = _servicer(embedder, batch_size=8)

    response = _embed_text(servicer, "a dog")

    assert response.embedding.model_id == "fake-model"
    # The fake embeds "a dog", 5 characters, along axis 5 % 4.
    assert list(response.embedding.values) == [0.0, 1.0, 0.0, 0.0]
    assert embedder.text_calls == [("a dog", math.inf)]


def test_embed_text_passes_remaining_time(embedder):
    servicer = _servicer(embedder, batch_size=8)

    _embed_text(servicer, "a dog", FakeContext(time_remaining=1.5))

    assert embedder.text_calls == [("a dog", 1.5)]


@pytest.mark.parametrize("text", ["", " ", "\t\n  "])
def test_embed_text_empty_invalid_argument(embedder, text):
    servicer = _servicer(embedder, batch_size=8)
    context = FakeContext()

    with pytest.raises(AbortedError):
        _embed_text(servicer, text, context)

    assert context.aborted[0] is grpc.StatusCode.INVALID_ARGUMENT
    assert "text is empty or only whitespace" in context.aborted[1]
    assert embedder.text_calls == []


def test_embed_text_at_byte_limit_embedded(embedder):
    servicer = _servicer(embedder, batch_size=8)
    text = "é" * (MAX_TEXT_BYTES // 2)

    _embed_text(servicer, text)

    assert len(text.encode("utf-8")) == MAX_TEXT_BYTES == 4096
    assert embedder.text_calls == [(text, math.inf)]


@pytest.mark.parametrize("text", ["a" * 4097, "é" * 2048 + "a", "🐶" * 1025])
def test_embed_text_over_byte_limit_invalid_argument(embedder, text):
    servicer = _servicer(embedder, batch_size=8)
    context = FakeContext()

    with pytest.raises(AbortedError):
        _embed_text(servicer, text, context)

    assert context.aborted[0] is grpc.StatusCode.INVALID_ARGUMENT
    assert f"text is {len(text.encode())} bytes in UTF-8, above the limit of 4096 bytes" in context.aborted[1]
    assert embedder.text_calls == []


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (FailedPreconditionError("text search needs the text model m/textual.onnx"), grpc.StatusCode.FAILED_PRECONDITION),
        (UnavailableError("the Inference server returned HTTP 500"), grpc.StatusCode.UNAVAILABLE),
        (DeadlineExceededError("the deadline ran out"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (InvalidInputError("the Inference server rejected the text"), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_embed_text_backend_error_status(embedder, failure, code):
    embedder.failure = failure
    servicer = _servicer(embedder, batch_size=8)
    context = FakeContext()

    with pytest.raises(AbortedError):
        _embed_text(servicer, "a dog", context)

    assert context.aborted == (code, str(failure))


def test_embed_text_bug_internal(embedder):
    embedder.failure = KeyError("bug")
    servicer = _servicer(embedder, batch_size=8)
    context = FakeContext()

    with pytest.raises(AbortedError):
        _embed_text(servicer, "a dog", context)

    assert context.aborted == (grpc.StatusCode.INTERNAL, "internal error; the server logged the details")
