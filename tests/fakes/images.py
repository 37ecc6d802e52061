"""Synthetic encoded images for tests, built with Pillow from seeded data."""

import io

import numpy as np
from PIL import Image


def encode(image: Image.Image, image_format: str = "PNG", **save_options) -> bytes:
    """Return the picture encoded in image_format."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **save_options)
    return buffer.getvalue()


def solid_png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """Return a PNG of one colour."""
    return encode(Image.new("RGB", (width, height), rgb))


def noise_png(width: int, height: int, seed: int) -> bytes:
    """Return a PNG of seeded uniform RGB noise."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels))


def noise_images(count: int, seed: int = 0) -> list[bytes]:
    """Return count different noise PNGs of assorted sizes, the same for the same seed."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(40, 300, size=(count, 2))
    return [
        noise_png(int(width), int(height), seed=seed * 1000 + index)
        for index, (width, height) in enumerate(sizes)
    ]
