"""The interface that every embedder implements, and helpers that they share."""

import dataclasses
from typing import Protocol

import numpy as np

from PIL import Image

from imgsearch_common.errors import ImgsearchError, UnavailableError
from imgsearch_common.images import DecodedImage, decode_rgb

# An image as encoded bytes, or already decoded by the caller so that backends need not decode again.
ImageInput = bytes | DecodedImage


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """The model behind an embedder: its id, the dim of its embeddings and the backend name."""

    model_id: str
    dim: int
    backend: str


class Embedder(Protocol):
    """Something that turns encoded images, and text, into L2-normalised float32 embeddings.

    Implementations are thread-safe and never import grpc.
    """

    def info(self) -> ModelInfo:
        """Return the model description, or raise UnavailableError while the embedder cannot learn it."""

    def embed_images(self, images: list[ImageInput], timeout_s: float) -> list[np.ndarray | ImgsearchError]:
        """Embed each image and return one entry per input, in order.

        An entry is either a float32 embedding of norm 1 or the domain error of that image.
        timeout_s is the caller's remaining time (math.inf without a deadline). An error that
        hits every image at once, such as DeadlineExceededError, may be raised instead.
        """

    def embed_text(self, text: str, timeout_s: float) -> np.ndarray:
        """Embed one text with the text tower of the model that embeds images, as a float32 embedding of norm 1.

        The caller has rejected empty and oversized text. Text longer than the model's context is
        cut to fit. timeout_s is as for embed_images. Raises FailedPreconditionError when the
        backend has no text model, and the domain error of any other failure.
        """

    def check_ready(self) -> None:
        """Raise UnavailableError, naming the cause, unless the embedder can embed images now."""

    def close(self) -> None:
        """Release threads, sessions and connections. Later calls raise UnavailableError."""


def l2_normalise(vector: np.ndarray) -> np.ndarray:
    """Return the vector as float32 with norm 1, or raise UnavailableError for a zero or non-finite one.

    Such a vector has no direction, so it is a failure of the model or the server, not of the caller.
    """
    vector = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    if not np.isfinite(norm) or norm == 0.0:
        raise UnavailableError(f"the model returned an embedding that cannot be normalised (norm {norm})")
    return (vector / np.float32(norm)).astype(np.float32)


def picture_of(image: ImageInput, max_pixels: int) -> Image.Image:
    """Return the RGB picture of an image, decoding it only when the caller has not."""
    if isinstance(image, DecodedImage):
        return image.picture
    return decode_rgb(image, max_pixels)
