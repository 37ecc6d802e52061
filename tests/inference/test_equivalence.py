"""Our onnx backend and the inference backend agree on the same image and the same tiny CLIP files.

The server decodes with OpenCV and preprocesses with openai/CLIP's _transform. The onnx backend
decodes with Pillow and preprocesses in embed_service/preprocess.py. Both should give the same
embedding, so each case must reach cosine >= _MIN_COSINE. test_strip_catches_mistakes shows that
the bound catches a channel swap, a squash, another crop and an ignored EXIF orientation with this
model. With inference 1.8.3 every case below reached cosine 0.9999 or more.
"""

import numpy as np
import pytest
from PIL import Image

from tests.fakes.images import encode
from tests.inference.sample_images import (
    half_transparent_png,
    odd_mode_images,
    photo_like,
    rotated_jpeg,
    strip_picture,
)
from tests.inference.support import cosine

pytestmark = pytest.mark.inference

_MIN_COSINE = 0.99


def _cases() -> dict[str, bytes]:
    strip = strip_picture()
    cases = {
        "strip_png": encode(strip),
        "strip_jpeg": encode(strip, "JPEG", quality=90),
        "strip_portrait_png": encode(strip.transpose(Image.Transpose.ROTATE_90)),
        "strip_exif_rotated_jpeg": rotated_jpeg(strip),
        "photo_640x480_png": encode(photo_like(61, 640, 480)),
        "photo_500x375_jpeg": encode(photo_like(62, 500, 375), "JPEG", quality=90),
        "photo_427x640_png": encode(photo_like(63, 427, 640)),
        "photo_640x427_jpeg": encode(photo_like(64, 640, 427), "JPEG", quality=75),
    }
    for mode, data in odd_mode_images().items():
        cases[f"mode_{mode}"] = data
    return cases


def _strip_mistakes() -> dict[str, Image.Image]:
    """Return the strip as each preprocessing mistake would show it to the model."""
    strip = strip_picture()
    side = min(strip.size)
    return {
        "channels_swapped": Image.fromarray(np.asarray(strip)[:, :, ::-1].copy()),
        "squashed_not_cropped": strip.resize((224, 224), Image.Resampling.BICUBIC),
        "left_crop": strip.crop((0, 0, side, side)),
        "orientation_ignored": strip.transpose(Image.Transpose.ROTATE_90),
    }


_CASES = _cases()
_STRIP_MISTAKES = _strip_mistakes()


@pytest.mark.parametrize("case", list(_CASES))
def test_backends_agree(case, onnx_service, inference_service):
    image = _CASES[case]

    [ours] = onnx_service.embed_vectors([image])
    [theirs] = inference_service.embed_vectors([image])

    assert cosine(ours, theirs) >= _MIN_COSINE


@pytest.mark.parametrize("mistake", list(_STRIP_MISTAKES))
def test_strip_catches_mistakes(mistake, onnx_service):
    correct, wrong = onnx_service.embed_vectors([encode(strip_picture()), encode(_STRIP_MISTAKES[mistake])])

    assert cosine(correct, wrong) < _MIN_COSINE


def test_transparency_flattened_like_onnx(onnx_service, inference_service):
    """The server alone drops alpha and keeps the colours under transparent pixels (OpenCV
    IMREAD_COLOR). The inference backend therefore sends such images composited on white, as the
    onnx backend sees them, and the two agree.
    """
    rgba_png, rgb_picture = half_transparent_png()

    [server] = inference_service.embed_vectors([rgba_png])
    alpha_dropped, composited = onnx_service.embed_vectors([encode(rgb_picture), rgba_png])

    assert cosine(server, composited) >= _MIN_COSINE
    assert cosine(server, alpha_dropped) < _MIN_COSINE
