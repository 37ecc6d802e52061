"""Tests of the ONNX Runtime embedder's text path, on the tiny random CLIP model and on throwaway models."""

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from onnx import TensorProto

from embed_service.backends.onnx_embedder import OnnxEmbedder
from embed_service.tokenizer import END_OF_TEXT_ID, START_OF_TEXT_ID, default_tokenizer
from imgsearch_common.errors import DeadlineExceededError, FailedPreconditionError, UnavailableError
from tests.fakes.images import noise_images
from tests.fakes.onnx_models import write_model
from tests.unit.embed_service.text_models import write_text_model

_TINY_MODEL_DIR = Path(__file__).resolve().parents[3] / "models" / "tiny-clip-random"
_MAX_PIXELS = 10_000_000
_DIM = 16


@pytest.fixture
def open_embedder():
    """Return a function that creates an OnnxEmbedder and closes it after the test."""
    embedders = []

    def create(model_dir: Path) -> OnnxEmbedder:
        embedder = OnnxEmbedder(model_dir, threads=1, max_image_pixels=_MAX_PIXELS)
        embedders.append(embedder)
        return embedder

    yield create
    for embedder in embedders:
        embedder.close()


@pytest.fixture
def tiny_dir() -> Path:
    if not (_TINY_MODEL_DIR / "textual.onnx").is_file():
        pytest.skip(f"the tiny model is not generated at {_TINY_MODEL_DIR}")
    return _TINY_MODEL_DIR


def _direct_tiny_embedding(text: str) -> np.ndarray:
    """Run textual.onnx of the tiny model on the text's ids, padded with zeros as clip.tokenize pads."""
    ids = default_tokenizer().encode(text)
    padded = np.zeros((1, 77), dtype=np.int32)
    padded[0, : len(ids)] = ids
    session = onnxruntime.InferenceSession(str(_TINY_MODEL_DIR / "textual.onnx"), providers=["CPUExecutionProvider"])
    vector = session.run(["text_embeds"], {"input_ids": padded})[0][0].astype(np.float64)
    return vector / np.linalg.norm(vector)


def _expected_head(ids: list[int], dim: int = _DIM) -> np.ndarray:
    head = np.zeros(dim)
    head[: min(len(ids), dim)] = ids[:dim]
    return head / np.linalg.norm(head)


def test_tiny_text_equals_direct_run(tiny_dir, open_embedder):
    embedder = open_embedder(tiny_dir)

    vector = embedder.embed_text("a dog on a sofa", math.inf)

    assert vector.shape == (512,)
    assert vector.dtype == np.float32
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(vector, _direct_tiny_embedding("a dog on a sofa"), atol=1e-6)


def test_tiny_texts_differ_cleaning_does_not(tiny_dir, open_embedder):
    embedder = open_embedder(tiny_dir)

    dog = embedder.embed_text("a dog on a sofa", math.inf)
    shouted = embedder.embed_text("  A DOG   on a\tSOFA ", math.inf)
    cat = embedder.embed_text("a cat on a sofa", math.inf)

    np.testing.assert_array_equal(dog, shouted)
    assert float(dog @ cat) < 0.999


def test_tiny_text_dim_equals_image_dim(tiny_dir, open_embedder):
    embedder = open_embedder(tiny_dir)

    assert embedder.embed_text("a red car", math.inf).shape == (embedder.info().dim,)


def test_tiny_long_text_cut(tiny_dir, open_embedder):
    embedder = open_embedder(tiny_dir)
    words = " ".join(f"word{index}" for index in range(200))

    vector = embedder.embed_text(words, math.inf)

    np.testing.assert_allclose(vector, _direct_tiny_embedding(words), atol=1e-6)


def test_ids_fed_int64_zero_padded(tmp_path, open_embedder):
    write_model(tmp_path, dim=_DIM)
    write_text_model(tmp_path, dim=_DIM, ids_type=TensorProto.INT64)
    embedder = open_embedder(tmp_path)

    vector = embedder.embed_text("a photo of a cat", math.inf)

    ids = [START_OF_TEXT_ID, 320, 1125, 539, 320, 2368, END_OF_TEXT_ID]
    np.testing.assert_allclose(vector, _expected_head(ids), rtol=1e-5)


def test_mask_ones_over_ids(tmp_path, open_embedder):
    write_model(tmp_path, dim=_DIM)
    write_text_model(tmp_path, dim=_DIM, ids_type=TensorProto.INT32, context=77, with_mask=True)
    embedder = open_embedder(tmp_path)

    vector = embedder.embed_text("a cat", math.inf)

    expected = np.array([START_OF_TEXT_ID + 1, 320 + 1, 2368 + 1, END_OF_TEXT_ID + 1] + [0] * (_DIM - 4), dtype=float)
    np.testing.assert_allclose(vector, expected / np.linalg.norm(expected), rtol=1e-5)


def test_context_length_from_metadata(tmp_path, open_embedder):
    # The model echoes all 5 ids, so its dim is 5.
    write_model(tmp_path, dim=5)
    write_text_model(tmp_path, dim=5, context=5)
    (tmp_path / "imgsearch-model.json").write_text(json.dumps({"context_length": 5}))
    embedder = open_embedder(tmp_path)

    vector = embedder.embed_text("a photo of a cat", math.inf)

    expected = _expected_head([START_OF_TEXT_ID, 320, 1125, 539, END_OF_TEXT_ID], dim=5)
    np.testing.assert_allclose(vector, expected, rtol=1e-5)


def test_missing_text_model_failed_precondition(tmp_path, open_embedder):
    write_model(tmp_path, dim=_DIM)
    embedder = open_embedder(tmp_path)

    with pytest.raises(FailedPreconditionError, match=r"textual\.onnx, which does not exist"):
        embedder.embed_text("a cat", math.inf)

    # The image path is unaffected.
    vectors = embedder.embed_images(noise_images(2, seed=31), math.inf)
    assert all(isinstance(vector, np.ndarray) for vector in vectors)


def test_text_model_added_later_loaded(tmp_path, open_embedder):
    write_model(tmp_path, dim=_DIM)
    embedder = open_embedder(tmp_path)
    with pytest.raises(FailedPreconditionError):
        embedder.embed_text("a cat", math.inf)

    write_text_model(tmp_path, dim=_DIM)

    assert embedder.embed_text("a cat", math.inf).shape == (_DIM,)


def test_missing_image_model_unavailable(tmp_path, open_embedder):
    write_text_model(tmp_path, dim=_DIM)
    embedder = open_embedder(tmp_path)

    with pytest.raises(UnavailableError, match="ONNX model not found"):
        embedder.embed_text("a cat", math.inf)


def test_text_dim_mismatch_failed_precondition(tmp_path, open_embedder):
    write_model(tmp_path, dim=_DIM)
    write_text_model(tmp_path, dim=8)
    embedder = open_embedder(tmp_path)

    with pytest.raises(FailedPreconditionError, match="dim 8, but visual.onnx returns dim 16"):
        embedder.embed_text("a cat", math.inf)


def test_context_mismatch_failed_precondition(tmp_path, open_embedder):
    write_model(tmp_path, dim=_DIM)
    write_text_model(tmp_path, dim=_DIM, context=64)
    embedder = open_embedder(tmp_path)

    with pytest.raises(FailedPreconditionError, match="takes 64 tokens, but the context length is 77"):
        embedder.embed_text("a cat", math.inf)


def test_unknown_input_failed_precondition(tmp_path, open_embedder):
    write_model(tmp_path, dim=_DIM)
    write_text_model(tmp_path, dim=_DIM, ids_name="tokens")
    embedder = open_embedder(tmp_path)

    with pytest.raises(FailedPreconditionError, match=r"must take input_ids.*\['tokens'\]"):
        embedder.embed_text("a cat", math.inf)


def test_float_ids_failed_precondition(tmp_path, open_embedder):
    write_model(tmp_path, dim=_DIM)
    write_text_model(tmp_path, dim=_DIM, ids_type=TensorProto.FLOAT)
    embedder = open_embedder(tmp_path)

    with pytest.raises(FailedPreconditionError, match="must be int32 or int64"):
        embedder.embed_text("a cat", math.inf)


def test_corrupt_text_model_failed_precondition(tmp_path, open_embedder):
    write_model(tmp_path, dim=_DIM)
    (tmp_path / "textual.onnx").write_bytes(b"not an onnx file")
    embedder = open_embedder(tmp_path)

    with pytest.raises(FailedPreconditionError, match="could not be loaded"):
        embedder.embed_text("a cat", math.inf)


@pytest.mark.parametrize("value", ["77", 1, True, None])
def test_bad_context_length_failed_precondition(tmp_path, open_embedder, value):
    write_model(tmp_path, dim=_DIM)
    write_text_model(tmp_path, dim=_DIM)
    (tmp_path / "imgsearch-model.json").write_text(json.dumps({"context_length": value}))
    embedder = open_embedder(tmp_path)

    with pytest.raises(FailedPreconditionError, match="context_length must be an integer of 2 or more"):
        embedder.embed_text("a cat", math.inf)


def test_text_expired_deadline(tmp_path, open_embedder):
    write_model(tmp_path, dim=_DIM)
    write_text_model(tmp_path, dim=_DIM)
    embedder = open_embedder(tmp_path)

    with pytest.raises(DeadlineExceededError, match="before the model ran on the text"):
        embedder.embed_text("a cat", 0.0)


def test_text_after_close_unavailable(tmp_path):
    write_model(tmp_path, dim=_DIM)
    write_text_model(tmp_path, dim=_DIM)
    embedder = OnnxEmbedder(tmp_path, threads=1, max_image_pixels=_MAX_PIXELS)
    embedder.embed_text("a cat", math.inf)
    embedder.close()

    with pytest.raises(UnavailableError, match="closed"):
        embedder.embed_text("a cat", math.inf)
