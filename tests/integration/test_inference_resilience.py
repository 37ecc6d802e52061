"""The embed service over real gRPC on 127.0.0.1 while its Inference server misbehaves.

The server is the local stand-in (tests/fakes/inference_standin.py) with injected faults. The
tests check health as the backend goes down and recovers, per-item errors in a stream, the bound on
concurrent requests, and that the API key stays out of logs and responses.
"""

import concurrent.futures
import dataclasses
import logging
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from embed_service import server as embed_server
from embed_service.config import EmbedConfig
from embed_service.servicer import SERVICE_NAME
from imgsearch.embed.v1 import embed_service_pb2, embed_service_pb2_grpc
from tests.fakes.images import noise_images, solid_png
from tests.fakes.inference_standin import Behaviour, InferenceStandIn, fake_embedding

pytestmark = pytest.mark.integration

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_API_KEY = "rf-secret-key-9a3b2d"
_MARKER = b"FAULTY-IMAGE"


@dataclasses.dataclass
class Service:
    stub: embed_service_pb2_grpc.EmbedServiceStub
    health: health_pb2_grpc.HealthStub
    health_servicer: health.HealthServicer

    def health_status(self, service: str = SERVICE_NAME) -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def wait_for_health(self, status: int, timeout_s: float = 5.0) -> int:
        """Poll health until it equals status or timeout_s passes, and return the last status."""
        deadline = time.monotonic() + timeout_s
        while (current := self.health_status()) != status and time.monotonic() < deadline:
            time.sleep(0.01)
        return current

    def embed(self, images: list[bytes], timeout: float = 10.0) -> list[embed_service_pb2.EmbedImagesResponse]:
        requests = (
            embed_service_pb2.EmbedImagesRequest(image=image, correlation_id=str(index))
            for index, image in enumerate(images)
        )
        return list(self.stub.EmbedImages(requests, timeout=timeout))


@pytest.fixture
def standin():
    with InferenceStandIn() as server:
        yield server


@pytest.fixture
def start_service():
    """Return a function that starts an embed server on the Inference backend and stops it afterwards."""
    started = []

    def start(url: str, **overrides) -> Service:
        settings = {
            "listen": "127.0.0.1:0",
            "grace_s": 0.0,
            "backend": "inference",
            "inference_url": url,
            "inference_timeout_s": 2.0,
            "inference_backoff_s": 0.01,
            "health_interval_s": 0.05,
        }
        settings.update(overrides)
        server, health_servicer, port = embed_server.build_server(EmbedConfig(**settings))
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        started.append((server, channel))
        return Service(
            embed_service_pb2_grpc.EmbedServiceStub(channel),
            health_pb2_grpc.HealthStub(channel),
            health_servicer,
        )

    yield start
    for server, channel in started:
        channel.close()
        server.stop(None).wait()


def _marked(image: bytes) -> bytes:
    # Pillow ignores bytes after a PNG's IEND chunk, so the marked image still decodes.
    return image + _MARKER


def _assert_embedding_of(response: embed_service_pb2.EmbedImagesResponse, image: bytes) -> None:
    assert response.WhichOneof("result") == "embedding"
    expected = fake_embedding(image)
    np.testing.assert_allclose(response.embedding.values, expected / np.linalg.norm(expected), atol=1e-6)


def test_health_follows_server_down_and_up(standin, start_service):
    standin.stop_listening()
    service = start_service(standin.url)

    assert service.wait_for_health(_SERVING, timeout_s=0.3) == _NOT_SERVING
    standin.listen_again()
    assert service.wait_for_health(_SERVING) == _SERVING
    assert service.health_status("") == _SERVING
    standin.stop_listening()
    assert service.wait_for_health(_NOT_SERVING) == _NOT_SERVING
    assert service.health_status("") == _NOT_SERVING
    standin.listen_again()
    assert service.wait_for_health(_SERVING) == _SERVING


@pytest.mark.parametrize(
    "behaviour",
    [
        Behaviour.STATUS_500,
        Behaviour.STATUS_504,
        Behaviour.NO_ANSWER,
        Behaviour.TRICKLE,
        Behaviour.MALFORMED_JSON,
    ],
)
def test_health_follows_server_faults(standin, start_service, behaviour):
    service = start_service(standin.url, inference_timeout_s=0.2)
    assert service.wait_for_health(_SERVING) == _SERVING

    standin.behaviour = behaviour
    assert service.wait_for_health(_NOT_SERVING) == _NOT_SERVING
    standin.behaviour = Behaviour.EMBED
    assert service.wait_for_health(_SERVING) == _SERVING


def test_health_stays_not_serving_in_shutdown(standin, start_service):
    # serve_until_signalled calls enter_graceful_shutdown() on SIGTERM, before RPCs drain. The
    # watcher goes on probing, and its failed and then passing probes must not turn SERVING again.
    service = start_service(standin.url)
    assert service.wait_for_health(_SERVING) == _SERVING

    service.health_servicer.enter_graceful_shutdown()
    standin.stop_listening()
    time.sleep(0.2)
    standin.listen_again()
    requests_before = len(standin.requests)

    assert service.wait_for_health(_SERVING, timeout_s=0.3) == _NOT_SERVING
    assert len(standin.requests) > requests_before  # probes reached the server again


def test_traffic_failures_turn_not_serving(standin, start_service):
    # Probes are 30 s apart, so only the failures of real traffic can change the status here.
    service = start_service(
        standin.url, health_interval_s=30.0, health_failure_threshold=3, inference_retries=0
    )
    assert service.wait_for_health(_SERVING) == _SERVING
    standin.behaviour = Behaviour.STATUS_500

    first = service.embed([solid_png(9, 9, (1, 1, 1)), solid_png(9, 9, (2, 2, 2))])
    status_after_two = service.health_status()
    second = service.embed([solid_png(9, 9, (3, 3, 3))])

    assert [response.error.code_name for response in first + second] == ["UNAVAILABLE"] * 3
    assert status_after_two == _SERVING
    assert service.health_status() == _NOT_SERVING
    assert service.health_status("") == _NOT_SERVING
    assert len(standin.requests) == 4  # one probe at start, then the three images


def test_tripped_health_recovers_by_probe(standin, start_service):
    service = start_service(
        standin.url, health_interval_s=0.2, health_failure_threshold=2, inference_retries=0
    )
    assert service.wait_for_health(_SERVING) == _SERVING
    standin.behaviour = Behaviour.STATUS_500
    service.embed([solid_png(9, 9, (1, 1, 1)), solid_png(9, 9, (2, 2, 2))])
    assert service.health_status() == _NOT_SERVING

    standin.behaviour = Behaviour.EMBED

    assert service.wait_for_health(_SERVING) == _SERVING


def test_isolated_failures_keep_serving(standin, start_service):
    standin.fail_images_containing(_MARKER, Behaviour.STATUS_500)
    service = start_service(standin.url, health_interval_s=30.0, health_failure_threshold=2)
    assert service.wait_for_health(_SERVING) == _SERVING
    images = noise_images(6, seed=41)
    images = [_marked(image) if index % 2 else image for index, image in enumerate(images)]

    responses = service.embed(images)

    assert [response.WhichOneof("result") for response in responses] == ["embedding", "error"] * 3
    assert service.health_status() == _SERVING


def test_invalid_images_keep_serving(standin, start_service):
    service = start_service(standin.url, health_interval_s=30.0, health_failure_threshold=1)
    assert service.wait_for_health(_SERVING) == _SERVING

    responses = service.embed([b"not an image", b"GIF89a truncated", b"\x89PNG broken"])

    assert [response.error.code_name for response in responses] == ["INVALID_ARGUMENT"] * 3
    assert service.health_status() == _SERVING


def test_stream_faulty_image_unavailable(standin, start_service):
    standin.fail_images_containing(_MARKER, Behaviour.STATUS_500)
    service = start_service(standin.url, inference_retries=1, batch_size=4)
    assert service.wait_for_health(_SERVING) == _SERVING
    images = noise_images(5, seed=43)
    images[1] = _marked(images[1])

    responses = service.embed(images)

    assert [response.correlation_id for response in responses] == ["0", "1", "2", "3", "4"]
    assert responses[1].error.code_name == "UNAVAILABLE"
    assert responses[1].error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "HTTP 500" in responses[1].error.message
    assert "after 2 attempts" in responses[1].error.message
    for index in (0, 2, 3, 4):
        _assert_embedding_of(responses[index], images[index])
    assert service.health_status() == _SERVING


def test_stream_slow_image_unavailable(standin, start_service):
    standin.fail_images_containing(_MARKER, Behaviour.SLOW)
    standin.delay_s = 5.0
    service = start_service(standin.url, inference_timeout_s=0.3, batch_size=4)
    assert service.wait_for_health(_SERVING) == _SERVING
    images = noise_images(4, seed=44)
    images[2] = _marked(images[2])

    started = time.monotonic()
    responses = service.embed(images)
    elapsed = time.monotonic() - started

    assert responses[2].error.code_name == "UNAVAILABLE"
    assert "did not complete its response within 0.3 s" in responses[2].error.message
    for index in (0, 1, 3):
        _assert_embedding_of(responses[index], images[index])
    assert elapsed < 2.0


def test_stream_deadline_exceeded_after_earlier_items(standin, start_service):
    standin.fail_images_containing(_MARKER, Behaviour.NO_ANSWER)
    service = start_service(standin.url, inference_timeout_s=10.0, batch_size=1)
    assert service.wait_for_health(_SERVING) == _SERVING
    images = noise_images(4, seed=45)
    images[2] = _marked(images[2])
    requests = [
        embed_service_pb2.EmbedImagesRequest(image=image, correlation_id=str(index))
        for index, image in enumerate(images)
    ]
    received = []

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        for response in service.stub.EmbedImages(iter(requests), timeout=3.0):
            received.append(response)
    elapsed = time.monotonic() - started

    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert [response.correlation_id for response in received] == ["0", "1"]
    _assert_embedding_of(received[0], images[0])
    _assert_embedding_of(received[1], images[1])
    assert elapsed < 4.5


def test_concurrent_streams_bounded(standin, start_service):
    standin.behaviour = Behaviour.SLOW
    standin.delay_s = 0.05
    service = start_service(standin.url, inference_concurrency=2, batch_size=3, max_workers=8)
    assert service.wait_for_health(_SERVING) == _SERVING
    streams = [noise_images(3, seed=50 + index) for index in range(5)]

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(streams)) as pool:
        results = list(pool.map(service.embed, streams))

    for images, responses in zip(streams, results, strict=True):
        for image, response in zip(images, responses, strict=True):
            _assert_embedding_of(response, image)
    assert standin.max_in_flight == 2


def test_api_key_absent_from_logs_and_responses(standin, start_service, caplog):
    caplog.set_level(logging.DEBUG)
    standin.fail_images_containing(b"KEY-ECHO", Behaviour.STATUS_401)
    standin.fail_images_containing(b"SERVER-ERROR", Behaviour.STATUS_500)
    standin.fail_images_containing(b"HANG-UP", Behaviour.DROP_CONNECTION)
    service = start_service(
        standin.url, inference_api_key=_API_KEY, health_failure_threshold=1, log_level="debug"
    )
    assert service.wait_for_health(_SERVING) == _SERVING
    images = [solid_png(9, 9, (index, 0, 0)) for index in range(4)]
    images[1] += b"KEY-ECHO"
    images[2] += b"SERVER-ERROR"
    images[3] += b"HANG-UP"

    responses = service.embed(images)
    # The failures turned health NOT_SERVING. The next probe passes, and a later one finds the server gone.
    assert service.wait_for_health(_SERVING) == _SERVING
    standin.stop_listening()
    assert service.wait_for_health(_NOT_SERVING) == _NOT_SERVING

    assert responses[0].WhichOneof("result") == "embedding"
    assert [response.error.code_name for response in responses[1:]] == ["UNAVAILABLE"] * 3
    assert "api_key [redacted] is not valid" in responses[1].error.message
    assert {request.body["api_key"] for request in standin.requests} == {_API_KEY}
    assert "inference_request_retried" in caplog.text
    assert "embed_backend_failed_repeatedly" in caplog.text
    assert "embed_backend_not_ready" in caplog.text
    assert _API_KEY not in caplog.text
    assert all(_API_KEY not in response.error.message for response in responses)
