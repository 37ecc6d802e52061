"""Fixtures shared by the Inference backend's tests: the fault-injecting stand-in server and embedders for it."""

import pytest

from embed_service.backends.inference_embedder import InferenceEmbedder
from tests.fakes.inference_standin import InferenceStandIn


@pytest.fixture
def standin():
    with InferenceStandIn() as server:
        yield server


@pytest.fixture
def make_embedder():
    """Return a function that builds an embedder with fast test settings and closes it afterwards."""
    created = []

    def make(url: str, **overrides) -> InferenceEmbedder:
        settings = {
            "api_key": "",
            "clip_version_id": "ViT-B-32",
            "timeout_s": 2.0,
            "concurrency": 4,
            "retries": 2,
            "backoff_s": 0.01,
        }
        settings.update(overrides)
        embedder = InferenceEmbedder(url=url, **settings)
        created.append(embedder)
        return embedder

    yield make
    for embedder in created:
        embedder.close()
