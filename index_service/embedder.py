"""The embedder protocol that the collection uses to turn images and text into embeddings."""

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from imgsearch_common.errors import ImgsearchError
from imgsearch_common.fingerprints import Fingerprint


@dataclasses.dataclass(frozen=True)
class Embedding:
    """An image's or a text's embedding as the embed service sent it, with the model that produced it.

    fingerprint is None for a text, and for an image when the embed service sent none, as embed
    services older than fingerprints do.
    """

    vector: np.ndarray
    model_id: str
    fingerprint: Fingerprint | None = None


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """The model that an embedder embeds with."""

    model_id: str
    dim: int
    backend: str


class Embedder(Protocol):
    """Embeds images and text; every method honours a timeout in seconds."""

    def model_info(self, timeout_s: float) -> ModelInfo:
        """Return the model in use. Raises UnavailableError or DeadlineExceededError."""

    def embed_images(self, images: Sequence[bytes], timeout_s: float) -> list[Embedding | ImgsearchError]:
        """Embed each image, returning its Embedding or the ImgsearchError it failed with, in order."""

    def embed_text(self, text: str, timeout_s: float) -> Embedding:
        """Embed one text with the text tower of the model that embeds images.

        Raises the ImgsearchError it failed with: InvalidInputError for a text that the embedder
        rejects, FailedPreconditionError when it cannot embed text, UnavailableError or
        DeadlineExceededError.
        """

    def close(self) -> None:
        """Release connections."""
