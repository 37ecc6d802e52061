"""Large messages, failing and cancelled request streams, and idle streams, against the real services."""

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from structlog.testing import capture_logs

from imgsearch.embed.v1 import embed_service_pb2
from imgsearch.index.v1 import index_service_pb2
from imgsearch_client.client import DEFAULT_MAX_MESSAGE_BYTES, ClientError, IndexClient, IngestItem
from tests.integration.bad_input_services import (
    encode,
    noise_picture,
    png_chunk,
    scene_picture,
    start_embed,
    start_index,
)

pytestmark = pytest.mark.integration

_MIB = 1024 * 1024
_READER_THREAD_NAMES = ("embed-reader", "ingest-reader")
# Thread pools of the services: each starts threads on demand up to its size, then reuses them.
_POOL_THREAD_PREFIXES = ("rpc_", "analyse_", "preprocess_")


@pytest.fixture(scope="module")
def embed():
    service = start_embed("hash")
    yield service
    service.stop()


@pytest.fixture
def index(embed, tmp_path):
    service = start_index(embed.address, tmp_path / "index")
    yield service
    service.stop()


def _small_images(count: int, seed: int) -> list[bytes]:
    return [encode(scene_picture(40, 32, seed=seed + number)) for number in range(count)]


def _noise_jpeg(side: int, seed: int) -> bytes:
    return encode(noise_picture(side, side, seed=seed), "JPEG", quality=90)


def _png_of_request_size(request_bytes: int) -> bytes:
    """Return a PNG whose IngestImagesRequest, with only the image set, is exactly request_bytes long.

    The PNG is padded with a private ancillary chunk, which decoders skip.
    """
    png = encode(scene_picture(64, 64, seed=1))
    iend = png_chunk(b"IEND", b"")
    padding = request_bytes
    while True:
        padded = png[: -len(iend)] + png_chunk(b"prVt", b"\x00" * padding) + iend
        size = index_service_pb2.IngestImagesRequest(image=padded).ByteSize()
        if size == request_bytes:
            return padded
        padding -= size - request_bytes


def _reader_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name in _READER_THREAD_NAMES]


def _unpooled_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if not thread.name.startswith(_POOL_THREAD_PREFIXES)]


def _wait_until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _rpc_lines(logs: list[dict], method_suffix: str) -> list[dict]:
    return [entry for entry in logs if entry["event"] == "rpc_finished" and entry["method"].endswith(method_suffix)]


# Large messages


def test_large_images_accepted(index):
    large_jpeg = _noise_jpeg(3000, seed=2)
    exactly_over_4_mib = _png_of_request_size(4 * _MIB + 1)
    eight_mib = _noise_jpeg(3300, seed=3)
    assert len(large_jpeg) > 4 * _MIB
    assert len(eight_mib) >= 8 * _MIB
    stream = _small_images(5, seed=4) + [eight_mib] + _small_images(5, seed=9)

    with IndexClient(index.address) as client:
        singles = list(client.ingest([IngestItem(image=large_jpeg), IngestItem(image=exactly_over_4_mib)]))
        outcomes = list(client.ingest(IngestItem(image=image, uri=str(n)) for n, image in enumerate(stream)))

    assert [outcome.status for outcome in singles] == ["added", "added"]
    assert [outcome.status for outcome in outcomes] == ["added"] * 11
    assert [outcome.uri for outcome in outcomes] == [str(n) for n in range(11)]


def test_image_above_client_limit_fails_alone(index):
    too_large = b"\x00" * (DEFAULT_MAX_MESSAGE_BYTES + 1)
    small = _small_images(2, seed=20)

    with IndexClient(index.address) as client:
        outcomes = list(client.ingest([IngestItem(image=small[0]), IngestItem(image=too_large, uri="big"),
                                       IngestItem(image=small[1])]))

    assert [outcome.status for outcome in outcomes] == ["added", "failed", "added"]
    assert outcomes[1].uri == "big"
    assert outcomes[1].error_code == "RESOURCE_EXHAUSTED"
    assert f"limit of {DEFAULT_MAX_MESSAGE_BYTES} bytes" in outcomes[1].error_message
    assert index.item_count() == 2


def test_lower_client_limit_fails_item_alone(index):
    images = _small_images(3, seed=22)
    two_mib = _noise_jpeg(1400, seed=25)
    assert len(two_mib) > _MIB

    with IndexClient(index.address, max_message_bytes=_MIB) as client:
        outcomes = list(client.ingest(IngestItem(image=image) for image in [images[0], two_mib, images[1], images[2]]))

    assert [outcome.status for outcome in outcomes] == ["added", "failed", "added", "added"]
    assert f"limit of {_MIB} bytes" in outcomes[1].error_message


def test_image_above_server_item_limit_fails_alone(embed, tmp_path):
    index = start_index(embed.address, tmp_path / "index", max_image_bytes=_MIB, max_message_bytes=4 * _MIB)
    try:
        small = _small_images(2, seed=26)
        with IndexClient(index.address) as client:
            outcomes = list(client.ingest(IngestItem(image=image) for image in [small[0], b"\x00" * 2 * _MIB, small[1]]))
    finally:
        index.stop()

    assert [outcome.status for outcome in outcomes] == ["added", "failed", "added"]
    assert outcomes[1].error_code == "RESOURCE_EXHAUSTED"
    assert f"above the limit of {_MIB} bytes" in outcomes[1].error_message


def test_raw_stream_above_server_limit_fails_whole(embed, tmp_path):
    # Without the client library's check, gRPC itself fails the whole stream: what IndexClient prevents.
    index = start_index(embed.address, tmp_path / "index", max_image_bytes=_MIB, max_message_bytes=_MIB)
    try:
        requests = [index_service_pb2.IngestImagesRequest(image=image) for image in _small_images(2, seed=28)]
        requests.insert(1, index_service_pb2.IngestImagesRequest(image=b"\x00" * (_MIB + 1)))
        with pytest.raises(grpc.RpcError) as raised:
            index.ingest(requests)
    finally:
        index.stop()

    assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


# Failing and cancelled request streams


def test_failing_items_raise_their_error(index):
    images = _small_images(3, seed=30)

    def items():
        for image in images:
            yield IngestItem(image=image)
        raise OSError("the disk could not be read")

    outcomes = []
    started = time.monotonic()
    with capture_logs() as logs, IndexClient(index.address) as client:
        with pytest.raises(OSError, match="the disk could not be read"):
            for outcome in client.ingest(items(), timeout_s=10):
                outcomes.append(outcome)
        finished = _wait_until(lambda: _rpc_lines(logs, "/IngestImages"))

    assert time.monotonic() - started < 10
    assert [outcome.status for outcome in outcomes] == ["added"] * 3
    assert finished
    [line] = _rpc_lines(logs, "/IngestImages")
    assert line["requests"] == 3
    assert _wait_until(lambda: not _reader_threads())
    assert index.item_count() == 3


def test_stalled_items_end_at_deadline(index):
    release = threading.Event()
    image = _small_images(1, seed=31)[0]

    def items():
        yield IngestItem(image=image)
        release.wait(timeout=30)  # a source that stalls, such as a hung network share

    outcomes = []
    started = time.monotonic()
    with IndexClient(index.address) as client, pytest.raises(ClientError) as raised:
        for outcome in client.ingest(items(), timeout_s=1.0):
            outcomes.append(outcome)
    elapsed = time.monotonic() - started
    release.set()

    assert raised.value.code == "DEADLINE_EXCEEDED"
    assert elapsed < 5
    assert [outcome.status for outcome in outcomes] == ["added"]


def test_closing_ingest_early_cancels_call(index):
    images = _small_images(4, seed=32)

    with capture_logs() as logs, IndexClient(index.address) as client:
        outcomes = client.ingest(IngestItem(image=image) for image in _repeat_forever(images))
        first = next(outcomes)
        outcomes.close()
        finished = _wait_until(lambda: _rpc_lines(logs, "/IngestImages"))

    assert first.status == "added"
    assert finished
    assert _rpc_lines(logs, "/IngestImages")[0]["status"] == "CANCELLED"
    assert _wait_until(lambda: not _reader_threads())


def _repeat_forever(images: list[bytes]):
    while True:
        yield from images


def test_raw_failing_generator_releases_handler(index):
    images = _small_images(3, seed=33)

    def requests():
        for image in images:
            yield index_service_pb2.IngestImagesRequest(image=image)
        raise OSError("the disk could not be read")

    with capture_logs() as logs:
        with pytest.raises(grpc.RpcError) as raised:
            index.ingest(requests(), timeout=10)
        finished = _wait_until(lambda: _rpc_lines(logs, "/IngestImages"))

    # grpcio ends the call on the client side with UNKNOWN and a fixed message; the cause stays in the client.
    assert raised.value.code() is grpc.StatusCode.UNKNOWN
    assert finished
    assert _rpc_lines(logs, "/IngestImages")[0]["status"] == "CANCELLED"
    assert _wait_until(lambda: not _reader_threads())


def _endless_embed_requests(image: bytes):
    number = 0
    while True:
        yield embed_service_pb2.EmbedImagesRequest(image=image, correlation_id=str(number))
        number += 1


def _cancel_after_two_responses(embed) -> None:
    responses = embed.stub.EmbedImages(_endless_embed_requests(_small_images(1, seed=36)[0]), timeout=30)
    next(responses)
    next(responses)
    responses.cancel()


def test_cancelled_streams_release_threads(embed):
    _cancel_after_two_responses(embed)
    assert _wait_until(lambda: not _reader_threads())
    baseline = len(_unpooled_threads())

    with capture_logs() as logs:
        for _ in range(50):
            _cancel_after_two_responses(embed)
        all_finished = _wait_until(lambda: len(_rpc_lines(logs, "/EmbedImages")) == 50)

    assert all_finished
    assert {line["status"] for line in _rpc_lines(logs, "/EmbedImages")} == {"CANCELLED"}
    assert _wait_until(lambda: not _reader_threads())
    assert _wait_until(lambda: len(_unpooled_threads()) <= baseline)
    assert [response.WhichOneof("result") for response in embed.embed(_small_images(2, seed=37))] == ["embedding"] * 2


# Idle streams


class _IdleStream:
    """A stream that sends one image, waits for its response, then sends nothing until release()."""

    def __init__(self, call, first_request):
        self._released = threading.Event()
        self._responses = call(self._requests(first_request), timeout=30)
        next(self._responses)

    def release(self) -> list:
        self._released.set()
        return list(self._responses)

    def _requests(self, first_request):
        yield first_request
        self._released.wait(timeout=30)


def _open_stream(service, kind: str, image: bytes):
    if kind == "embed":
        return service.stub.EmbedImages, embed_service_pb2.EmbedImagesRequest(image=image)
    return service.stub.IngestImages, index_service_pb2.IngestImagesRequest(image=image)


@pytest.mark.parametrize("kind", ["embed", "index"])
def test_idle_streams_over_limit_rejected(kind, embed, tmp_path):
    workers = 4
    if kind == "embed":
        service = start_embed("hash", max_workers=workers)
    else:
        service = start_index(embed.address, tmp_path / "index", max_workers=workers)
    images = _small_images(workers + 3, seed=40)
    try:
        idle = [_IdleStream(*_open_stream(service, kind, images[n])) for n in range(workers - 1)]

        started = time.monotonic()
        rejected = []
        for image in images[workers - 1 : workers + 1]:
            call, request = _open_stream(service, kind, image)
            with pytest.raises(grpc.RpcError) as raised:
                list(call(iter([request]), timeout=10))
            rejected.append(raised.value)
        rejection_seconds = time.monotonic() - started
        health = service.health(timeout=2)

        for stream in idle:
            assert stream.release() == []
        call, request = _open_stream(service, kind, images[-1])
        after = list(call(iter([request]), timeout=10))
    finally:
        service.stop()

    assert [error.code() for error in rejected] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    assert f"already serving {workers - 1} streaming calls" in rejected[0].details()
    assert rejection_seconds < 2.0
    assert health == health_pb2.HealthCheckResponse.SERVING
    assert len(after) == 1
