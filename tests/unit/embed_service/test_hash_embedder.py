"""Tests of the deterministic hash embedder used by tests and quick local runs."""

import math

import numpy as np
import pytest
from PIL import Image

from embed_service.backends.hash_embedder import DIM, MODEL_ID, HashEmbedder
from imgsearch_common.errors import DeadlineExceededError, InvalidInputError, TooLargeError, UnavailableError
from tests.fakes.images import encode, noise_png, solid_png


@pytest.fixture
def embedder():
    embedder = HashEmbedder(max_image_pixels=1_000_000)
    yield embedder
    embedder.close()


def test_hash_info(embedder):
    info = embedder.info()

    assert info.model_id == MODEL_ID == "hash-test-v1"
    assert info.dim == DIM == 512
    assert info.backend == "hash"


def test_hash_vectors_unit_float32(embedder):
    [vector] = embedder.embed_images([noise_png(64, 48, seed=1)], math.inf)

    assert vector.shape == (512,)
    assert vector.dtype == np.float32
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-6)


def test_hash_same_pixels_same_vector(embedder):
    pixels = np.random.default_rng(2).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    as_png = encode(Image.fromarray(pixels), "PNG")
    as_bmp = encode(Image.fromarray(pixels), "BMP")

    first, second, third = embedder.embed_images([as_png, as_bmp, as_png], math.inf)

    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, third)


def test_hash_similar_images_closer(embedder):
    rng = np.random.default_rng(4)
    base = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    nudged = np.clip(base.astype(int) + rng.integers(-8, 9, size=base.shape), 0, 255).astype(np.uint8)
    other = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)

    base_vector, nudged_vector, other_vector = embedder.embed_images(
        [encode(Image.fromarray(image)) for image in (base, nudged, other)], math.inf
    )

    assert float(base_vector @ nudged_vector) > 0.95
    assert float(base_vector @ nudged_vector) > float(base_vector @ other_vector) + 0.2


def test_hash_bad_item_error_in_place(embedder):
    results = embedder.embed_images(
        [solid_png(8, 8, (1, 2, 3)), b"not an image", solid_png(9, 9, (4, 5, 6))], math.inf
    )

    assert isinstance(results[0], np.ndarray)
    assert isinstance(results[1], InvalidInputError)
    assert isinstance(results[2], np.ndarray)


def test_hash_too_many_pixels(embedder):
    [result] = embedder.embed_images([solid_png(2000, 1000, (0, 0, 0))], math.inf)

    assert isinstance(result, TooLargeError)
    assert "2000000 pixels" in str(result)


def test_hash_expired_deadline(embedder):
    results = embedder.embed_images([solid_png(8, 8, (0, 0, 0))] * 2, 0.0)

    assert all(isinstance(result, DeadlineExceededError) for result in results)


def test_hash_closed_unavailable(embedder):
    embedder.close()

    with pytest.raises(UnavailableError):
        embedder.check_ready()
    with pytest.raises(UnavailableError):
        embedder.embed_images([solid_png(8, 8, (0, 0, 0))], math.inf)


def test_hash_text_unit_float32(embedder):
    vector = embedder.embed_text("a dog on a sofa", math.inf)

    assert vector.shape == (DIM,)
    assert vector.dtype == np.float32
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


def test_hash_text_deterministic(embedder):
    first = embedder.embed_text("a dog on a sofa", math.inf)
    second = HashEmbedder(max_image_pixels=1).embed_text("a dog on a sofa", math.inf)
    other = embedder.embed_text("a cat on a sofa", math.inf)

    np.testing.assert_array_equal(first, second)
    assert abs(float(first @ other)) < 0.3


def test_hash_text_expired_deadline(embedder):
    with pytest.raises(DeadlineExceededError):
        embedder.embed_text("a dog", 0.0)


def test_hash_text_closed_unavailable(embedder):
    embedder.close()

    with pytest.raises(UnavailableError, match="closed"):
        embedder.embed_text("a dog", math.inf)
