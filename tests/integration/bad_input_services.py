"""The real embed and index services in-process on 127.0.0.1, and helpers shared by the bad-input tests."""

import dataclasses
import io
import pathlib
import struct
import time
import zlib

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from embed_service import config as embed_config
from embed_service import server as embed_server
from imgsearch.embed.v1 import embed_service_pb2, embed_service_pb2_grpc
from imgsearch.index.v1 import index_service_pb2, index_service_pb2_grpc
from imgsearch_common.serving import message_size_options
from index_service import config as index_config
from index_service import server as index_server

TINY_MODEL_DIR = pathlib.Path(__file__).resolve().parents[2] / "models" / "tiny-clip-random"
CALL_TIMEOUT_S = 30.0
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclasses.dataclass
class EmbedService:
    """A running embed service with a channel to it."""

    server: grpc.Server
    address: str
    channel: grpc.Channel
    stub: embed_service_pb2_grpc.EmbedServiceStub

    def embed(self, images: list[bytes], timeout: float = CALL_TIMEOUT_S) -> list[embed_service_pb2.EmbedImagesResponse]:
        requests = [
            embed_service_pb2.EmbedImagesRequest(image=image, correlation_id=str(position))
            for position, image in enumerate(images)
        ]
        return list(self.stub.EmbedImages(iter(requests), timeout=timeout))

    def health(self, timeout: float = 5.0) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout).status

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(None).wait()


@dataclasses.dataclass
class IndexService:
    """A running index service with a channel to it."""

    server: grpc.Server
    collection: object
    address: str
    channel: grpc.Channel
    stub: index_service_pb2_grpc.IndexServiceStub

    def ingest(self, requests, timeout: float = CALL_TIMEOUT_S) -> list[index_service_pb2.IngestImagesResponse]:
        return list(self.stub.IngestImages(iter(requests), timeout=timeout))

    def search(self, timeout: float = CALL_TIMEOUT_S, **fields) -> index_service_pb2.SearchResponse:
        return self.stub.Search(index_service_pb2.SearchRequest(**fields), timeout=timeout)

    def item_count(self) -> int:
        return self.stub.GetStats(index_service_pb2.GetStatsRequest(), timeout=CALL_TIMEOUT_S).item_count

    def health(self, timeout: float = 5.0) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout).status

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(None).wait()
        self.collection.close()


def start_embed(backend: str = "onnx", **overrides) -> EmbedService:
    """Start an embed service on 127.0.0.1:0 (the tiny random CLIP for onnx) and wait until it serves."""
    config = dataclasses.replace(
        embed_config.from_env({}),
        listen="127.0.0.1:0",
        backend=backend,
        model_dir=TINY_MODEL_DIR,
        grace_s=0.0,
        health_interval_s=0.05,
        **overrides,
    )
    server, _, port = embed_server.build_server(config)
    address = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(address, options=message_size_options(config.max_message_bytes))
    service = EmbedService(server, address, channel, embed_service_pb2_grpc.EmbedServiceStub(channel))
    # The first health probe loads the model; until then every image would fail as UNAVAILABLE.
    deadline = time.monotonic() + CALL_TIMEOUT_S
    while service.health() != SERVING:
        if time.monotonic() > deadline:
            service.stop()
            raise RuntimeError(f"the embed service with backend {backend} did not turn SERVING in time")
        time.sleep(0.02)
    return service


def start_index(embed_address: str, data_dir: pathlib.Path, **overrides) -> IndexService:
    """Start an index service on 127.0.0.1:0 that embeds with the embed service at embed_address."""
    config = dataclasses.replace(
        index_config.from_env({}),
        listen="127.0.0.1:0",
        embed_addr=embed_address,
        data_dir=data_dir,
        device="cpu",
        grace_s=0.0,
        **overrides,
    )
    server, _, port, collection = index_server.start(config)
    address = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(address, options=message_size_options(config.max_message_bytes))
    return IndexService(server, collection, address, channel, index_service_pb2_grpc.IndexServiceStub(channel))


def encode(picture: Image.Image, image_format: str = "PNG", **options) -> bytes:
    """Return the picture encoded in image_format."""
    buffer = io.BytesIO()
    picture.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def noise_picture(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Return seeded uniform noise; smooth pictures are in scene_picture."""
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(axis=2) if channels == 1 else pixels, mode=mode)


def scene_picture(width: int, height: int, seed: int) -> Image.Image:
    """Return a smooth seeded RGB picture (gradients and blocks), which survives lossy codecs well."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:height, 0:width]
    pixels = np.zeros((height, width, 3), dtype=np.float64)
    for channel in range(3):
        angle = rng.uniform(0, 2 * np.pi)
        pixels[:, :, channel] = 127 + 100 * np.sin(
            (columns * np.cos(angle) + rows * np.sin(angle)) / rng.uniform(8, 30) + rng.uniform(0, 6)
        )
    for _ in range(4):
        top, left = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
        pixels[top : top + height // 3, left : left + width // 3] = rng.integers(0, 256, size=3)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def png_chunk(chunk_type: bytes, data: bytes) -> bytes:
    """Return one PNG chunk: length, type, data and CRC."""
    return struct.pack(">I", len(data)) + chunk_type + data + struct.pack(">I", zlib.crc32(chunk_type + data))


def black_bilevel_png(width: int, height: int) -> bytes:
    """Return a 1-bit black PNG of any size, built row by row so that only the compressed bytes are held.

    A 20000x20000 one compresses to about 50 KB but decodes to 400 MB in Pillow (a byte per pixel).
    """
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter type 0, then the packed bits
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def cosine(first, second) -> float:
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    return float(first @ second / (np.linalg.norm(first) * np.linalg.norm(second)))
