"""Tests of the query-and-neighbours grid picture."""

import io

from PIL import Image

from imgsearch_client.grid import draw_grid


def _png(colour, size=(300, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_grid_has_one_tile_per_image(tmp_path):
    out = tmp_path / "grid.png"

    draw_grid(_png((255, 0, 0)), [(_png((0, 255, 0)), "0.9000"), (_png((0, 0, 255)), "0.8000")], out)

    with Image.open(out) as grid:
        assert grid.format == "PNG"
        assert grid.width > 3 * 224
        # The centre of each tile shows that image's colour.
        assert grid.getpixel((8 + 112, 8 + 112)) == (255, 0, 0)
        assert grid.getpixel((8 + 232 + 112, 8 + 112)) == (0, 255, 0)
        assert grid.getpixel((8 + 2 * 232 + 112, 8 + 112)) == (0, 0, 255)


def test_unreadable_neighbour_becomes_grey_tile(tmp_path):
    out = tmp_path / "grid.png"

    draw_grid(_png((255, 0, 0)), [(b"not an image", "0.5"), (None, "0.4")], out)

    with Image.open(out) as grid:
        assert grid.getpixel((8 + 232 + 112, 8 + 112)) == (200, 200, 200)
        assert grid.getpixel((8 + 2 * 232 + 112, 8 + 112)) == (200, 200, 200)


def test_transparency_drawn_on_white(tmp_path):
    out = tmp_path / "grid.png"
    buffer = io.BytesIO()
    Image.new("RGBA", (300, 200), (255, 0, 0, 0)).save(buffer, format="PNG")

    draw_grid(buffer.getvalue(), [], out)

    with Image.open(out) as grid:
        assert grid.getpixel((8 + 112, 8 + 112)) == (255, 255, 255)
