"""The embed service over real gRPC on 127.0.0.1: hash, ONNX and Inference backends.

The Inference backend talks to a local stand-in (tests/fakes/inference_standin.py) that speaks
the Roboflow JSON. Tests against a real Inference server are in tests/inference/ (make test-inference).
"""

import dataclasses
import io
import json
import math
import os
import queue
import socket
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from embed_service import server as embed_server
from embed_service.backends.onnx_embedder import OnnxEmbedder
from embed_service.config import EmbedConfig
from embed_service.servicer import SERVICE_NAME
from imgsearch.embed.v1 import embed_service_pb2, embed_service_pb2_grpc
from imgsearch_common.fingerprints import FINGERPRINT_VERSION, LAYOUT_BYTES
from tests.fakes.images import encode, noise_images, noise_png, solid_png
from tests.fakes.inference_standin import Behaviour, InferenceStandIn, fake_embedding
from tests.fakes.onnx_models import write_model

pytestmark = pytest.mark.integration

_REPO = Path(__file__).resolve().parents[2]
_TINY_MODEL_DIR = _REPO / "models" / "tiny-clip-random"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclasses.dataclass
class RunningService:
    port: int
    channel: grpc.Channel
    stub: embed_service_pb2_grpc.EmbedServiceStub
    health: health_pb2_grpc.HealthStub

    def health_status(self, service: str = SERVICE_NAME) -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def wait_for_health(self, status: int, timeout_s: float = 10.0) -> int:
        """Poll health until it equals status or timeout_s passes, and return the last status."""
        deadline = time.monotonic() + timeout_s
        while (current := self.health_status()) != status and time.monotonic() < deadline:
            time.sleep(0.02)
        return current

    def embed(self, requests, timeout: float = 30.0) -> list[embed_service_pb2.EmbedImagesResponse]:
        return list(self.stub.EmbedImages(iter(requests), timeout=timeout))


@pytest.fixture
def start_service():
    """Return a function that starts an embed server for a config and stops it after the test."""
    started = []

    def start(config: EmbedConfig) -> RunningService:
        server, _, port = embed_server.build_server(config)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        started.append((server, channel))
        return RunningService(
            port,
            channel,
            embed_service_pb2_grpc.EmbedServiceStub(channel),
            health_pb2_grpc.HealthStub(channel),
        )

    yield start
    for server, channel in started:
        channel.close()
        server.stop(None).wait()


def _config(**overrides) -> EmbedConfig:
    return dataclasses.replace(EmbedConfig(listen="127.0.0.1:0", grace_s=0.0), **overrides)


@pytest.fixture(params=["hash", "onnx"])
def local_config(request, tmp_path) -> EmbedConfig:
    """A config for a backend that runs in-process: hash, or ONNX on the tiny model if it exists."""
    if request.param == "hash":
        return _config(backend="hash", batch_size=4)
    model_dir = _TINY_MODEL_DIR
    if not (model_dir / "visual.onnx").is_file():
        model_dir = tmp_path / "model"
        write_model(model_dir)
    return _config(backend="onnx", model_dir=model_dir, batch_size=4)


def _request(image: bytes, correlation_id: str) -> embed_service_pb2.EmbedImagesRequest:
    return embed_service_pb2.EmbedImagesRequest(image=image, correlation_id=correlation_id)


def test_health_reaches_serving(local_config, start_service):
    service = start_service(local_config)

    assert service.port > 0
    assert service.wait_for_health(_SERVING) == _SERVING
    assert service.health_status("") == _SERVING


def test_embed_order_and_correlation_ids(local_config, start_service):
    service = start_service(local_config)
    images = noise_images(11, seed=31)
    requests = [_request(image, f"image-{index}") for index, image in enumerate(images)]

    responses = service.embed(requests)

    assert [response.correlation_id for response in responses] == [f"image-{index}" for index in range(11)]
    assert all(response.WhichOneof("result") == "embedding" for response in responses)
    vectors = np.array([response.embedding.values for response in responses])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert len({vector.tobytes() for vector in vectors}) == 11


def test_embed_bad_item_in_middle(local_config, start_service):
    service = start_service(local_config)
    requests = [
        _request(solid_png(60, 40, (250, 10, 10)), "red"),
        _request(b"GIF89a but not really", "broken"),
        _request(b"", "empty"),
        _request(solid_png(60, 40, (10, 10, 250)), "blue"),
    ]

    responses = service.embed(requests)

    assert [response.correlation_id for response in responses] == ["red", "broken", "empty", "blue"]
    assert [response.WhichOneof("result") for response in responses] == [
        "embedding",
        "error",
        "error",
        "embedding",
    ]
    assert responses[1].error.code_name == "INVALID_ARGUMENT"
    assert responses[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert responses[2].error.code_name == "INVALID_ARGUMENT"


def test_embed_image_above_4_mib(local_config, start_service):
    service = start_service(local_config)
    image = noise_png(1400, 1100, seed=32)
    assert len(image) > 4 * 1024 * 1024

    [response] = service.embed([_request(image, "large")])

    assert response.WhichOneof("result") == "embedding"


def test_get_model_info_hash(start_service):
    service = start_service(_config(backend="hash"))

    info = service.stub.GetModelInfo(embed_service_pb2.GetModelInfoRequest(), timeout=5)

    assert (info.model_id, info.dim, info.backend) == ("hash-test-v1", 512, "hash")


def test_onnx_embeddings_match_backend(tmp_path, start_service):
    write_model(tmp_path, dim=16, seed=3)
    (tmp_path / "imgsearch-model.json").write_text(json.dumps({"model_id": "throwaway-3"}))
    service = start_service(_config(backend="onnx", model_dir=tmp_path))
    images = noise_images(3, seed=33)
    direct = OnnxEmbedder(tmp_path, threads=1, max_image_pixels=10_000_000)
    try:
        expected = direct.embed_images(images, math.inf)
    finally:
        direct.close()

    responses = service.embed([_request(image, str(index)) for index, image in enumerate(images)])
    info = service.stub.GetModelInfo(embed_service_pb2.GetModelInfoRequest(), timeout=5)

    assert (info.model_id, info.dim, info.backend) == ("throwaway-3", 16, "onnx")
    for response, vector in zip(responses, expected, strict=True):
        assert response.embedding.model_id == "throwaway-3"
        np.testing.assert_allclose(response.embedding.values, vector, atol=1e-6)


def test_onnx_missing_model_not_serving(tmp_path, start_service):
    service = start_service(_config(backend="onnx", model_dir=tmp_path, health_interval_s=0.1))

    assert service.wait_for_health(_SERVING, timeout_s=0.5) == _NOT_SERVING
    with pytest.raises(grpc.RpcError) as raised:
        service.stub.GetModelInfo(embed_service_pb2.GetModelInfoRequest(), timeout=5)
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "ONNX model not found" in raised.value.details()
    [response] = service.embed([_request(solid_png(30, 30, (0, 0, 0)), "early")])
    assert response.error.code_name == "UNAVAILABLE"

    write_model(tmp_path)

    assert service.wait_for_health(_SERVING) == _SERVING
    [response] = service.embed([_request(solid_png(30, 30, (0, 0, 0)), "late")])
    assert response.WhichOneof("result") == "embedding"


def test_inference_over_grpc(start_service):
    with InferenceStandIn() as standin:
        service = start_service(_config(backend="inference", inference_url=standin.url, batch_size=3))
        assert service.wait_for_health(_SERVING) == _SERVING
        images = noise_images(5, seed=34)
        requests = [_request(image, f"i{index}") for index, image in enumerate(images)]
        requests.insert(2, _request(b"plain text, not an image", "text"))

        responses = service.embed(requests)
        info = service.stub.GetModelInfo(embed_service_pb2.GetModelInfoRequest(), timeout=5)

    assert (info.model_id, info.dim, info.backend) == ("ViT-B-32", 512, "inference")
    assert [response.correlation_id for response in responses] == ["i0", "i1", "text", "i2", "i3", "i4"]
    assert responses[2].error.code_name == "INVALID_ARGUMENT"
    # The embed service decodes every image itself (for its fingerprint), so bytes that are no image
    # never reach the Inference server. Its own HTTP 400 is covered by the backend's unit tests.
    assert "not recognised" in responses[2].error.message
    assert len(standin.requests) == 1 + len(images)  # the readiness probe, then one per image
    embedded = [response for response in responses if response.correlation_id != "text"]
    for response, image in zip(embedded, images, strict=True):
        expected = fake_embedding(image)
        assert response.embedding.model_id == "ViT-B-32"
        np.testing.assert_allclose(response.embedding.values, expected / np.linalg.norm(expected), atol=1e-6)


def test_inference_server_error_unavailable_items(start_service):
    with InferenceStandIn() as standin:
        service = start_service(
            _config(backend="inference", inference_url=standin.url, inference_backoff_s=0.01)
        )
        assert service.wait_for_health(_SERVING) == _SERVING
        standin.behaviour = Behaviour.STATUS_500

        responses = service.embed([_request(solid_png(20, 20, (5, 5, 5)), str(index)) for index in range(3)])

    assert [response.error.code_name for response in responses] == ["UNAVAILABLE"] * 3
    assert "HTTP 500" in responses[0].error.message


def test_inference_client_deadline_exceeded(start_service):
    with InferenceStandIn() as standin:
        service = start_service(_config(backend="inference", inference_url=standin.url))
        assert service.wait_for_health(_SERVING) == _SERVING
        standin.behaviour = Behaviour.SLOW
        standin.delay_s = 5.0

        started = time.monotonic()
        try:
            [response] = service.embed([_request(solid_png(20, 20, (5, 5, 5)), "slow")], timeout=0.5)
            # The server may stop first, within the deadline that it was sent, and fail the item alone.
            code_name = response.error.code_name
        except grpc.RpcError as error:
            code_name = error.code().name
        elapsed = time.monotonic() - started

    assert code_name == "DEADLINE_EXCEEDED"
    assert elapsed < 3.0


def test_inference_down_not_serving(start_service):
    with InferenceStandIn() as standin:
        url = standin.url
    service = start_service(_config(backend="inference", inference_url=url))

    assert service.wait_for_health(_SERVING, timeout_s=0.5) == _NOT_SERVING
    with pytest.raises(grpc.RpcError) as raised:
        service.stub.GetModelInfo(embed_service_pb2.GetModelInfoRequest(), timeout=5)
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE


def test_build_server_bind_failure():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"

        with pytest.raises(RuntimeError, match=f"could not bind the embed service to {address}"):
            embed_server.build_server(_config(backend="hash", listen=address))


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)


def _wait_for_event(lines: queue.Queue, event: str, timeout_s: float = 20.0) -> dict:
    """Return the first JSON log record with this event, skipping other lines."""
    deadline = time.monotonic() + timeout_s
    while True:
        line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == event:
            return record


def _service_environ(**settings) -> dict:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("IMGSEARCH_EMBED_")}
    environ.update({f"IMGSEARCH_EMBED_{name}": value for name, value in settings.items()})
    return environ


@pytest.mark.slow
def test_python_m_serves_and_stops():
    environ = _service_environ(BACKEND="hash", LISTEN="127.0.0.1:0", GRACE_S="0.5")
    process = subprocess.Popen(
        [sys.executable, "-m", "embed_service"], cwd=_REPO, env=environ, stderr=subprocess.PIPE, text=True
    )
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(process.stderr, lines), daemon=True)
    reader.start()
    try:
        started = _wait_for_event(lines, "embed_server_started")
        with grpc.insecure_channel(f"127.0.0.1:{started['port']}") as channel:
            service = RunningService(
                started["port"],
                channel,
                embed_service_pb2_grpc.EmbedServiceStub(channel),
                health_pb2_grpc.HealthStub(channel),
            )
            assert service.wait_for_health(_SERVING) == _SERVING

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        assert _wait_for_event(lines, "server_stopped")["level"] == "info"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=5)
        process.stderr.close()


@pytest.mark.slow
def test_python_m_bad_config_exits_2():
    environ = _service_environ(BACKEND="gpu")

    completed = subprocess.run(
        [sys.executable, "-m", "embed_service"],
        cwd=_REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert completed.returncode == 2
    assert "IMGSEARCH_EMBED_BACKEND must be one of onnx, inference, hash" in completed.stderr


def test_fingerprint_same_pixels_other_bytes(local_config, start_service):
    service = start_service(local_config)
    jpeg = encode(Image.fromarray(np.random.default_rng(8).integers(0, 256, (48, 64, 3), np.uint8)), "JPEG")
    lossless_copy = encode(Image.open(io.BytesIO(jpeg)), "PNG")
    other = noise_png(64, 48, seed=9)

    responses = service.embed([_request(jpeg, "jpeg"), _request(lossless_copy, "png"), _request(other, "other")])

    fingerprints = [response.fingerprint for response in responses]
    assert fingerprints[0].pixel_sha256 == fingerprints[1].pixel_sha256
    assert fingerprints[0].pixel_sha256 != fingerprints[2].pixel_sha256
    assert (fingerprints[0].width, fingerprints[0].height) == (64, 48)
    assert fingerprints[0].version == FINGERPRINT_VERSION
    assert len(fingerprints[0].layout) == LAYOUT_BYTES


def test_failed_item_has_no_fingerprint(local_config, start_service):
    service = start_service(local_config)

    (response,) = service.embed([_request(b"not an image", "bad")])

    assert response.WhichOneof("result") == "error"
    assert not response.HasField("fingerprint")
