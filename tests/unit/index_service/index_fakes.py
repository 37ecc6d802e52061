"""Synthetic images and a deterministic fake embedder for the index service's tests."""

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from imgsearch_common.errors import ImgsearchError, UnavailableError
from imgsearch_common.fingerprints import Fingerprint, compute_fingerprint
from imgsearch_common.images import decode_rgb
from index_service.embedder import Embedding, ModelInfo
from index_service.store import FILE_NAME
from tests.fakes.images import encode, noise_png

THUMBNAIL_SIDE = 8
MAX_PIXELS = 50_000_000


def make_png(seed: int, width: int = 32, height: int = 24) -> bytes:
    """Return a PNG of seeded noise; different seeds give different bytes."""
    return noise_png(width, height, seed)


def scene(seed: int, size: tuple[int, int] = (128, 96)) -> Image.Image:
    """Return a smooth seeded picture with a few solid rectangles, which pHash and layouts see as photo-like."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)).copy()
    width, height = size
    for _ in range(4):
        left, top = rng.integers(0, width - width // 4), rng.integers(0, height - height // 4)
        pixels[top : top + height // 5, left : left + width // 5] = rng.integers(0, 256, size=3)
    return Image.fromarray(pixels)


def scene_jpeg(seed: int) -> bytes:
    """Return scene(seed) as a JPEG of quality 90."""
    return encode(scene(seed), "JPEG", quality=90)


def lossless_copy(image: bytes, label: str = "copy") -> bytes:
    """Return the image's decoded pixels as a PNG with a text chunk: other bytes, the same pixels."""
    info = PngImagePlugin.PngInfo()
    info.add_text("label", label)
    return encode(decode_rgb(image, MAX_PIXELS), "PNG", pnginfo=info)


def near_copy(image: bytes) -> bytes:
    """Return the image resized to half its width and height and saved as a JPEG of quality 85."""
    picture = decode_rgb(image, MAX_PIXELS)
    half = picture.resize((picture.width // 2, picture.height // 2), Image.Resampling.BICUBIC)
    return encode(half, "JPEG", quality=85)


def fingerprint_of(image: bytes) -> Fingerprint:
    """Return the fingerprint that an embed service computes for the image."""
    return compute_fingerprint(decode_rgb(image, MAX_PIXELS))


def thumbnail_vector(image: bytes, dim: int, projection_seed: int = 0) -> np.ndarray:
    """Embed an image as a seeded random projection of its 8x8 thumbnail, L2-normalised."""
    picture = decode_rgb(image, max_pixels=MAX_PIXELS).resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    features = np.asarray(picture, dtype=np.float64).reshape(-1) / 255.0 - 0.5
    projection = np.random.default_rng(projection_seed).standard_normal((features.size, dim))
    vector = features @ projection
    return (vector / np.linalg.norm(vector)).astype(np.float32)


class FakeEmbedder:
    """An in-process embedder with thumbnail vectors and real fingerprints, injectable failures and a call record.

    vectors_by_image replaces the vector of an image; with_fingerprints False makes it behave as an
    embed service older than fingerprints.
    """

    def __init__(self, dim: int = 16, model_id: str = "fake-clip"):
        self.dim = dim
        self.model_id = model_id
        self.down = False
        self.with_fingerprints = True
        self.vectors_by_image: dict[bytes, np.ndarray] = {}
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
        vector = self.vectors_by_image.get(image)
        if vector is None:
            vector = thumbnail_vector(image, self.dim)
        fingerprint = fingerprint_of(image) if self.with_fingerprints else None
        return Embedding(vector=vector, model_id=self.model_id, fingerprint=fingerprint)

    def close(self) -> None:
        self.closed = True


# The items table as the store created it before fingerprints existed.
_OLD_SCHEMA = """
CREATE TABLE items (
    row_id INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL UNIQUE,
    uri TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    vector BLOB NOT NULL,
    model_id TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


def write_old_store(data_dir: Path, vectors: list[np.ndarray], model_id: str = "fake-clip") -> None:
    """Write items.sqlite3 as the store wrote it before fingerprints, with one item per vector."""
    data_dir.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(data_dir / FILE_NAME)
    with connection:
        connection.executescript(_OLD_SCHEMA)
        for number, vector in enumerate(vectors):
            connection.execute(
                "INSERT INTO items (item_id, sha256, uri, width, height, metadata, vector, model_id, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (f"old-{number}", f"{number:064x}", f"/old/{number}.png", 32, 24, "{}",
                 np.asarray(vector, dtype="<f4").tobytes(), model_id, "2026-01-01T00:00:00+00:00"),
            )
        connection.execute("INSERT INTO settings (key, value) VALUES ('model_id', ?), ('dim', ?)",
                           (model_id, str(len(vectors[0]))))
    connection.close()
