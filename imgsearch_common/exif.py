"""A strict reader of the EXIF Orientation tag, so that malformed EXIF is detected here instead of inside Pillow.

Pillow parses EXIF with warnings.warn for corrupt data and keeps what it could read, so its result
depends on the process's warning filters. This module reads only what orientation needs, the first
IFD of the EXIF TIFF structure, and raises MalformedExifError for anything it cannot trust.
"""

import struct

from PIL import Image

ORIENTATION_TAG = 0x0112
EXIF_HEADER = b"Exif\x00\x00"

# The transpose that turns the stored pixels into the displayed picture, per EXIF orientation, as in
# Pillow's ImageOps.exif_transpose. Orientation 1, the stored pixels as they are, needs none.
TRANSPOSE_BY_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_BYTE_ORDER_BY_TIFF_HEADER = {b"II*\x00": "<", b"MM\x00*": ">"}
_SHORT_TYPE = 3
_IFD_ENTRY_BYTES = 12
_JPEG_SOI = b"\xff\xd8"
_JPEG_APP1 = 0xE1
_JPEG_SOS = 0xDA
# Markers without a length field: TEM, RST0-7, SOI and EOI.
_JPEG_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xDA)}


class MalformedExifError(ValueError):
    """EXIF data whose orientation cannot be trusted."""


def split_jpeg_exif(data: bytes) -> tuple[bytes, list[bytes]]:
    """Return JPEG bytes without their EXIF APP1 segments, and each segment's content after the Exif header.

    Bytes that are not a JPEG, or a JPEG without EXIF, come back unchanged with an empty list. The
    scan stops at the first byte that is not a well-formed marker segment and keeps the rest as it is,
    so a corrupt JPEG stays corrupt for the decoder to reject.
    """
    if not data.startswith(_JPEG_SOI):
        return data, []
    kept = [_JPEG_SOI]
    exif_segments = []
    position = len(_JPEG_SOI)
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:  # a fill byte before a marker
            kept.append(data[position : position + 1])
            position += 1
            continue
        if marker == _JPEG_SOS or marker in _JPEG_STANDALONE_MARKERS:
            break
        end = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if end > len(data):
            break
        segment = data[position:end]
        if marker == _JPEG_APP1 and segment[4:].startswith(EXIF_HEADER):
            exif_segments.append(segment[4 + len(EXIF_HEADER) :])
        else:
            kept.append(segment)
        position = end
    if not exif_segments:
        return data, []
    kept.append(data[position:])
    return b"".join(kept), exif_segments


def starts_tiff_header(block: bytes) -> bool:
    """Return whether block starts with a TIFF header, as the first segment of an EXIF block does."""
    return block.removeprefix(EXIF_HEADER)[:4] in _BYTE_ORDER_BY_TIFF_HEADER


def orientation_of(block: bytes) -> int:
    """Return the Orientation (1 to 8) of an EXIF block's first IFD, or 1 when the tag is absent.

    block is the TIFF structure, with or without the "Exif\\0\\0" header. Raises MalformedExifError
    naming the problem when the header, the IFD or the tag cannot be read, or the value is outside 1 to 8.
    """
    tiff = block.removeprefix(EXIF_HEADER)
    byte_order = _BYTE_ORDER_BY_TIFF_HEADER.get(tiff[:4])
    if byte_order is None:
        raise MalformedExifError(f"EXIF does not start with a TIFF header, it starts {tiff[:4]!r}")
    try:
        (ifd_offset,) = struct.unpack_from(byte_order + "I", tiff, 4)
        if not 8 <= ifd_offset <= len(tiff) - 2:
            raise MalformedExifError(f"EXIF IFD0 offset {ifd_offset} is outside the {len(tiff)}-byte block")
        (entry_count,) = struct.unpack_from(byte_order + "H", tiff, ifd_offset)
        entries_end = ifd_offset + 2 + _IFD_ENTRY_BYTES * entry_count
        if entries_end > len(tiff):
            raise MalformedExifError(
                f"EXIF IFD0 has {entry_count} entries, which end at byte {entries_end} of a {len(tiff)}-byte block"
            )
        for entry_offset in range(ifd_offset + 2, entries_end, _IFD_ENTRY_BYTES):
            tag, value_type, count = struct.unpack_from(byte_order + "HHI", tiff, entry_offset)
            if tag == ORIENTATION_TAG:
                return _orientation_value(tiff, byte_order, entry_offset, value_type, count)
    except struct.error as error:
        raise MalformedExifError(f"EXIF is truncated: {error}") from error
    return 1


def _orientation_value(tiff: bytes, byte_order: str, entry_offset: int, value_type: int, count: int) -> int:
    if value_type != _SHORT_TYPE or count != 1:
        raise MalformedExifError(
            f"EXIF orientation has type {value_type} and count {count}, expected one SHORT (type 3)"
        )
    (value,) = struct.unpack_from(byte_order + "H", tiff, entry_offset + 8)
    if not 1 <= value <= 8:
        raise MalformedExifError(f"EXIF orientation is {value}, expected 1 to 8")
    return value
