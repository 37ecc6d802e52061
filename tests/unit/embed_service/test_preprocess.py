"""Tests of CLIP preprocessing, and of decoding odd image modes into the RGB it expects.

The expected values come from known properties (a pass-through, a centre crop of two colour
strips, the normalisation of pure colours), not from a second implementation of the steps.
"""

import numpy as np
import pytest
from PIL import Image

from embed_service.preprocess import CLIP_MEAN, CLIP_STD, centre_crop, preprocess, resize_shortest_side
from imgsearch_common.images import BACKGROUND_RGB, decode_rgb
from tests.fakes.images import encode

_MAX_PIXELS = 50_000_000
_EXIF_ORIENTATION = 0x0112


def _strips(width: int, height: int, left_rgb, right_rgb) -> Image.Image:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = left_rgb
    pixels[:, width // 2 :] = right_rgb
    return Image.fromarray(pixels)


def _pixels_from_input(clip_input: np.ndarray) -> np.ndarray:
    """Undo the normalisation: (1, 3, H, W) CLIP input back to (H, W, 3) values in [0, 1]."""
    return clip_input[0].transpose(1, 2, 0) * CLIP_STD + CLIP_MEAN


def test_preprocess_shape_and_dtype():
    image = Image.new("RGB", (301, 200), (10, 20, 30))

    clip_input = preprocess(image)

    assert clip_input.shape == (1, 3, 224, 224)
    assert clip_input.dtype == np.float32
    assert clip_input.flags["C_CONTIGUOUS"]


def test_preprocess_square_224_only_normalises():
    pixels = np.random.default_rng(3).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)

    clip_input = preprocess(Image.fromarray(pixels))

    np.testing.assert_allclose(_pixels_from_input(clip_input), pixels / 255.0, atol=1e-6)


def test_preprocess_normalises_each_rgb_channel():
    red = preprocess(Image.new("RGB", (224, 224), (255, 0, 0)))

    assert red[0, 0, 0, 0] == pytest.approx((1.0 - 0.48145466) / 0.26862954, abs=1e-5)
    assert red[0, 1, 0, 0] == pytest.approx((0.0 - 0.4578275) / 0.26130258, abs=1e-5)
    assert red[0, 2, 0, 0] == pytest.approx((0.0 - 0.40821073) / 0.27577711, abs=1e-5)


def test_preprocess_crops_centre_of_wide_image():
    # 448x224 needs no resize, and the centre crop keeps columns 112..335, half red and half blue.
    image = _strips(448, 224, left_rgb=(255, 0, 0), right_rgb=(0, 0, 255))

    pixels = _pixels_from_input(preprocess(image))

    np.testing.assert_allclose(pixels[:, :112], np.broadcast_to([1.0, 0.0, 0.0], (224, 112, 3)), atol=1e-6)
    np.testing.assert_allclose(pixels[:, 112:], np.broadcast_to([0.0, 0.0, 1.0], (224, 112, 3)), atol=1e-6)


def test_preprocess_resizes_then_crops_centre():
    # 896x448 shrinks to 448x224, then the crop shows the two strips meeting in the middle.
    image = _strips(896, 448, left_rgb=(255, 0, 0), right_rgb=(0, 0, 255))

    pixels = _pixels_from_input(preprocess(image))

    # Bicubic filtering blurs a few columns around the edge between the strips.
    np.testing.assert_allclose(pixels[:, :100], np.broadcast_to([1.0, 0.0, 0.0], (224, 100, 3)), atol=1e-6)
    np.testing.assert_allclose(pixels[:, 124:], np.broadcast_to([0.0, 0.0, 1.0], (224, 100, 3)), atol=1e-6)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((301, 200), (337, 224)),  # 224 * 301 / 200 = 337.12 is truncated
        ((200, 301), (224, 337)),
        ((1000, 500), (448, 224)),
        ((100, 100), (224, 224)),
        ((224, 500), (224, 500)),
    ],
)
def test_resize_shortest_side_sizes(size, expected):
    resized = resize_shortest_side(Image.new("RGB", size), 224)

    assert resized.size == expected


@pytest.mark.parametrize(("height", "first_row"), [(225, 0), (226, 1), (227, 2), (229, 2)])
def test_centre_crop_rounds_half_to_even(height, first_row):
    # Each row's value is its index, so the first kept row shows the crop offset.
    rows = np.repeat(np.arange(height, dtype=np.uint8)[:, np.newaxis], 224, axis=1)
    image = Image.fromarray(np.stack([rows] * 3, axis=-1))

    cropped = np.asarray(centre_crop(image, 224))

    assert cropped.shape == (224, 224, 3)
    assert cropped[0, 0, 0] == first_row


def test_centre_crop_rejects_small_image():
    with pytest.raises(ValueError, match="at least 224x224"):
        centre_crop(Image.new("RGB", (224, 100)), 224)


def test_preprocess_rejects_non_rgb():
    with pytest.raises(ValueError, match="mode L"):
        preprocess(Image.new("L", (224, 224)))


def test_decode_mode_1_to_black_and_white():
    image = Image.new("1", (8, 2), 0)
    image.paste(1, (4, 0, 8, 2))

    rgb = np.asarray(decode_rgb(encode(image), _MAX_PIXELS))

    assert rgb.shape == (2, 8, 3)
    assert (rgb[:, :4] == 0).all()
    assert (rgb[:, 4:] == 255).all()


def test_decode_mode_l_to_equal_channels():
    rgb = np.asarray(decode_rgb(encode(Image.new("L", (4, 4), 100)), _MAX_PIXELS))

    assert (rgb == 100).all()


def test_decode_mode_p_to_palette_colours():
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 128, 255] + [0, 0, 0] * 254)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)

    rgb = np.asarray(decode_rgb(encode(image), _MAX_PIXELS))

    assert rgb[0, 0].tolist() == [255, 0, 0]
    assert rgb[0, 1].tolist() == [0, 128, 255]


def test_decode_mode_p_transparency_on_white():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 0, 128, 255] + [0, 0, 0] * 254)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    data = encode(image, transparency=0)

    rgb = np.asarray(decode_rgb(data, _MAX_PIXELS))

    assert rgb[0, 0].tolist() == list(BACKGROUND_RGB)
    assert rgb[0, 1].tolist() == [0, 128, 255]


def test_decode_mode_la_on_white():
    pixels = np.array([[[0, 0], [0, 255], [0, 128]]], dtype=np.uint8)  # black at alpha 0, 255 and 128
    image = Image.fromarray(pixels, mode="LA")

    rgb = np.asarray(decode_rgb(encode(image), _MAX_PIXELS))

    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[0, 1].tolist() == [0, 0, 0]
    assert abs(int(rgb[0, 2, 0]) - 127) <= 1


def test_decode_mode_rgba_on_white():
    pixels = np.array([[[255, 0, 0, 0], [0, 0, 255, 255]]], dtype=np.uint8)

    rgb = np.asarray(decode_rgb(encode(Image.fromarray(pixels)), _MAX_PIXELS))

    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[0, 1].tolist() == [0, 0, 255]


def test_decode_mode_cmyk_to_rgb():
    image = Image.new("CMYK", (2, 1))
    image.putpixel((0, 0), (255, 0, 0, 0))  # cyan
    image.putpixel((1, 0), (0, 0, 0, 0))  # no ink: white

    rgb = np.asarray(decode_rgb(encode(image, "TIFF"), _MAX_PIXELS))

    assert rgb[0, 0].tolist() == [0, 255, 255]
    assert rgb[0, 1].tolist() == [255, 255, 255]


def test_decode_mode_i16_gradient_to_8_bit():
    # 16-bit value 257 * v is exactly the 8-bit value v.
    ramp = (np.arange(256, dtype=np.uint16) * 257)[np.newaxis, :].repeat(2, axis=0)
    image = Image.fromarray(ramp)
    assert image.mode == "I;16"

    rgb = np.asarray(decode_rgb(encode(image), _MAX_PIXELS))

    assert rgb.shape == (2, 256, 3)
    assert rgb[0, :, 0].tolist() == list(range(256))
    assert (rgb[..., 0] == rgb[..., 1]).all()
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_decode_exif_orientation_6_turns_picture():
    # Stored 40x20 with red on the left. Orientation 6 shows it turned 90 degrees clockwise.
    image = _strips(40, 20, left_rgb=(255, 0, 0), right_rgb=(0, 0, 255))
    exif = Image.Exif()
    exif[_EXIF_ORIENTATION] = 6
    data = encode(image, "JPEG", quality=95, exif=exif.tobytes())

    rgb = np.asarray(decode_rgb(data, _MAX_PIXELS)).astype(int)

    assert rgb.shape == (40, 20, 3)
    assert np.abs(rgb[5, 10] - [255, 0, 0]).max() < 40  # top shows the stored left strip
    assert np.abs(rgb[35, 10] - [0, 0, 255]).max() < 40
