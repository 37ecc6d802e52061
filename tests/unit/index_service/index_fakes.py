"""Synthetic images and a deterministic fake embedder for the index service's unit tests."""

import threading
from collections.abc import Sequence

import numpy as np

from imgsearch_common.errors import ImgsearchError, UnavailableError
from imgsearch_common.images import decode_rgb
from index_service.embedder import Embedding, ModelInfo
from tests.fakes.images import noise_png

THUMBNAIL_SIDE = 8


def make_png(seed: int, width: int = 32, height: int = 24) -> bytes:
    """Return a PNG of seeded noise; different seeds give different bytes."""
    return noise_png(width, height, seed)


def thumbnail_vector(image: bytes, dim: int, projection_seed: int = 0) -> np.ndarray:
    """Embed an image as a seeded random projection of its 8x8 thumbnail, L2-normalised."""
    picture = decode_rgb(image, max_pixels=50_000_000).resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    features = np.asarray(picture, dtype=np.float64).reshape(-1) / 255.0 - 0.5
    projection = np.random.default_rng(projection_seed).standard_normal((features.size, dim))
    vector = features @ projection
    return (vector / np.linalg.norm(vector)).astype(np.float32)


class FakeEmbedder:
    """An in-process embedder with thumbnail vectors, injectable failures and a call record."""

    def __init__(self, dim: int = 16, model_id: str = "fake-clip"):
        self.dim = dim
        self.model_id = model_id
        self.down = False
        self.errors_by_image: dict[bytes, ImgsearchError] = {}
        self.calls: list[int] = []
        self.timeouts: list[float] = []
        self.barrier: threading.Barrier | None = None
        self.closed = False

    def model_info(self, timeout_s: float) -> ModelInfo:
        if self.down:
            raise UnavailableError("fake embed service is down")
        return ModelInfo(model_id=self.model_id, dim=self.dim, backend="fake")

    def embed_images(self, images: Sequence[bytes], timeout_s: float) -> list[Embedding | ImgsearchError]:
        self.calls.append(len(images))
        self.timeouts.append(timeout_s)
        if self.barrier is not None:
            self.barrier.wait(timeout=10)
        if self.down:
            return [UnavailableError("fake embed service is down") for _ in images]
        return [self._embed_one(image) for image in images]

    def _embed_one(self, image: bytes) -> Embedding | ImgsearchError:
        if image in self.errors_by_image:
            return self.errors_by_image[image]
        return Embedding(vector=thumbnail_vector(image, self.dim), model_id=self.model_id)

    def close(self) -> None:
        self.closed = True
