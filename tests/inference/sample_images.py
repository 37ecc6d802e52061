"""Seeded synthetic images for the tests against the real Inference server, encoded with Pillow."""

import numpy as np
from PIL import Image, ImageDraw

from tests.fakes.images import encode

_EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientation 6: the stored pixels must be turned 90 degrees clockwise for display.
_ROTATE_CLOCKWISE = 6


def strip_picture(width: int = 400, height: int = 240) -> Image.Image:
    """Return a grey picture with a red strip on the left quarter, a blue strip on the right quarter.

    CLIP preprocessing resizes 400x240 to 373x224 and cuts 74 pixels off each side, so 19 pixels of
    each strip stay in the crop. A channel swap turns red into blue, and a squash or another crop
    changes how much of each strip is left, so with the tiny model each of these mistakes moves the
    embedding below cosine 0.99 (test_equivalence checks that).
    """
    pixels = np.full((height, width, 3), 128, dtype=np.uint8)
    strip = width // 4
    pixels[:, :strip] = (255, 0, 0)
    pixels[:, width - strip :] = (0, 0, 255)
    pixels[height // 3 : 2 * height // 3, width // 3 : 2 * width // 3] = (0, 200, 0)
    return Image.fromarray(pixels)


def photo_like(seed: int, width: int, height: int) -> Image.Image:
    """Return a picture like a small photo: smooth colour gradients under a few filled shapes."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:height, 0:width] / max(width, height)
    red = rng.uniform(0.2, 1.0) * columns * 255 + rng.uniform(0, 80)
    green = rng.uniform(0.2, 1.0) * rows * 255 + rng.uniform(0, 80)
    blue = (1 - columns) * rng.uniform(100, 255)
    picture = Image.fromarray(np.clip(np.stack([red, green, blue], axis=-1), 0, 255).astype(np.uint8))

    draw = ImageDraw.Draw(picture)
    for _ in range(6):
        left = int(rng.integers(0, width - 20))
        top = int(rng.integers(0, height - 20))
        right = left + int(rng.integers(10, width // 2))
        bottom = top + int(rng.integers(10, height // 2))
        colour = tuple(int(channel) for channel in rng.integers(0, 256, size=3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([left, top, right, bottom], fill=colour)
    return picture


def photo_like_images(count: int, seed: int) -> list[bytes]:
    """Return count different photo-like PNGs of assorted sizes, the same for the same seed."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(120, 400, size=(count, 2))
    return [
        encode(photo_like(seed * 1000 + index, int(width), int(height)))
        for index, (width, height) in enumerate(sizes)
    ]


def rotated_jpeg(picture: Image.Image) -> bytes:
    """Return a JPEG whose stored pixels are the picture turned left, with EXIF orientation 6.

    A decoder that applies the orientation shows the original picture again.
    """
    exif = Image.Exif()
    exif[_EXIF_ORIENTATION_TAG] = _ROTATE_CLOCKWISE
    return encode(picture.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif)


def odd_mode_images(seed: int = 5) -> dict[str, bytes]:
    """Return one photo-like image per unusual Pillow mode, keyed by the mode the file decodes to.

    CMYK goes through JPEG, the others through PNG. "I;16" has 16-bit grey values.
    """
    picture = photo_like(seed, 300, 200)
    grey = np.asarray(picture.convert("L")).astype(np.uint16) * 257
    return {
        "L": encode(picture.convert("L")),
        "P": encode(picture.convert("P")),
        "RGBA": encode(picture.convert("RGBA")),
        "CMYK": encode(picture.convert("CMYK"), "JPEG", quality=95),
        "I;16": encode(Image.fromarray(grey)),
        "1": encode(picture.convert("1")),
    }


def half_transparent_png(seed: int = 6) -> tuple[bytes, Image.Image]:
    """Return an RGBA PNG whose left half is fully transparent, and its RGB pixels without alpha.

    The transparent half keeps its coloured RGB values, so a decoder that drops alpha returns them,
    and one that composites on white returns white there.
    """
    picture = photo_like(seed, 300, 200)
    rgba = np.asarray(picture.convert("RGBA")).copy()
    rgba[:, : picture.width // 2, 3] = 0
    return encode(Image.fromarray(rgba)), picture
