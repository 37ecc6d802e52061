"""Decode each image once and fingerprint it, before any backend embeds it."""

import dataclasses
from concurrent import futures

from imgsearch_common.fingerprints import Fingerprint, compute_fingerprint
from imgsearch_common.images import DecodedImage, decode_image

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
_DEFAULT_WORKERS = 4


@dataclasses.dataclass(frozen=True)
class AnalysedImage:
    """A decoded image and its fingerprint."""

    decoded: DecodedImage
    fingerprint: Fingerprint


class ImageAnalyser:
    """Decodes and fingerprints batches of images on a small thread pool."""

    def __init__(self, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, workers: int = _DEFAULT_WORKERS):
        self._max_image_pixels = max_image_pixels
        self._pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="analyse")

    def analyse(self, images: list[bytes]) -> list[AnalysedImage | Exception]:
        """Return one analysed image, or the error that makes it unusable, per input, in order.

        The error is an ImgsearchError for a bad or too large image. Any other exception is a bug,
        returned rather than raised so that only its own image fails.
        """
        return list(self._pool.map(self._analyse_one, images))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _analyse_one(self, data: bytes) -> AnalysedImage | Exception:
        try:
            decoded = decode_image(data, self._max_image_pixels)
            return AnalysedImage(decoded=decoded, fingerprint=compute_fingerprint(decoded.picture))
        except Exception as error:  # noqa: BLE001 - other exceptions become this image's INTERNAL error
            return error
