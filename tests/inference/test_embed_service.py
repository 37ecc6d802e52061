"""Our embed service with the inference backend, over gRPC on 127.0.0.1, in front of the real server."""

import grpc
import numpy as np
import pytest

from embed_service.backends.inference_embedder import InferenceEmbedder
from imgsearch_common.errors import InvalidInputError
from tests.fakes.images import encode
from tests.inference.sample_images import odd_mode_images, photo_like, photo_like_images
from tests.inference.support import CLIP_VERSION_ID, SERVER_MAX_BATCH

pytestmark = pytest.mark.inference

_DIM = 512
_ODD_MODE_IMAGES = odd_mode_images()


def test_model_info_dim_and_id(inference_service):
    info = inference_service.info()

    assert info.dim == _DIM
    assert info.model_id == CLIP_VERSION_ID
    assert info.backend == "inference"


def test_one_image_embedded(inference_service):
    [response] = inference_service.embed([encode(photo_like(51, 320, 240))])

    assert response.correlation_id == "0"
    assert response.WhichOneof("result") == "embedding"
    assert len(response.embedding.values) == _DIM
    assert response.embedding.model_id == CLIP_VERSION_ID
    assert np.linalg.norm(response.embedding.values) == pytest.approx(1.0, abs=1e-5)


def test_vectors_normalised_raw_not(inference_service, raw_embedding):
    image = encode(photo_like(52, 320, 240))
    raw = raw_embedding(image)

    [ours] = inference_service.embed_vectors([image])

    assert abs(np.linalg.norm(raw) - 1.0) > 1e-3
    assert np.linalg.norm(ours) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(ours, raw / np.linalg.norm(raw), atol=1e-6)


def test_stream_above_server_max_batch(inference_service, raw_embedding):
    # More images in one stream than the server takes in one list request, and more than one batch
    # of the service, each in its own position.
    images = photo_like_images(3 * SERVER_MAX_BATCH, seed=53)
    expected = np.array([raw_embedding(image) for image in images])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)

    responses = inference_service.embed(images)

    assert [response.correlation_id for response in responses] == [str(index) for index in range(len(images))]
    assert [response.WhichOneof("result") for response in responses] == ["embedding"] * len(images)
    vectors = np.array([response.embedding.values for response in responses])
    np.testing.assert_allclose(vectors, expected, atol=1e-5)


@pytest.mark.parametrize("mode", list(_ODD_MODE_IMAGES))
def test_odd_image_mode_embedded(mode, inference_service):
    [response] = inference_service.embed([_ODD_MODE_IMAGES[mode]])

    assert response.WhichOneof("result") == "embedding", response.error.message
    assert len(response.embedding.values) == _DIM
    assert np.linalg.norm(response.embedding.values) == pytest.approx(1.0, abs=1e-5)


def test_undecodable_items_invalid_argument(inference_service):
    png = encode(photo_like(54, 200, 150))
    images = [
        encode(photo_like(55, 200, 150)),
        b"plain text, not an image",
        png[: len(png) // 2],
        b"",
        encode(photo_like(56, 150, 200), "JPEG", quality=90),
    ]

    responses = inference_service.embed(images)

    assert [response.WhichOneof("result") for response in responses] == [
        "embedding",
        "error",
        "error",
        "error",
        "embedding",
    ]
    for response in responses[1:4]:
        assert response.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert response.error.code_name == "INVALID_ARGUMENT"
    # The service decodes each image for its fingerprint, so these never reach the server.
    assert "not recognised" in responses[1].error.message
    assert "could not be decoded" in responses[2].error.message
    assert "image is empty" in responses[3].error.message


def test_server_400_becomes_item_invalid_argument(inference_url):
    # Bytes sent straight through the backend, as the service would send an image that Pillow
    # decodes but the server cannot: the server's HTTP 400 is that item's error alone.
    embedder = InferenceEmbedder(inference_url, "", CLIP_VERSION_ID, timeout_s=30.0, concurrency=2)
    good = encode(photo_like(57, 200, 150))
    try:
        results = embedder.embed_images([good, b"plain text, not an image", good], timeout_s=60.0)
    finally:
        embedder.close()

    assert isinstance(results[0], np.ndarray)
    assert isinstance(results[1], InvalidInputError)
    assert "Could not load input image" in str(results[1])
    assert isinstance(results[2], np.ndarray)
