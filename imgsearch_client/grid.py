"""Draw a query image beside its neighbours as one PNG, with each neighbour's score below it."""

import pathlib
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from imgsearch_common.errors import ImgsearchError
from imgsearch_common.images import decode_rgb

_TILE = 224
_MAX_PIXELS = 50_000_000
_CAPTION_HEIGHT = 40
_GAP = 8
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)


def draw_grid(query: bytes | None, neighbours: Sequence[tuple[bytes | None, str]], out: pathlib.Path) -> None:
    """Write a one-row grid: the query, then each neighbour's image with its caption.

    neighbours contains (image bytes, caption) pairs; an image that is None or cannot be read is drawn
    as a grey tile, so that the caption is still shown.
    """
    tiles = [(query, "query")] + list(neighbours)
    width = len(tiles) * (_TILE + _GAP) + _GAP
    height = _TILE + _CAPTION_HEIGHT + 2 * _GAP
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=16)

    for position, (image_bytes, caption) in enumerate(tiles):
        left = _GAP + position * (_TILE + _GAP)
        canvas.paste(_thumbnail(image_bytes), (left, _GAP))
        draw.text((left + _TILE / 2, _GAP + _TILE + 6), caption, fill=_TEXT, font=font, anchor="ma")

    canvas.save(out, format="PNG")


def _thumbnail(image_bytes: bytes | None) -> Image.Image:
    tile = Image.new("RGB", (_TILE, _TILE), (200, 200, 200))
    if image_bytes is None:
        return tile
    try:
        picture = decode_rgb(image_bytes, _MAX_PIXELS)
    except ImgsearchError:
        return tile
    picture.thumbnail((_TILE, _TILE))
    tile.paste(picture, ((_TILE - picture.width) // 2, (_TILE - picture.height) // 2))
    return tile
