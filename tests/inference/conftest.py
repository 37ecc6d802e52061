"""Fixtures for the tests against a real Roboflow Inference server, whose URL comes from the environment.

scripts/inference/run_tests_in_netns.sh (`make test-inference`) starts the server on 127.0.0.1 in a
network namespace with only loopback, places the tiny CLIP there as ViT-B-32, and sets
IMGSEARCH_TEST_INFERENCE_URL. Without that variable every test in this folder is skipped, so
`make test` needs no server.
"""

import ipaddress
import os
import urllib.parse

import grpc
import numpy as np
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embed_service import server as embed_server
from embed_service.config import EmbedConfig
from embed_service.servicer import SERVICE_NAME
from imgsearch.embed.v1 import embed_service_pb2_grpc
from tests.inference.support import (
    CALL_TIMEOUT_S,
    CLIP_VERSION_ID,
    EMBED_IMAGE_PATH,
    TINY_MODEL_DIR,
    RunningService,
    image_item,
)

URL_VARIABLE = "IMGSEARCH_TEST_INFERENCE_URL"

_SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="session")
def inference_url() -> str:
    """The base URL of the real Inference server, which must be on a loopback address."""
    url = os.environ.get(URL_VARIABLE, "").rstrip("/")
    if not url:
        pytest.skip(f"{URL_VARIABLE} is not set. Run `make test-inference` to start a real server and these tests")

    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        pytest.fail(f"{URL_VARIABLE} must point at a loopback address such as 127.0.0.1, got {url!r}")
    return url


@pytest.fixture(autouse=True)
def _require_inference_server(inference_url):
    """Skip every test in this folder when no server URL is set, even tests that do not call it."""


@pytest.fixture(scope="session")
def post_embed(inference_url):
    """Return a function that sends a JSON body to POST /clip/embed_image and returns the response."""
    with requests.Session() as session:

        def post(body: dict) -> requests.Response:
            return session.post(inference_url + EMBED_IMAGE_PATH, json=body, timeout=CALL_TIMEOUT_S)

        yield post


@pytest.fixture(scope="session")
def raw_embedding(post_embed):
    """Return a function that embeds one image with one direct HTTP request: the server's raw vector."""

    def embed(data: bytes) -> np.ndarray:
        response = post_embed({"image": image_item(data), "clip_version_id": CLIP_VERSION_ID})
        assert response.status_code == 200, response.text
        [vector] = response.json()["embeddings"]
        return np.array(vector, dtype=np.float64)

    return embed


@pytest.fixture(scope="session")
def inference_service(inference_url):
    """Our embed service with the inference backend, SERVING, in front of the real server."""
    config = EmbedConfig(
        listen="127.0.0.1:0",
        backend="inference",
        inference_url=inference_url,
        clip_version_id=CLIP_VERSION_ID,
        grace_s=0.0,
    )
    yield from _serve(config)


@pytest.fixture(scope="session")
def onnx_service():
    """Our embed service with the onnx backend on the same tiny CLIP files that the server runs."""
    yield from _serve(EmbedConfig(listen="127.0.0.1:0", backend="onnx", model_dir=TINY_MODEL_DIR, grace_s=0.0))


def _serve(config: EmbedConfig):
    """Start an embed server, wait until it is SERVING, yield it, and stop it."""
    server, _, port = embed_server.build_server(config)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    service = RunningService(
        server, channel, embed_service_pb2_grpc.EmbedServiceStub(channel), health_pb2_grpc.HealthStub(channel)
    )
    try:
        _wait_for_serving(service)
        yield service
    finally:
        channel.close()
        server.stop(None).wait()


def _wait_for_serving(service: RunningService) -> None:
    """Wait until health is SERVING. The first readiness check of the backend runs at once."""
    watcher = service.health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=CALL_TIMEOUT_S)
    try:
        for response in watcher:
            if response.status == _SERVING:
                return
    except grpc.RpcError as error:
        pytest.fail(f"the embed service did not turn SERVING within {CALL_TIMEOUT_S} s: {error.code().name}")
    finally:
        watcher.cancel()
    pytest.fail("the embed service ended its health stream before it turned SERVING")
