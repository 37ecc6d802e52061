"""A deterministic test embedder: a fixed random projection of a small RGB thumbnail, and a hash of text."""

import hashlib
import threading
import time

import numpy as np
from PIL import Image

from embed_service.backends.base import ImageInput, ModelInfo, l2_normalise, picture_of
from imgsearch_common.errors import DeadlineExceededError, ImgsearchError, UnavailableError

MODEL_ID = "hash-test-v1"
BACKEND = "hash"
DIM = 512

_THUMBNAIL_SIDE = 16
_FEATURES = _THUMBNAIL_SIDE * _THUMBNAIL_SIDE * 3
# Changing the seed or the thumbnail changes every vector, so MODEL_ID must change with them.
_PROJECTION_SEED = 20240601


class HashEmbedder:
    """Embeds the 16x16 box-filtered thumbnail of each image through a seeded Gaussian projection.

    Identical pixels give identical vectors, and images with close thumbnails give close
    vectors. A text's vector is a Gaussian vector seeded by the SHA-256 of its UTF-8 bytes, so
    equal texts give equal vectors and any other two are unrelated. The embeddings carry no
    meaning beyond that, and exist for tests and quick runs.
    """

    def __init__(self, max_image_pixels: int):
        self._max_image_pixels = max_image_pixels
        rng = np.random.default_rng(_PROJECTION_SEED)
        self._projection = rng.standard_normal((_FEATURES, DIM)).astype(np.float32)
        self._closed = threading.Event()

    def info(self) -> ModelInfo:
        return ModelInfo(model_id=MODEL_ID, dim=DIM, backend=BACKEND)

    def embed_images(self, images: list[ImageInput], timeout_s: float) -> list[np.ndarray | ImgsearchError]:
        self.check_ready()
        deadline = time.monotonic() + timeout_s
        results: list[np.ndarray | ImgsearchError] = []
        for data in images:
            if time.monotonic() >= deadline:
                results.append(DeadlineExceededError("the deadline ran out before this image was embedded"))
            else:
                results.append(self._embed_or_error(data))
        return results

    def embed_text(self, text: str, timeout_s: float) -> np.ndarray:
        self.check_ready()
        if timeout_s <= 0:
            raise DeadlineExceededError("the deadline ran out before the text was embedded")
        seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
        return l2_normalise(np.random.default_rng(seed).standard_normal(DIM))

    def check_ready(self) -> None:
        if self._closed.is_set():
            raise UnavailableError("the hash embedder is closed")

    def close(self) -> None:
        self._closed.set()

    def _embed_or_error(self, data: ImageInput) -> np.ndarray | ImgsearchError:
        try:
            image = picture_of(data, self._max_image_pixels)
            return self._embed_picture(image)
        except ImgsearchError as error:
            return error

    def _embed_picture(self, image: Image.Image) -> np.ndarray:
        thumbnail = image.resize((_THUMBNAIL_SIDE, _THUMBNAIL_SIDE), Image.Resampling.BOX)
        # Centring on mid-grey makes dark and light images point in opposite directions.
        features = np.asarray(thumbnail, dtype=np.float32).reshape(-1) / np.float32(255) - np.float32(0.5)
        return l2_normalise(features @ self._projection)
