"""Tests of the strict EXIF orientation reader and of the header rules of imgsearch_common.images."""

import io
import struct
import warnings

import numpy as np
import pytest
from PIL import Image

from imgsearch_common.errors import InvalidInputError, TooLargeError
from imgsearch_common.exif import EXIF_HEADER, MalformedExifError, orientation_of, split_jpeg_exif
from imgsearch_common.images import decode_image, describe_image, sniff_format

_MAX_PIXELS = 1_000_000


def _tiff(entries: list[tuple[int, int, int, bytes]], byte_order: str = "<", ifd_offset: int = 8) -> bytes:
    """Build an EXIF TIFF block whose IFD0 holds entries of (tag, type, count, 4-byte value field)."""
    header = (b"II*\x00" if byte_order == "<" else b"MM\x00*") + struct.pack(byte_order + "I", ifd_offset)
    body = struct.pack(byte_order + "H", len(entries))
    for tag, value_type, count, value in entries:
        body += struct.pack(byte_order + "HHI", tag, value_type, count) + value
    return header + b"\x00" * (ifd_offset - 8) + body + b"\x00\x00\x00\x00"


def _orientation_entry(value: int, byte_order: str = "<") -> tuple[int, int, int, bytes]:
    return (0x0112, 3, 1, struct.pack(byte_order + "HH", value, 0))


def _encode(picture: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _picture() -> Image.Image:
    return Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 60, 3), dtype=np.uint8))


# orientation_of


@pytest.mark.parametrize("byte_order", ["<", ">"])
@pytest.mark.parametrize("value", range(1, 9))
def test_orientation_read_in_both_byte_orders(byte_order, value):
    make = (0x010F, 2, 4, b"Cam\x00")
    block = _tiff([make, _orientation_entry(value, byte_order)], byte_order)

    assert orientation_of(block) == value
    assert orientation_of(EXIF_HEADER + block) == value


def test_orientation_absent_is_1():
    assert orientation_of(_tiff([(0x010F, 2, 4, b"Cam\x00")])) == 1


@pytest.mark.parametrize(
    ("block", "message_part"),
    [
        (b"XX*\x00\x08\x00\x00\x00", "does not start with a TIFF header"),
        (b"II*\x00", "EXIF is truncated"),
        (_tiff([_orientation_entry(6)], ifd_offset=4), "IFD0 offset 4 is outside"),
        (_tiff([_orientation_entry(6)])[:12], "entries, which end at byte 22"),
        (_tiff([(0x0112, 2, 4, b"six\x00")]), "type 2 and count 4"),
        (_tiff([(0x0112, 3, 2, b"\x06\x00\x06\x00")]), "type 3 and count 2"),
        (_tiff([_orientation_entry(0)]), "orientation is 0"),
        (_tiff([_orientation_entry(9)]), "orientation is 9"),
    ],
    ids=["bad header", "no IFD offset", "offset in header", "truncated IFD", "ASCII", "two values", "0", "9"],
)
def test_malformed_orientation_raises(block, message_part):
    with pytest.raises(MalformedExifError, match=message_part):
        orientation_of(block)


# split_jpeg_exif


def test_split_removes_only_exif():
    exif = Image.Exif()
    exif[0x0112] = 6
    plain = _encode(_picture(), "JPEG", quality=90)
    with_exif = _encode(_picture(), "JPEG", quality=90, exif=exif.tobytes())

    stripped, segments = split_jpeg_exif(with_exif)

    assert len(segments) == 1
    assert orientation_of(segments[0]) == 6
    assert stripped == plain


@pytest.mark.parametrize(
    "data",
    [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe1\xff\xff" + EXIF_HEADER, b"\xff\xd8\xff\xd9"],
    ids=["empty", "PNG", "segment past the end", "no segments"],
)
def test_split_leaves_other_bytes(data):
    assert split_jpeg_exif(data) == (data, [])


# Header rules


def test_decode_same_under_any_warning_filter():
    # Pillow warns about this corrupt EXIF when it parses it; the decoder never lets it parse it.
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "TestCam"
    jpeg = bytearray(_encode(_picture(), "JPEG", quality=90, exif=exif.tobytes()))
    tiff_start = jpeg.index(EXIF_HEADER) + len(EXIF_HEADER)
    jpeg[tiff_start + 5] ^= 0x40  # IFD0 offset far outside the block
    results = []
    for action in ("error", "ignore", "default"):
        with warnings.catch_warnings():
            warnings.simplefilter(action)
            results.append(decode_image(bytes(jpeg), _MAX_PIXELS).picture.size)

    assert results == [(60, 40)] * 3


def test_tiff_orientation_applied_once():
    data = _encode(_picture(), "TIFF", tiffinfo={0x0112: 6})

    info = describe_image(data, _MAX_PIXELS)
    picture = decode_image(data, _MAX_PIXELS).picture

    assert (info.width, info.height) == (40, 60)
    assert picture.size == (40, 60)


def test_pixel_limit_checked_before_decode():
    # A 2000x2000 PNG: its header alone says it is over the limit.
    data = _encode(Image.new("1", (2000, 2000)), "PNG")

    with pytest.raises(TooLargeError, match="2000x2000 = 4000000 pixels, above the limit of 1000000"):
        describe_image(data, _MAX_PIXELS)
    with pytest.raises(TooLargeError, match="above the limit of 1000000"):
        decode_image(data, _MAX_PIXELS)


def test_unsupported_known_format_named():
    ico = _encode(_picture(), "ICO")

    with pytest.raises(InvalidInputError, match="image format ICO is not supported"):
        decode_image(ico, _MAX_PIXELS)


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (b"\xff\xd8\xff\xdb", "JPEG"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "WEBP"),
        (b"\x00\x00\x00\x1cftypavif", "AVIF"),
        (b"\x00\x00\x00\x18ftypheic", "HEIF"),
        (b"\x00\x00\x00\x18ftypisom", "ISO media (brand 'isom')"),
        (b"  <svg xmlns='http://www.w3.org/2000/svg'/>", "SVG"),
        (b"%PDF-1.4", "PDF"),
        (b"hello", None),
    ],
)
def test_sniff_format(data, name):
    assert sniff_format(data) == name


def test_heif_without_optional_plugin_names_the_extra(monkeypatch):
    from imgsearch_common import images

    monkeypatch.setattr(images, "pillow_heif", None)
    # An ISO base media file header with the HEIC brand, and no picture after it.
    heic_header = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic"

    with pytest.raises(InvalidInputError, match=r"install the optional extra imgsearch\[heif\]"):
        images.decode_image(heic_header, 1_000_000)
