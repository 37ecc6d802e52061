"""Variants of a photo for the duplicate benchmark: exact copies, near copies and near-miss distractors.

Exact kinds keep every displayed pixel (lossless re-encodes, metadata changes, an EXIF-rotated copy).
Near kinds are lossy or lightly edited copies. Distractors change one visible object, so they are
different pictures that only look alike. Flips and 180-degree turns are reported on their own.
"""

import dataclasses
import io
import pathlib
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

EXACT_KINDS = ("png", "rgba-png", "cmyk-tiff", "exif-rotated", "metadata-stripped", "exif-added")
NEAR_KINDS = (
    "jpeg-95", "jpeg-50", "jpeg-20", "resize-50", "resize-25", "crop-2", "crop-5",
    "brightness+15", "brightness-15",
)
DISTRACTOR_KINDS = ("object-moved", "object-recoloured")
SEPARATE_KINDS = ("flip-horizontal", "rotate-180")

# A distractor counts only when its edit is plain to see: at least this share of the pixels changes
# by more than _VISIBLE_LEVELS in some channel's mean.
_VISIBLE_SHARE = 0.02
_VISIBLE_LEVELS = 40
# Objects are taken from the label boxes whose area is within these shares of the picture.
_BOX_AREA_RANGE = (0.03, 0.35)
_EXIF_ORIENTATION = 0x0112
_EXIF_ARTIST = 0x013B


@dataclasses.dataclass(frozen=True)
class Variant:
    """One variant of an original: its kind, encoded bytes and file suffix."""

    kind: str
    data: bytes
    suffix: str


Box = tuple[int, int, int, int]


def make_variants(original: bytes, boxes: list[Box]) -> Iterator[Variant]:
    """Yield every variant of the original JPEG whose kind applies; boxes are object boxes in pixels."""
    picture = Image.open(io.BytesIO(original)).convert("RGB")
    for kind, make in _EXACT.items():
        yield Variant(kind, *make(picture, original))
    for kind, edit in _NEAR.items():
        yield Variant(kind, *edit(picture))
    for kind, edit in _DISTRACTORS.items():
        edited = _first_visible(picture, boxes, edit)
        if edited is not None:
            yield Variant(kind, _encode(edited, "PNG"), ".png")
    yield Variant("flip-horizontal", _encode(ImageOps.mirror(picture), "PNG"), ".png")
    yield Variant("rotate-180", _encode(picture.rotate(180), "PNG"), ".png")


def yolo_boxes(label_file: pathlib.Path, width: int, height: int) -> list[Box]:
    """Read YOLO boxes (class, centre x, centre y, width, height, all normalised) as pixel boxes."""
    if not label_file.is_file():
        return []
    boxes = []
    for line in label_file.read_text().splitlines():
        if not line.strip():
            continue
        _, x, y, w, h = (float(value) for value in line.split())
        boxes.append((int((x - w / 2) * width), int((y - h / 2) * height),
                      int((x + w / 2) * width), int((y + h / 2) * height)))
    return boxes


def _encode(picture: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _exif_rotated(picture: Image.Image) -> bytes:
    """Store the pixels turned 90 degrees anticlockwise, with orientation 6, which turns them back."""
    exif = Image.Exif()
    exif[_EXIF_ORIENTATION] = 6
    return _encode(picture.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif.tobytes())


def _jpeg_segments(data: bytes) -> tuple[list[bytes], bytes]:
    """Split a JPEG into its header segments (after SOI, before SOS) and the rest from SOS on."""
    segments, position = [], 2
    while data[position] == 0xFF and data[position + 1] != 0xDA:
        length = int.from_bytes(data[position + 2:position + 4], "big")
        segments.append(data[position:position + 2 + length])
        position += 2 + length
    return segments, data[position:]


def _metadata_stripped(data: bytes) -> bytes:
    """Drop the APPn and COM segments of a JPEG, which hold metadata but no pixels."""
    segments, rest = _jpeg_segments(data)
    kept = [s for s in segments if not (0xE0 <= s[1] <= 0xEF or s[1] == 0xFE)]
    return data[:2] + b"".join(kept) + rest


def _exif_added(data: bytes) -> bytes:
    """Insert an EXIF block naming an artist right after the JPEG's SOI marker."""
    exif = Image.Exif()
    exif[_EXIF_ARTIST] = "imgsearch duplicate benchmark"
    payload = exif.tobytes()
    segment = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    return data[:2] + segment + data[2:]


def _crop(picture: Image.Image, share: float) -> Image.Image:
    dx, dy = int(picture.width * share), int(picture.height * share)
    return picture.crop((dx, dy, picture.width - dx, picture.height - dy))


def _resize(picture: Image.Image, factor: float) -> Image.Image:
    return picture.resize((round(picture.width * factor), round(picture.height * factor)), Image.Resampling.BICUBIC)


_EXACT: dict[str, Callable[[Image.Image, bytes], tuple[bytes, str]]] = {
    "png": lambda picture, _: (_encode(picture, "PNG"), ".png"),
    "rgba-png": lambda picture, _: (_encode(picture.convert("RGBA"), "PNG"), ".png"),
    "cmyk-tiff": lambda picture, _: (_encode(picture.convert("CMYK"), "TIFF"), ".tif"),
    "exif-rotated": lambda picture, _: (_exif_rotated(picture), ".png"),
    "metadata-stripped": lambda _, original: (_metadata_stripped(original), ".jpg"),
    "exif-added": lambda _, original: (_exif_added(original), ".jpg"),
}

_NEAR: dict[str, Callable[[Image.Image], tuple[bytes, str]]] = {
    "jpeg-95": lambda picture: (_encode(picture, "JPEG", quality=95), ".jpg"),
    "jpeg-50": lambda picture: (_encode(picture, "JPEG", quality=50), ".jpg"),
    "jpeg-20": lambda picture: (_encode(picture, "JPEG", quality=20), ".jpg"),
    "resize-50": lambda picture: (_encode(_resize(picture, 0.5), "PNG"), ".png"),
    "resize-25": lambda picture: (_encode(_resize(picture, 0.25), "PNG"), ".png"),
    "crop-2": lambda picture: (_encode(_crop(picture, 0.02), "PNG"), ".png"),
    "crop-5": lambda picture: (_encode(_crop(picture, 0.05), "PNG"), ".png"),
    "brightness+15": lambda picture: (_encode(ImageEnhance.Brightness(picture).enhance(1.15), "PNG"), ".png"),
    "brightness-15": lambda picture: (_encode(ImageEnhance.Brightness(picture).enhance(0.85), "PNG"), ".png"),
}


def _move_object(picture: Image.Image, box: Box) -> Image.Image:
    """Paste the object one box width aside and fill its old place with a heavy blur of the picture."""
    left, top, right, bottom = box
    width = right - left
    new_left = left + width if left + 2 * width <= picture.width else max(0, left - width)
    edited = picture.copy()
    edited.paste(picture.filter(ImageFilter.GaussianBlur(25)).crop(box), (left, top))
    edited.paste(picture.crop(box), (new_left, top))
    return edited


def _recolour_object(picture: Image.Image, box: Box) -> Image.Image:
    """Turn the hue of the object's box half way round the colour wheel."""
    hsv = np.asarray(picture.convert("HSV")).copy()
    left, top, right, bottom = box
    hsv[top:bottom, left:right, 0] = (hsv[top:bottom, left:right, 0].astype(np.int16) + 128) % 256
    return Image.fromarray(hsv, mode="HSV").convert("RGB")


_DISTRACTORS: dict[str, Callable[[Image.Image, Box], Image.Image]] = {
    "object-moved": _move_object,
    "object-recoloured": _recolour_object,
}


def _first_visible(picture: Image.Image, boxes: list[Box], edit) -> Image.Image | None:
    """Apply edit to the largest suitable box whose result is visible; None when no box gives one."""
    area = picture.width * picture.height
    low, high = _BOX_AREA_RANGE
    suitable = [b for b in boxes if low <= (b[2] - b[0]) * (b[3] - b[1]) / area <= high]
    for box in sorted(suitable, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True):
        edited = edit(picture, box)
        change = np.abs(np.asarray(edited, np.int16) - np.asarray(picture, np.int16)).mean(axis=2)
        if (change > _VISIBLE_LEVELS).mean() >= _VISIBLE_SHARE:
            return edited
    return None
