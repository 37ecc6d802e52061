"""Tests of the Inference HTTP embedder against a local stand-in server.

The stand-in (tests/fakes/inference_standin.py) speaks the Roboflow Inference JSON but is not
the real server: its vectors are seeded functions of the image bytes. Tests against a real
Inference server are in tests/inference/ (make test-inference).
"""

import base64
import math
import socket

import grpc
import numpy as np
import pytest
from structlog.testing import capture_logs

from embed_service.backends.inference_embedder import InferenceEmbedder
from imgsearch_common.errors import DeadlineExceededError, InvalidInputError, UnavailableError
from imgsearch_common.grpc_errors import status_for
from tests.fakes.images import noise_images, solid_png
from tests.fakes.inference_standin import Behaviour, fake_embedding

_API_KEY = "rf-test-key-0123"


def _embedder(
    url: str, api_key: str = "", timeout_s: float = 5.0, concurrency: int = 4, retries: int = 2
) -> InferenceEmbedder:
    return InferenceEmbedder(
        url=url,
        api_key=api_key,
        clip_version_id="ViT-B-32",
        timeout_s=timeout_s,
        concurrency=concurrency,
        retries=retries,
        backoff_s=0.01,
    )


@pytest.fixture
def embedder(standin):
    embedder = _embedder(standin.url)
    yield embedder
    embedder.close()


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_inference_request_json_without_api_key(standin, embedder):
    image = solid_png(10, 10, (200, 100, 0))

    embedder.embed_images([image], math.inf)

    [request] = standin.requests
    assert request.method == "POST"
    assert request.path == "/clip/embed_image"
    assert request.content_type == "application/json"
    assert request.body == {
        "image": {"type": "base64", "value": base64.b64encode(image).decode("ascii")},
        "clip_version_id": "ViT-B-32",
    }


def test_inference_request_json_with_api_key(standin):
    embedder = _embedder(standin.url, api_key=_API_KEY)
    try:
        embedder.embed_images([solid_png(10, 10, (0, 0, 0))], math.inf)
    finally:
        embedder.close()

    [request] = standin.requests
    assert request.body["api_key"] == _API_KEY
    assert set(request.body) == {"image", "clip_version_id", "api_key"}


def test_inference_vectors_normalised(embedder):
    images = noise_images(3, seed=11)

    vectors = embedder.embed_images(images, math.inf)

    for image, vector in zip(images, vectors, strict=True):
        expected = fake_embedding(image)
        assert np.linalg.norm(expected) > 9.0  # the server's vectors are not normalised
        assert vector.dtype == np.float32
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(vector, expected / np.linalg.norm(expected), atol=1e-6)


def test_inference_one_image_per_request(standin, embedder):
    images = noise_images(5, seed=12)

    embedder.embed_images(images, math.inf)

    sent = sorted(request.body["image"]["value"] for request in standin.requests)
    assert sent == sorted(base64.b64encode(image).decode("ascii") for image in images)


def test_inference_concurrency_bounded(standin):
    standin.behaviour = Behaviour.SLOW
    standin.delay_s = 0.2
    embedder = _embedder(standin.url, concurrency=2)
    try:
        results = embedder.embed_images(noise_images(6, seed=13), math.inf)
    finally:
        embedder.close()

    assert all(isinstance(result, np.ndarray) for result in results)
    assert standin.max_in_flight == 2


def test_inference_info_learns_dim(embedder):
    info = embedder.info()

    assert info.model_id == "ViT-B-32"
    assert info.dim == 512
    assert info.backend == "inference"


def test_inference_bad_image_invalid_argument(embedder):
    results = embedder.embed_images(
        [solid_png(8, 8, (1, 1, 1)), b"not an image", solid_png(8, 8, (2, 2, 2))], math.inf
    )

    assert isinstance(results[0], np.ndarray)
    assert isinstance(results[1], InvalidInputError)
    assert "Could not load valid image" in str(results[1])
    assert status_for(results[1])[0] is grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(results[2], np.ndarray)


def test_inference_status_400_message_kept(standin, embedder):
    standin.behaviour = Behaviour.STATUS_400

    [result] = embedder.embed_images([solid_png(8, 8, (0, 0, 0))], math.inf)

    assert isinstance(result, InvalidInputError)
    assert "stand-in was told to reject every image" in str(result)


def test_inference_status_500_unavailable(standin, embedder):
    standin.behaviour = Behaviour.STATUS_500

    [result] = embedder.embed_images([solid_png(8, 8, (0, 0, 0))], math.inf)

    assert isinstance(result, UnavailableError)
    assert "HTTP 500" in str(result)
    assert status_for(result)[0] is grpc.StatusCode.UNAVAILABLE


def test_inference_unknown_route_unavailable(standin):
    embedder = _embedder(standin.url + "/wrong-prefix")
    try:
        [result] = embedder.embed_images([solid_png(8, 8, (0, 0, 0))], math.inf)
    finally:
        embedder.close()

    assert isinstance(result, UnavailableError)
    assert "HTTP 404" in str(result)


def test_inference_malformed_json_unavailable(standin, embedder):
    standin.behaviour = Behaviour.MALFORMED_JSON

    [result] = embedder.embed_images([solid_png(8, 8, (0, 0, 0))], math.inf)

    assert isinstance(result, UnavailableError)
    assert "not JSON" in str(result)


def test_inference_wrong_length_unavailable(standin, embedder):
    embedder.check_ready()
    standin.behaviour = Behaviour.WRONG_LENGTH

    [result] = embedder.embed_images([solid_png(8, 8, (0, 0, 0))], math.inf)

    assert isinstance(result, UnavailableError)
    assert "dim 511, expected 512" in str(result)


def test_inference_server_timeout_unavailable(standin):
    standin.behaviour = Behaviour.SLOW
    standin.delay_s = 5.0
    embedder = _embedder(standin.url, timeout_s=0.2)
    try:
        [result] = embedder.embed_images([solid_png(8, 8, (0, 0, 0))], timeout_s=30.0)
    finally:
        embedder.close()

    assert isinstance(result, UnavailableError)
    assert "did not complete its response within 0.2 s" in str(result)
    assert status_for(result)[0] is grpc.StatusCode.UNAVAILABLE


def test_inference_caller_deadline_exceeded(standin, embedder):
    standin.behaviour = Behaviour.SLOW
    standin.delay_s = 5.0

    [result] = embedder.embed_images([solid_png(8, 8, (0, 0, 0))], timeout_s=0.2)

    assert isinstance(result, DeadlineExceededError)
    assert status_for(result)[0] is grpc.StatusCode.DEADLINE_EXCEEDED


def test_inference_expired_deadline_sends_nothing(standin, embedder):
    results = embedder.embed_images([solid_png(8, 8, (0, 0, 0))] * 2, timeout_s=0.0)

    assert all(isinstance(result, DeadlineExceededError) for result in results)
    assert standin.requests == []


def test_inference_connection_refused_unavailable():
    embedder = _embedder(_closed_port_url())
    try:
        [result] = embedder.embed_images([solid_png(8, 8, (0, 0, 0))], math.inf)
        with pytest.raises(UnavailableError, match="failed the probe embedding"):
            embedder.check_ready()
        with pytest.raises(UnavailableError):
            embedder.info()
    finally:
        embedder.close()

    assert isinstance(result, UnavailableError)
    assert "ConnectionError" in str(result)


def test_inference_failure_log_omits_api_key(standin):
    standin.behaviour = Behaviour.STATUS_500
    embedder = _embedder(standin.url, api_key=_API_KEY, retries=1)
    try:
        with capture_logs() as logs:
            embedder.embed_images([solid_png(8, 8, (0, 0, 0))], math.inf)
    finally:
        embedder.close()

    assert [entry["event"] for entry in logs] == ["inference_request_retried", "inference_requests_failed"]
    assert _API_KEY not in repr(logs)


def test_inference_closed_unavailable(embedder):
    embedder.close()

    with pytest.raises(UnavailableError, match="closed"):
        embedder.embed_images([solid_png(8, 8, (0, 0, 0))], math.inf)
