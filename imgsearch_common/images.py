"""Decode untrusted image bytes into 8-bit RGB pictures, with limits and clear errors.

describe_image and decode_image apply the same rules:

- Format: read from the bytes, never from a file name. Only SUPPORTED_FORMATS are opened, and
  any other format is rejected with InvalidInputError, which names the format when sniff_format
  recognises its signature.
- Size: at most max_pixels (width x height), checked from the header before any pixel is decoded,
  so a decompression bomb is rejected without its memory cost. There is no minimum size: a 1x1
  image is decoded, and the embedders scale it up like any other picture.
  NOTE: Pillow's own limit applies too. Above Image.MAX_IMAGE_PIXELS (89,478,485 in Pillow 13) it
  warns, which raises TooLargeError only where warnings are errors, and above twice that it always
  raises TooLargeError. So a max_pixels above Pillow's limit does not fully take effect.
- Frames: the first frame of an animated or multi-picture file.
- Orientation: the EXIF Orientation tag is applied (by Pillow itself for TIFF files). EXIF that is malformed, written twice, or has an
  orientation outside 1 to 8 is ignored with the warning event exif_orientation_ignored, and the
  picture keeps its stored orientation. Orientation in XMP is not read.
- Transparency: composited on BACKGROUND_RGB.
- Truncated or corrupt files raise InvalidInputError; Pillow's ImageFile.LOAD_TRUNCATED_IMAGES
  is never set.
"""

import dataclasses
import io

import numpy as np
import structlog
from PIL import Image, UnidentifiedImageError

from imgsearch_common.errors import InvalidInputError, TooLargeError
from imgsearch_common.exif import (
    TRANSPOSE_BY_ORIENTATION,
    MalformedExifError,
    orientation_of,
    split_jpeg_exif,
    starts_tiff_header,
)

log = structlog.get_logger(__name__)

# HEIC and HEIF (the photos of iPhones) are read by pillow-heif, a Pillow plugin over libheif, when
# the optional extra `heif` installs it: its binary wheels are GPLv2 as a whole (they bundle x265).
try:
    import pillow_heif
except ImportError:
    pillow_heif = None
else:
    pillow_heif.register_heif_opener()
Image.init()

# Pillow format names of the files that are opened. Pillow's other plugins never parse the bytes,
# which keeps the parsers exposed to untrusted input few; the EPS plugin, for one, runs Ghostscript.
SUPPORTED_FORMATS = tuple(
    name for name in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF") if name in Image.OPEN
)

# Transparent pixels are composited on white, so an RGBA, LA or palette image with transparency
# embeds like the same picture flattened on a white page.
BACKGROUND_RGB = (255, 255, 255)

# EXIF orientations 5 to 8 turn the stored pixels by 90 or 270 degrees, swapping width and height.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}

# Leading bytes of common image and document formats, to name the format in error messages.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
    (b"%!PS", "PostScript"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
)
# Brands of ISO base media files (the bytes after "ftyp"), as used by AVIF and HEIF.
_FORMAT_BY_FTYP_BRAND = {
    b"avif": "AVIF",
    b"avis": "AVIF",
    **dict.fromkeys((b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"), "HEIF"),
}


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """The format and size that an image file's header gives, with width and height after EXIF orientation."""

    format: str
    width: int
    height: int


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    """Image bytes together with their decoded 8-bit RGB picture, so that they are decoded once."""

    data: bytes
    picture: Image.Image
    # Whether the source had an alpha channel or a transparent colour, now composited on white.
    had_transparency: bool


@dataclasses.dataclass(frozen=True)
class _OpenedImage:
    """An image whose header has been read and checked, with the EXIF orientation to apply."""

    image: Image.Image
    orientation: int


def describe_image(data: bytes, max_pixels: int) -> ImageInfo:
    """Read an image's format and displayed size from its header without decoding the pixels.

    Raises InvalidInputError and TooLargeError as decode_image does for the header.
    """
    opened = _open(data, max_pixels)
    width, height = opened.image.size
    if opened.orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return ImageInfo(format=opened.image.format or "unknown", width=width, height=height)


def decode_image(data: bytes, max_pixels: int) -> DecodedImage:
    """Decode image bytes into their displayed 8-bit RGB picture, by the rules in the module docstring.

    Raises InvalidInputError for bytes that are not a complete image of a supported format, and
    TooLargeError above max_pixels.
    """
    opened = _open(data, max_pixels)
    image = opened.image
    try:
        image.load()
    except MemoryError as error:
        raise TooLargeError(f"not enough memory to decode the {image.format} image of {image.size} pixels") from error
    except Exception as error:  # noqa: BLE001 - Pillow's decoders raise many types on corrupt data
        raise InvalidInputError(
            f"{image.format} image could not be decoded, it may be truncated or corrupt: {error}"
        ) from error

    had_transparency = image.mode in _ALPHA_MODES or "transparency" in image.info
    if opened.orientation != 1:
        image = image.transpose(TRANSPOSE_BY_ORIENTATION[opened.orientation])
    try:
        picture = to_rgb(image)
    except (ValueError, OSError) as error:
        raise InvalidInputError(
            f"{opened.image.format} image of mode {image.mode} cannot be converted to RGB: {error}"
        ) from error
    return DecodedImage(data=data, picture=picture, had_transparency=had_transparency)


def decode_rgb(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes into an 8-bit RGB picture as it is displayed; see decode_image."""
    return decode_image(data, max_pixels).picture


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded picture of any mode into 8-bit RGB.

    Transparency is composited on BACKGROUND_RGB, and 16-bit and float greyscale are scaled to 8 bits.
    """
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in {"I", "F"}:
        return Image.fromarray(_scale_to_8_bit(image), mode="L").convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND_RGB + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def sniff_format(data: bytes) -> str | None:
    """Name the format that the first bytes of data announce, or return None.

    The name is a guess from a signature, for error messages; only Pillow decides what the bytes are.
    """
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        return _FORMAT_BY_FTYP_BRAND.get(brand, f"ISO media (brand {brand.decode('latin-1')!r})")
    text = data[:4096].lstrip().lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "SVG"
    return None


def _open(data: bytes, max_pixels: int) -> _OpenedImage:
    if not data:
        raise InvalidInputError("image is empty (0 bytes)")
    # Pillow's EXIF parser returns results that depend on warning filters, so a JPEG's EXIF segments
    # are removed before Pillow opens the bytes, and imgsearch_common.exif reads the orientation.
    readable, exif_segments = split_jpeg_exif(data)
    try:
        image = Image.open(io.BytesIO(readable), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError as error:
        raise _unreadable_error(data, detail="") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise TooLargeError(f"image has too many pixels ({error}); the limit is {max_pixels} pixels") from error
    except Exception as error:  # noqa: BLE001 - Pillow's parsers raise many types on corrupt headers
        raise _unreadable_error(data, detail=str(error)) from error

    width, height = image.size
    if width * height > max_pixels:
        raise TooLargeError(
            f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}"
        )
    if width < 1 or height < 1:
        raise InvalidInputError(f"image has an empty size {width}x{height}")
    return _OpenedImage(image=image, orientation=_orientation(image, exif_segments))


def _unreadable_error(data: bytes, detail: str) -> InvalidInputError:
    supported = ", ".join(SUPPORTED_FORMATS)
    name = sniff_format(data)
    if name is None:
        return InvalidInputError(
            f"image format not recognised or not supported ({len(data)} bytes starting {data[:8]!r}); "
            f"the supported formats are {supported}"
        )
    if name == "HEIF" and pillow_heif is None:
        return InvalidInputError(
            "image format HEIF is not supported by this installation; install the optional extra "
            f"imgsearch[heif] (pillow-heif) to read it. The supported formats are {supported}"
        )
    if name not in SUPPORTED_FORMATS:
        return InvalidInputError(f"image format {name} is not supported; the supported formats are {supported}")
    suffix = f": {detail}" if detail else ""
    return InvalidInputError(
        f"{name} image header could not be read, the file may be truncated or corrupt ({len(data)} bytes){suffix}"
    )


def _orientation(image: Image.Image, jpeg_exif_segments: list[bytes]) -> int:
    """Return the EXIF orientation to apply, or 1 with a logged warning when the EXIF cannot be trusted."""
    try:
        return _read_orientation(image, jpeg_exif_segments)
    except MalformedExifError as error:
        log.warning("exif_orientation_ignored", reason=str(error), image_format=image.format)
        return 1


def _read_orientation(image: Image.Image, jpeg_exif_segments: list[bytes]) -> int:
    if jpeg_exif_segments:
        # A later segment without a TIFF header continues the first; one with a header is a second EXIF.
        headers = sum(1 for segment in jpeg_exif_segments if starts_tiff_header(segment))
        if headers > 1:
            raise MalformedExifError(f"the JPEG has {headers} EXIF blocks, so its orientation is ambiguous")
        return orientation_of(b"".join(jpeg_exif_segments))
    if image.format == "TIFF":
        # Pillow's TIFF plugin reports the displayed size and turns the pixels itself, in load().
        return 1

    # NOTE: Pillow reads a PNG's eXIf chunk only when it comes before the pixel data. One after it is
    # not seen here, so that picture keeps its stored orientation.
    block = image.info.get("exif")
    raw_profile = image.info.get("Raw profile type exif")
    if block is None and isinstance(raw_profile, str):
        # ImageMagick stores EXIF in PNG text as "\nexif\n<length>\n<hex lines>".
        try:
            block = bytes.fromhex("".join(raw_profile.split("\n")[3:]))
        except ValueError as error:
            raise MalformedExifError(f"the PNG's EXIF text is not hex: {error}") from error
    if not block:
        return 1
    if not isinstance(block, bytes):
        raise MalformedExifError(f"EXIF is a {type(block).__name__}, expected bytes")
    return orientation_of(block)


def _scale_to_8_bit(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image)
    if image.mode == "F":
        return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    wide = np.clip(pixels.astype(np.int64), 0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)
