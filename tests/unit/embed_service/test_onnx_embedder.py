"""Tests of the ONNX Runtime embedder on throwaway models and on the tiny random CLIP model."""

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from embed_service.backends import onnx_embedder
from embed_service.backends.onnx_embedder import OnnxEmbedder
from imgsearch_common.errors import DeadlineExceededError, InvalidInputError, UnavailableError
from tests.fakes.images import noise_images, solid_png
from tests.fakes.onnx_models import write_model

_TINY_MODEL_DIR = Path(__file__).resolve().parents[3] / "models" / "tiny-clip-random"
_MAX_PIXELS = 10_000_000


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


@pytest.fixture(params=["throwaway", "tiny"])
def model_dir(request, tmp_path) -> Path:
    """A folder with a visual.onnx: a throwaway model, or the tiny random CLIP model when present."""
    if request.param == "tiny":
        if not (_TINY_MODEL_DIR / "visual.onnx").is_file():
            pytest.skip(f"the tiny model is not generated at {_TINY_MODEL_DIR}")
        return _TINY_MODEL_DIR
    write_model(tmp_path, dim=16)
    return tmp_path


def test_onnx_vectors_unit_float32(model_dir, open_embedder):
    embedder = open_embedder(model_dir)
    dim = embedder.info().dim

    vectors = embedder.embed_images(noise_images(3, seed=21), math.inf)

    for vector in vectors:
        assert vector.shape == (dim,)
        assert vector.dtype == np.float32
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


def test_onnx_deterministic(model_dir, open_embedder):
    embedder = open_embedder(model_dir)
    images = noise_images(3, seed=22)

    first = embedder.embed_images(images, math.inf)
    second = embedder.embed_images(images, math.inf)

    for one, other in zip(first, second, strict=True):
        np.testing.assert_array_equal(one, other)


def test_onnx_batch_of_8_matches_singles(model_dir, open_embedder):
    embedder = open_embedder(model_dir)
    images = noise_images(8, seed=23)

    batched = embedder.embed_images(images, math.inf)
    singles = [embedder.embed_images([image], math.inf)[0] for image in images]

    for one, other in zip(batched, singles, strict=True):
        np.testing.assert_allclose(one, other, atol=1e-5)


def test_onnx_different_images_differ(model_dir, open_embedder):
    embedder = open_embedder(model_dir)

    first, second = embedder.embed_images(noise_images(2, seed=24), math.inf)

    assert not np.allclose(first, second, atol=1e-3)


def test_onnx_tiny_model_info(open_embedder):
    if not (_TINY_MODEL_DIR / "visual.onnx").is_file():
        pytest.skip(f"the tiny model is not generated at {_TINY_MODEL_DIR}")
    metadata = json.loads((_TINY_MODEL_DIR / "imgsearch-model.json").read_text())

    info = open_embedder(_TINY_MODEL_DIR).info()

    assert info.model_id == metadata["model_id"]
    assert info.dim == 512
    assert info.backend == "onnx"


def test_onnx_model_id_from_file_hash(tmp_path, open_embedder):
    path = write_model(tmp_path, dim=16)
    expected = "onnx-" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]

    info = open_embedder(tmp_path).info()

    assert info.model_id == expected
    assert info.dim == 16


def test_onnx_model_id_from_metadata(tmp_path, open_embedder):
    write_model(tmp_path)
    (tmp_path / "imgsearch-model.json").write_text(json.dumps({"model_id": "clip-test-7"}))

    assert open_embedder(tmp_path).info().model_id == "clip-test-7"


def test_onnx_random_weights_warning(tmp_path, open_embedder):
    write_model(tmp_path)
    (tmp_path / "imgsearch-model.json").write_text(
        json.dumps({"model_id": "random-1", "random_weights": True})
    )

    with capture_logs() as logs:
        open_embedder(tmp_path).check_ready()

    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert [entry["event"] for entry in warnings] == ["onnx_model_has_random_weights"]
    assert warnings[0]["detail"] == "embeddings are not semantically meaningful"


def test_onnx_prefers_image_embeds_output(tmp_path, open_embedder):
    write_model(tmp_path / "plain", seed=5)
    write_model(tmp_path / "two_outputs", seed=5, leading_outputs=("last_hidden_state",))
    image = solid_png(30, 30, (10, 200, 30))

    [plain] = open_embedder(tmp_path / "plain").embed_images([image], math.inf)
    [chosen] = open_embedder(tmp_path / "two_outputs").embed_images([image], math.inf)

    np.testing.assert_allclose(chosen, plain, atol=1e-6)


def test_onnx_uses_output_0_without_image_embeds(tmp_path, open_embedder):
    write_model(tmp_path / "plain", seed=5)
    write_model(tmp_path / "renamed", seed=5, embedding_output="features_out", leading_outputs=("negated",))
    image = solid_png(30, 30, (10, 200, 30))

    [plain] = open_embedder(tmp_path / "plain").embed_images([image], math.inf)
    [first_output] = open_embedder(tmp_path / "renamed").embed_images([image], math.inf)

    np.testing.assert_allclose(first_output, -plain, atol=1e-6)


def test_onnx_input_side_from_model(tmp_path, open_embedder):
    write_model(tmp_path / "side64", side=64)
    write_model(tmp_path / "symbolic", side="side")

    [small] = open_embedder(tmp_path / "side64").embed_images(noise_images(1, seed=25), math.inf)
    [default] = open_embedder(tmp_path / "symbolic").embed_images(noise_images(1, seed=25), math.inf)

    assert isinstance(small, np.ndarray)
    assert isinstance(default, np.ndarray)


def test_onnx_bad_item_error_in_place(model_dir, open_embedder):
    embedder = open_embedder(model_dir)

    results = embedder.embed_images(
        [solid_png(40, 40, (1, 2, 3)), b"\x89PNG broken", solid_png(40, 40, (3, 2, 1))], math.inf
    )

    assert isinstance(results[0], np.ndarray)
    assert isinstance(results[1], InvalidInputError)
    assert isinstance(results[2], np.ndarray)


def test_onnx_expired_deadline(tmp_path, open_embedder):
    write_model(tmp_path)
    embedder = open_embedder(tmp_path)
    embedder.check_ready()

    results = embedder.embed_images([solid_png(40, 40, (1, 2, 3)), b""], timeout_s=0.0)

    assert isinstance(results[0], DeadlineExceededError)
    assert isinstance(results[1], InvalidInputError)


def test_onnx_missing_model_then_loaded(tmp_path, open_embedder):
    embedder = open_embedder(tmp_path)

    with pytest.raises(UnavailableError, match="ONNX model not found"):
        embedder.check_ready()
    with pytest.raises(UnavailableError, match="ONNX model not found"):
        embedder.embed_images([solid_png(40, 40, (0, 0, 0))], math.inf)

    write_model(tmp_path)
    embedder.check_ready()
    assert embedder.info().dim == 16


def test_onnx_corrupt_model_unavailable(tmp_path, open_embedder):
    (tmp_path / "visual.onnx").write_bytes(b"this is not an onnx model")

    with pytest.raises(UnavailableError, match="could not be loaded"):
        open_embedder(tmp_path).check_ready()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"model_id": 7}'])
def test_onnx_bad_metadata_unavailable(tmp_path, open_embedder, text):
    write_model(tmp_path)
    (tmp_path / "imgsearch-model.json").write_text(text)

    with pytest.raises(UnavailableError, match="imgsearch-model.json"):
        open_embedder(tmp_path).check_ready()


def test_onnx_fixed_batch_unavailable(tmp_path, open_embedder):
    write_model(tmp_path, batch=1)

    with pytest.raises(UnavailableError, match="dynamic batch dimension"):
        open_embedder(tmp_path).check_ready()


def test_onnx_closed_unavailable(tmp_path, open_embedder):
    write_model(tmp_path)
    embedder = open_embedder(tmp_path)
    embedder.check_ready()
    embedder.close()

    with pytest.raises(UnavailableError, match="closed"):
        embedder.embed_images([solid_png(40, 40, (0, 0, 0))], math.inf)


class _SymbolicDimSession:
    """A stand-in for an InferenceSession whose declared output shape hides the dim."""

    class _Output:
        name = "image_embeds"
        shape = ["batch", "dim"]

    def __init__(self, dim: int, output_rank: int = 2):
        self.dim = dim
        self.output_rank = output_rank
        self.runs = []

    def get_outputs(self):
        return [self._Output()]

    def run(self, output_names, feeds):
        self.runs.append((output_names, {name: value.shape for name, value in feeds.items()}))
        shape = (1, self.dim) if self.output_rank == 2 else (1, 2, self.dim)
        return [np.ones(shape, dtype=np.float32)]


def test_output_dim_probes_symbolic_shape():
    session = _SymbolicDimSession(dim=24)

    dim = onnx_embedder._output_dim(session, "pixel_values", 224, "image_embeds")

    assert dim == 24
    assert session.runs == [(["image_embeds"], {"pixel_values": (1, 3, 224, 224)})]


def test_output_dim_rejects_wrong_rank():
    with pytest.raises(UnavailableError, match=r"shape \(batch, dim\)"):
        onnx_embedder._output_dim(
            _SymbolicDimSession(dim=24, output_rank=3), "pixel_values", 224, "image_embeds"
        )
