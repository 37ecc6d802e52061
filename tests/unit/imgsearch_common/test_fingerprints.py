"""Tests of the model-free fingerprints: pixel hash, pHash and local difference."""

import io

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from imgsearch_common.fingerprints import (
    FINGERPRINT_VERSION,
    LAYOUT_BYTES,
    compare,
    compute_fingerprint,
    local_differences,
    phash_distance,
)
from imgsearch_common.images import decode_rgb

_MAX_PIXELS = 10_000_000


def _scene(seed: int = 0, size=(320, 240)) -> Image.Image:
    """A smooth random scene with a few solid rectangles: photo-like low frequencies and edges."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    picture = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
    pixels = np.asarray(picture).copy()
    for _ in range(4):
        left, top = rng.integers(0, size[0] - 60), rng.integers(0, size[1] - 60)
        pixels[top:top + 50, left:left + 50] = rng.integers(0, 256, size=3)
    return Image.fromarray(pixels)


def _reencoded(picture: Image.Image, image_format: str, **options) -> Image.Image:
    buffer = io.BytesIO()
    picture.save(buffer, format=image_format, **options)
    return decode_rgb(buffer.getvalue(), _MAX_PIXELS)


def test_fingerprint_fields():
    fingerprint = compute_fingerprint(_scene())

    assert fingerprint.version == FINGERPRINT_VERSION
    assert len(fingerprint.pixel_sha256) == 64
    assert 0 <= fingerprint.phash < 2**64
    assert (fingerprint.width, fingerprint.height) == (320, 240)
    assert len(fingerprint.layout) == LAYOUT_BYTES


def test_lossless_copy_has_same_pixel_hash():
    jpeg_pixels = _reencoded(_scene(), "JPEG", quality=80)
    png_copy = _reencoded(jpeg_pixels, "PNG")

    assert compute_fingerprint(png_copy).pixel_sha256 == compute_fingerprint(jpeg_pixels).pixel_sha256


def test_one_changed_pixel_changes_pixel_hash():
    picture = _scene()
    changed = picture.copy()
    changed.putpixel((5, 5), (0, 0, 0) if picture.getpixel((5, 5)) != (0, 0, 0) else (1, 1, 1))

    assert compute_fingerprint(changed).pixel_sha256 != compute_fingerprint(picture).pixel_sha256


@pytest.mark.parametrize(
    "edit",
    [
        lambda picture: _reencoded(picture, "JPEG", quality=20),
        lambda picture: picture.resize((80, 60), Image.Resampling.BICUBIC),
        lambda picture: ImageEnhance.Brightness(picture).enhance(1.15),
        lambda picture: ImageEnhance.Brightness(picture).enhance(0.85),
        lambda picture: picture.crop((6, 5, 314, 235)),
    ],
    ids=["jpeg-20", "resize-25", "brighter", "darker", "crop-2-percent"],
)
def test_light_edits_stay_close(edit):
    original = compute_fingerprint(_scene())
    edited = compute_fingerprint(edit(_scene()))

    distance = compare(original, edited)

    assert distance.phash_distance <= 12
    assert distance.local_difference < 0.43


def test_moved_object_is_a_large_local_difference():
    picture = _scene(seed=3)
    pixels = np.asarray(picture).copy()
    patch = pixels[90:150, 40:100].copy()
    pixels[90:150, 40:100] = pixels[90:150, 0:60]
    pixels[90:150, 200:260] = patch

    distance = compare(compute_fingerprint(picture), compute_fingerprint(Image.fromarray(pixels)))

    assert distance.local_difference > 0.6


def test_different_scenes_are_far_apart():
    distance = compare(compute_fingerprint(_scene(seed=1)), compute_fingerprint(_scene(seed=2)))

    assert distance.local_difference > 1.0
    assert distance.phash_distance > 12


def test_tiny_and_flat_pictures_work():
    tiny = compute_fingerprint(Image.new("RGB", (1, 1), (10, 20, 30)))
    flat = compute_fingerprint(Image.new("RGB", (50, 40), (10, 20, 30)))

    assert compare(tiny, flat).local_difference == pytest.approx(0.0, abs=1e-6)


def test_phash_distance_counts_bits():
    assert phash_distance(0b1011, 0b0001) == 2
    assert phash_distance(2**64 - 1, 0) == 64


def test_non_rgb_picture_is_rejected():
    with pytest.raises(ValueError, match="expected an RGB picture, got mode L"):
        compute_fingerprint(Image.new("L", (4, 4)))


def test_other_version_is_not_compared():
    fingerprint = compute_fingerprint(_scene())
    other = type(fingerprint)(**{**fingerprint.__dict__, "version": FINGERPRINT_VERSION + 1})

    with pytest.raises(ValueError, match="cannot compare fingerprint versions"):
        compare(fingerprint, other)


def test_batched_local_differences_match_one_by_one():
    fingerprints = [compute_fingerprint(_scene(seed)) for seed in range(4)]
    fingerprints.append(compute_fingerprint(_scene(0).resize((160, 120))))
    pairs = [(0, 4), (1, 2), (3, 3), (4, 0), (2, 1)]

    batched = local_differences([fingerprints[a].layout for a, _ in pairs], [fingerprints[b].layout for _, b in pairs])

    for (first, second), value in zip(pairs, batched, strict=True):
        assert value == pytest.approx(compare(fingerprints[first], fingerprints[second]).local_difference, abs=1e-5)


def test_batched_local_differences_reject_unequal_lists():
    with pytest.raises(ValueError, match="got 1 first layouts but 0 second layouts"):
        local_differences([b"x"], [])
