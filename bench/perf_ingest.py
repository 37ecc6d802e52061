"""Ingest measurements: images through client, index and embed services against the embedder alone, and vectors."""

import io
import pathlib
import time

import numpy as np
from PIL import Image

from bench.perf_data import MODEL_ID
from embed_service.analysis import ImageAnalyser
from embed_service.backends.onnx_embedder import OnnxEmbedder
from imgsearch_client.client import IndexClient, IngestItem

_EMBED_BATCH = 16
_TIMEOUT_S = 600.0


def image_set(dataset: pathlib.Path | None, count: int, seed: int) -> list[bytes]:
    """Return count distinct JPEGs: the dataset's photos re-encoded at several qualities, or generated pictures."""
    sources = sorted(dataset.glob("*.jpg")) if dataset else []
    rng = np.random.default_rng(seed)
    images = []
    for position in range(count):
        if sources:
            picture = Image.open(sources[position % len(sources)]).convert("RGB")
            quality = 90 - 7 * (position // len(sources))
        else:
            picture = Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))
            quality = 85
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=quality)
        images.append(buffer.getvalue())
    if len(set(images)) != len(images):
        raise ValueError(f"the {count} benchmark images are not all distinct; give a larger dataset")
    return images


def embedder_alone(model_dir: pathlib.Path, images: list[bytes]) -> float:
    """Return images/s of the onnx embedder alone, in the embed service's batches, after a warm-up batch."""
    embedder = OnnxEmbedder(model_dir, threads=0, max_image_pixels=50_000_000)
    try:
        embedder.embed_images(images[:_EMBED_BATCH], _TIMEOUT_S)
        started = time.perf_counter()
        for start in range(0, len(images), _EMBED_BATCH):
            embedder.embed_images(images[start : start + _EMBED_BATCH], _TIMEOUT_S)
        return len(images) / (time.perf_counter() - started)
    finally:
        embedder.close()


def embedder_with_fingerprints(model_dir: pathlib.Path, images: list[bytes]) -> float:
    """Return images/s of what the embed service does in-process: decode and fingerprint once, then embed."""
    analyser = ImageAnalyser()
    embedder = OnnxEmbedder(model_dir, threads=0, max_image_pixels=50_000_000)
    try:
        embedder.embed_images(images[:_EMBED_BATCH], _TIMEOUT_S)
        started = time.perf_counter()
        for start in range(0, len(images), _EMBED_BATCH):
            analysed = analyser.analyse(images[start : start + _EMBED_BATCH])
            embedder.embed_images([analysis.decoded for analysis in analysed], _TIMEOUT_S)
        return len(images) / (time.perf_counter() - started)
    finally:
        embedder.close()
        analyser.close()


def through_services(index_addr: str, images: list[bytes]) -> float:
    """Return images/s ingested through the client and both services; every image must be added."""
    items = [IngestItem(image=image, uri=f"bench-{n}.jpg") for n, image in enumerate(images)]
    with IndexClient(index_addr, timeout_s=_TIMEOUT_S) as client:
        started = time.perf_counter()
        outcomes = list(client.ingest(items))
        elapsed = time.perf_counter() - started
    failed = [outcome for outcome in outcomes if outcome.status != "added"]
    if failed:
        raise RuntimeError(f"{len(failed)} benchmark images were not added, the first: {failed[0]}")
    return len(images) / elapsed


def vectors_through_service(index_addr: str, vectors: np.ndarray) -> float:
    """Return vectors/s ingested as precomputed embeddings (stored durably) through the client and index service."""
    items = (IngestItem(embedding=vectors[n], model_id=MODEL_ID, item_id=f"v{n}") for n in range(len(vectors)))
    with IndexClient(index_addr, timeout_s=_TIMEOUT_S) as client:
        started = time.perf_counter()
        outcomes = list(client.ingest(items, max_in_flight=2048))
        elapsed = time.perf_counter() - started
    failed = [outcome for outcome in outcomes if outcome.status != "added"]
    if failed:
        raise RuntimeError(f"{len(failed)} benchmark vectors were not added, the first: {failed[0]}")
    return len(vectors) / elapsed
