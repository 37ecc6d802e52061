"""Text embedding against the real Inference server, which runs the same tiny CLIP files as our onnx backend.

The server tokenizes with openai/CLIP's own clip.tokenize, and our onnx backend with embed_service's
tokenizer. The tiny model's weights are random, so any difference in token ids changes the vector:
equal vectors from both show equal ids. Findings about the server's API, checked below:
- POST /clip/embed_text with {"text": "...", "clip_version_id": ...} returns {"embeddings": [[512 floats]]},
  not normalised.
- A text of more than 77 tokens returns HTTP 400 "Error with model input. Cause: Text input is too long
  ...", where openai/CLIP's clip.tokenize(truncate=True) would cut it.
"""

import grpc
import numpy as np
import pytest
import requests

from embed_service.tokenizer import default_tokenizer
from imgsearch.embed.v1 import embed_service_pb2
from tests.inference.support import CALL_TIMEOUT_S, CLIP_VERSION_ID, cosine

pytestmark = pytest.mark.inference

_DIM = 512
EMBED_TEXT_PATH = "/clip/embed_text"
# Texts whose cleaning or splitting is easy to get wrong: case, whitespace, HTML entities, curly
# quotes that ftfy straightens, contractions, accents, CJK, emoji and digits.
_TEXTS = [
    "a dog on a sofa",
    "  A   DOG\ton a\nSOFA ",
    "cats &amp; dogs",
    "\u201ccurly quotes\u201d and the dog's toy",
    "Café naïve résumé",
    "东京塔的照片",
    "emoji 🐶🐱 party 3.14",
]
# 100 one-token words: cut after the 75th by openai/CLIP's truncation and by our cut alike.
_LONG_TEXT = "dog " * 100


@pytest.fixture(scope="module")
def post_text(inference_url):
    """Return a function that sends one text to POST /clip/embed_text and returns the response."""
    with requests.Session() as session:

        def post(text: str) -> requests.Response:
            body = {"text": text, "clip_version_id": CLIP_VERSION_ID}
            return session.post(inference_url + EMBED_TEXT_PATH, json=body, timeout=CALL_TIMEOUT_S)

        yield post


def _server_vector(post_text, text: str) -> np.ndarray:
    response = post_text(text)
    assert response.status_code == 200, response.text
    [vector] = response.json()["embeddings"]
    return np.array(vector, dtype=np.float64)


def _embed_text(service, text: str) -> embed_service_pb2.EmbedTextResponse:
    return service.stub.EmbedText(embed_service_pb2.EmbedTextRequest(text=text), timeout=CALL_TIMEOUT_S)


def test_server_text_raw_vector(post_text):
    vector = _server_vector(post_text, "a dog on a sofa")

    assert vector.shape == (_DIM,)
    assert np.all(np.isfinite(vector))
    assert abs(np.linalg.norm(vector) - 1.0) > 1e-3


def test_server_rejects_long_text_400(post_text):
    response = post_text(_LONG_TEXT)

    assert response.status_code == 400
    assert "Text input is too long" in response.json()["message"]


@pytest.mark.parametrize("text", _TEXTS)
def test_onnx_backend_equals_server(text, onnx_service, post_text):
    server = _server_vector(post_text, text)

    ours = np.array(_embed_text(onnx_service, text).embedding.values)

    np.testing.assert_allclose(ours, server / np.linalg.norm(server), atol=1e-5)


def test_texts_give_different_vectors(post_text):
    # Without this, the equality checks above could not fail on a wrong token id.
    vectors = [_server_vector(post_text, text) for text in ("a dog on a sofa", "a cat on a sofa", "cats & dogs")]

    assert cosine(vectors[0], vectors[1]) < 0.999
    assert cosine(vectors[0], vectors[2]) < 0.999


@pytest.mark.parametrize("text", [_TEXTS[0], _TEXTS[3]])
def test_inference_backend_equals_onnx_backend(text, inference_service, onnx_service):
    through_server = _embed_text(inference_service, text).embedding
    in_process = _embed_text(onnx_service, text).embedding

    assert through_server.model_id == CLIP_VERSION_ID
    np.testing.assert_allclose(through_server.values, in_process.values, atol=1e-5)


def test_inference_backend_cuts_long_text(inference_service, onnx_service):
    through_server = _embed_text(inference_service, _LONG_TEXT).embedding
    in_process = _embed_text(onnx_service, _LONG_TEXT).embedding

    assert default_tokenizer().fit_to_context(_LONG_TEXT) != _LONG_TEXT
    np.testing.assert_allclose(through_server.values, in_process.values, atol=1e-5)


def test_inference_backend_cuts_long_word(inference_service):
    # One word of far more than 77 tokens: the cut falls inside it, and the server accepts the rest.
    response = _embed_text(inference_service, "🐶" * 200)

    assert len(response.embedding.values) == _DIM
    assert np.linalg.norm(response.embedding.values) == pytest.approx(1.0, abs=1e-5)


def test_inference_backend_empty_text_invalid_argument(inference_service):
    with pytest.raises(grpc.RpcError) as raised:
        _embed_text(inference_service, " ")

    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
