"""The Roboflow Inference 1.8.3 HTTP API itself, called directly: what our inference backend relies on.

Findings, checked by the tests below:
- One image returns {"embeddings": [[512 floats]]}, and the vector is not normalised.
- A list of 2 to 8 images in one request returns one embedding per image, in request order, each
  equal to that image's single-image embedding. 9 images (above the server's default
  CLIP_MAX_BATCH_SIZE of 8) return HTTP 500 with the message "Internal error.", and so does an
  empty list. One undecodable image in a list fails the whole request with HTTP 400.
- Undecodable bytes return HTTP 400 with a JSON "message".
"""

import numpy as np
import pytest

from tests.fakes.images import encode
from tests.inference.sample_images import photo_like, photo_like_images
from tests.inference.support import CLIP_VERSION_ID, SERVER_MAX_BATCH, image_item

pytestmark = pytest.mark.inference

_DIM = 512
_LIST_IMAGES = photo_like_images(SERVER_MAX_BATCH, seed=41)


def _undecodable_images() -> dict[str, bytes]:
    png = encode(photo_like(42, 200, 150))
    jpeg = encode(photo_like(43, 200, 150), "JPEG", quality=90)
    return {
        "text": b"plain text, not an image",
        "truncated_png": png[: len(png) // 2],
        "truncated_jpeg": jpeg[: len(jpeg) // 3],
    }


@pytest.fixture(scope="module")
def single_vectors(raw_embedding) -> np.ndarray:
    """The raw embedding of each image of _LIST_IMAGES, one request per image."""
    return np.array([raw_embedding(image) for image in _LIST_IMAGES])


def test_single_image_raw_vector(raw_embedding):
    vector = raw_embedding(_LIST_IMAGES[0])

    assert vector.shape == (_DIM,)
    assert np.all(np.isfinite(vector))
    assert abs(np.linalg.norm(vector) - 1.0) > 1e-3


def test_single_vectors_differ(single_vectors):
    # Without this, the order checks of the list tests could not fail.
    for index in range(1, len(single_vectors)):
        assert not np.allclose(single_vectors[0], single_vectors[index], rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("count", range(2, SERVER_MAX_BATCH + 1))
def test_list_matches_single_requests(count, post_embed, single_vectors):
    # A rotation puts the images in another order than single_vectors, so a mix-up shows.
    order = [(index + count) % SERVER_MAX_BATCH for index in range(count)]
    images = [image_item(_LIST_IMAGES[index]) for index in order]

    response = post_embed({"image": images, "clip_version_id": CLIP_VERSION_ID})

    assert response.status_code == 200, response.text
    embeddings = np.array(response.json()["embeddings"])
    assert embeddings.shape == (count, _DIM)
    np.testing.assert_allclose(embeddings, single_vectors[order], rtol=1e-4, atol=1e-5)


def test_list_above_max_batch_500(post_embed):
    images = [image_item(image) for image in _LIST_IMAGES] + [image_item(_LIST_IMAGES[0])]

    response = post_embed({"image": images, "clip_version_id": CLIP_VERSION_ID})

    assert response.status_code == 500
    assert response.json() == {"message": "Internal error."}


def test_empty_list_500(post_embed):
    response = post_embed({"image": [], "clip_version_id": CLIP_VERSION_ID})

    assert response.status_code == 500


def test_bad_item_fails_whole_list_400(post_embed):
    images = [image_item(_LIST_IMAGES[0]), image_item(b"plain text, not an image"), image_item(_LIST_IMAGES[1])]

    response = post_embed({"image": images, "clip_version_id": CLIP_VERSION_ID})

    assert response.status_code == 400
    assert "embeddings" not in response.json()


@pytest.mark.parametrize("name", list(_undecodable_images()))
def test_undecodable_bytes_400(name, post_embed):
    data = _undecodable_images()[name]

    response = post_embed({"image": image_item(data), "clip_version_id": CLIP_VERSION_ID})

    assert response.status_code == 400
    assert "Could not load input image" in response.json()["message"]
