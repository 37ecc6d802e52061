"""Constants and helpers shared by the tests against the real Inference server."""

import base64
import dataclasses
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2_grpc

from imgsearch.embed.v1 import embed_service_pb2, embed_service_pb2_grpc

CLIP_VERSION_ID = "ViT-B-32"
TINY_MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "tiny-clip-random"
EMBED_IMAGE_PATH = "/clip/embed_image"
# Seconds for one HTTP request or one gRPC call of a test.
CALL_TIMEOUT_S = 30.0
# The server's default CLIP_MAX_BATCH_SIZE in inference 1.8.3: the maximum number of images in one list request.
SERVER_MAX_BATCH = 8


@dataclasses.dataclass
class RunningService:
    """An embed server started by a fixture, with a channel and stubs on 127.0.0.1."""

    server: grpc.Server
    channel: grpc.Channel
    stub: embed_service_pb2_grpc.EmbedServiceStub
    health: health_pb2_grpc.HealthStub

    def embed(self, images: list[bytes]) -> list[embed_service_pb2.EmbedImagesResponse]:
        """Embed the images in one stream, with the index of each image as its correlation_id."""
        messages = (
            embed_service_pb2.EmbedImagesRequest(image=image, correlation_id=str(index))
            for index, image in enumerate(images)
        )
        return list(self.stub.EmbedImages(messages, timeout=CALL_TIMEOUT_S))

    def embed_vectors(self, images: list[bytes]) -> np.ndarray:
        """Embed the images and return the vectors as rows, failing the test on any item error."""
        responses = self.embed(images)
        errors = [response.error.message for response in responses if response.HasField("error")]
        assert not errors, f"the embed service returned item errors: {errors}"
        return np.array([response.embedding.values for response in responses], dtype=np.float64)

    def info(self) -> embed_service_pb2.GetModelInfoResponse:
        return self.stub.GetModelInfo(embed_service_pb2.GetModelInfoRequest(), timeout=CALL_TIMEOUT_S)


def image_item(data: bytes) -> dict:
    """Return one image as the server's JSON expects it: base64 bytes, never a URL to fetch."""
    return {"type": "base64", "value": base64.b64encode(data).decode("ascii")}


def cosine(first: np.ndarray, second: np.ndarray) -> float:
    """Return the cosine similarity of two vectors, computed in float64."""
    first = np.asarray(first, dtype=np.float64)
    second = np.asarray(second, dtype=np.float64)
    return float(first @ second / (np.linalg.norm(first) * np.linalg.norm(second)))
