"""Tests of the duplicate benchmark's variants: exact kinds keep the pixels, the others change them."""

import io

import numpy as np
from PIL import Image

from bench.dupes_variants import DISTRACTOR_KINDS, EXACT_KINDS, NEAR_KINDS, SEPARATE_KINDS, make_variants
from imgsearch_common.fingerprints import pixel_sha256
from imgsearch_common.images import decode_rgb

_MAX_PIXELS = 10_000_000


def _photo() -> bytes:
    rng = np.random.default_rng(5)
    picture = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize((320, 240))
    pixels = np.asarray(picture).copy()
    pixels[80:160, 60:140] = (200, 30, 30)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_every_kind_is_made_once():
    variants = list(make_variants(_photo(), [(60, 80, 140, 160)]))

    kinds = [variant.kind for variant in variants]
    assert sorted(kinds) == sorted(EXACT_KINDS + NEAR_KINDS + DISTRACTOR_KINDS + SEPARATE_KINDS)


def test_exact_kinds_keep_pixels_and_change_bytes():
    original = _photo()
    reference = pixel_sha256(decode_rgb(original, _MAX_PIXELS))

    for variant in make_variants(original, [(60, 80, 140, 160)]):
        same_pixels = pixel_sha256(decode_rgb(variant.data, _MAX_PIXELS)) == reference
        assert same_pixels == (variant.kind in EXACT_KINDS), variant.kind
        assert variant.data != original, variant.kind


def test_no_distractor_without_a_suitable_box():
    kinds = {variant.kind for variant in make_variants(_photo(), [])}

    assert not kinds & set(DISTRACTOR_KINDS)
