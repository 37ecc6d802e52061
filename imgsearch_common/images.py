"""Decode untrusted image bytes into 8-bit RGB pictures, with limits and clear errors."""

import dataclasses
import io

import numpy as np
import structlog
from PIL import Image, ImageOps, UnidentifiedImageError

from imgsearch_common.errors import InvalidInputError, TooLargeError

log = structlog.get_logger(__name__)

# Transparent pixels are composited on white, so an RGBA, LA or palette image with transparency
# embeds like the same picture flattened on a white page.
BACKGROUND_RGB = (255, 255, 255)

# EXIF orientations 5 to 8 turn the stored pixels by 90 or 270 degrees, swapping width and height.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What the header of an image file says, with width and height after EXIF orientation."""

    format: str
    width: int
    height: int


def describe_image(data: bytes, max_pixels: int) -> ImageInfo:
    """Read an image's format and displayed size from its header without decoding the pixels."""
    image = _open(data, max_pixels)
    width, height = image.size
    if _exif_orientation(image) in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return ImageInfo(format=image.format or "unknown", width=width, height=height)


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    """Image bytes together with their decoded 8-bit RGB picture, so that they are decoded once."""

    data: bytes
    picture: Image.Image
    # Whether the source had an alpha channel or a transparent colour, now composited on white.
    had_transparency: bool


def decode_image(data: bytes, max_pixels: int) -> DecodedImage:
    """Decode image bytes into their displayed 8-bit RGB picture; see decode_rgb for the rules."""
    image = _open(data, max_pixels)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise InvalidInputError(f"image could not be decoded ({image.format}): {error}") from error

    had_transparency = image.mode in _ALPHA_MODES or "transparency" in image.info
    picture = to_rgb(_apply_orientation(image))
    return DecodedImage(data=data, picture=picture, had_transparency=had_transparency)


def decode_rgb(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes into an 8-bit RGB picture as it is displayed.

    EXIF orientation is applied, transparency is composited on BACKGROUND_RGB, and 16-bit and
    float greyscale are scaled to 8 bits. Raises InvalidInputError for bytes that are not a
    complete image of a supported format, and TooLargeError above max_pixels.
    """
    return decode_image(data, max_pixels).picture


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded picture of any mode into 8-bit RGB."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in {"I", "F"}:
        return Image.fromarray(_scale_to_8_bit(image), mode="L").convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND_RGB + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise InvalidInputError("image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as error:
        raise InvalidInputError(
            f"image format not recognised or not supported ({len(data)} bytes starting {data[:8]!r})"
        ) from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise TooLargeError(f"image has too many pixels: {error}") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise InvalidInputError(f"image header could not be read: {error}") from error

    width, height = image.size
    if width * height > max_pixels:
        raise TooLargeError(
            f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}"
        )
    if width < 1 or height < 1:
        raise InvalidInputError(f"image has an empty size {width}x{height}")
    return image


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception as error:  # noqa: BLE001 - Pillow raises many types on malformed EXIF
        log.warning("exif_unreadable", error=str(error))
        return 1


def _apply_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:  # noqa: BLE001 - Pillow raises many types on malformed EXIF
        log.warning("exif_orientation_ignored", error=str(error))
        return image


def _scale_to_8_bit(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image)
    if image.mode == "F":
        return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    wide = np.clip(pixels.astype(np.int64), 0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)
