"""Tests of the Inference embedder's text path against the local stand-in: JSON, cutting, retries, faults.

Timeouts and backoffs are a few hundredths of a second, so every test finishes in about a second or less.
"""

import math
import time

import grpc
import numpy as np
import pytest
import requests
from structlog.testing import capture_logs

from embed_service.backends.inference_embedder import EMBED_TEXT_PATH
from embed_service.tokenizer import default_tokenizer
from imgsearch_common.errors import DeadlineExceededError, InvalidInputError, UnavailableError
from imgsearch_common.grpc_errors import status_for
from tests.fakes.images import solid_png
from tests.fakes.inference_standin import (
    TEXT_TOO_LONG_MESSAGE,
    Behaviour,
    fake_embedding,
    fake_text_embedding,
)

_API_KEY = "rf-secret-key-7c4e1a"
_TEXT = "a dog on a sofa"


def _normalised(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def _retry_logs(logs: list[dict]) -> list[dict]:
    return [entry for entry in logs if entry["event"] == "inference_request_retried"]


def test_text_request_json(standin, make_embedder):
    embedder = make_embedder(standin.url, api_key=_API_KEY)

    embedder.embed_text(_TEXT, math.inf)

    [request] = standin.requests
    assert request.path == EMBED_TEXT_PATH
    assert request.content_type == "application/json"
    assert request.body == {"text": _TEXT, "clip_version_id": "ViT-B-32", "api_key": _API_KEY}


def test_text_request_json_without_api_key(standin, make_embedder):
    embedder = make_embedder(standin.url)

    embedder.embed_text(_TEXT, math.inf)

    assert standin.requests[0].body == {"text": _TEXT, "clip_version_id": "ViT-B-32"}


def test_text_vector_normalised(standin, make_embedder):
    embedder = make_embedder(standin.url)

    vector = embedder.embed_text(_TEXT, math.inf)

    assert vector.dtype == np.float32
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(vector, _normalised(fake_text_embedding(_TEXT)), atol=1e-6)


def test_text_learns_dim(standin, make_embedder):
    embedder = make_embedder(standin.url)

    embedder.embed_text(_TEXT, math.inf)

    assert embedder.info().dim == 512
    # info() needed no probe image: the text taught the dim.
    assert [request.path for request in standin.requests] == [EMBED_TEXT_PATH]


def test_long_text_cut_before_sending(standin, make_embedder):
    embedder = make_embedder(standin.url)
    text = " ".join(f"Word{index}" for index in range(150))

    vector = embedder.embed_text(text, math.inf)

    sent = standin.requests[0].text
    assert sent == default_tokenizer().fit_to_context(text)
    assert sent.startswith("word0 word1 ")
    assert len(default_tokenizer().encode(sent)) <= 77
    np.testing.assert_allclose(vector, _normalised(fake_text_embedding(sent)), atol=1e-6)


def test_standin_rejects_long_text_like_server(standin):
    # Without the cut, the server returns 400. This checks that the stand-in does too, so that the test above can fail.
    text = " ".join(f"word{index}" for index in range(150))

    response = requests.post(standin.url + EMBED_TEXT_PATH, json={"text": text}, timeout=5)

    assert response.status_code == 400
    assert response.json() == {"message": TEXT_TOO_LONG_MESSAGE}


@pytest.mark.parametrize("behaviour", [Behaviour.STATUS_500, Behaviour.STATUS_504, Behaviour.DROP_CONNECTION])
def test_text_retry_then_success(standin, make_embedder, behaviour):
    standin.fail_next(behaviour, count=2)
    embedder = make_embedder(standin.url, retries=2)

    with capture_logs() as logs:
        vector = embedder.embed_text(_TEXT, math.inf)

    np.testing.assert_allclose(vector, _normalised(fake_text_embedding(_TEXT)), atol=1e-6)
    assert len(standin.requests) == 3
    assert [entry["attempt"] for entry in _retry_logs(logs)] == [1, 2]


def test_text_retries_exhausted_unavailable(standin, make_embedder):
    standin.behaviour = Behaviour.STATUS_500
    embedder = make_embedder(standin.url, retries=2)

    with pytest.raises(UnavailableError) as failure:
        embedder.embed_text(_TEXT, math.inf)

    assert "HTTP 500" in str(failure.value)
    assert "after 3 attempts" in str(failure.value)
    assert status_for(failure.value)[0] is grpc.StatusCode.UNAVAILABLE
    assert len(standin.requests) == 3


def test_text_malformed_json_not_retried(standin, make_embedder):
    standin.behaviour = Behaviour.MALFORMED_JSON
    embedder = make_embedder(standin.url, retries=3)

    with pytest.raises(UnavailableError, match="not JSON"):
        embedder.embed_text(_TEXT, math.inf)

    assert len(standin.requests) == 1


def test_text_400_invalid_argument(standin, make_embedder):
    standin.behaviour = Behaviour.STATUS_400
    embedder = make_embedder(standin.url, retries=3)

    with pytest.raises(InvalidInputError, match="rejected the text: stand-in was told to reject"):
        embedder.embed_text(_TEXT, math.inf)

    assert len(standin.requests) == 1


def test_text_401_key_redacted(standin, make_embedder):
    standin.behaviour = Behaviour.STATUS_401
    embedder = make_embedder(standin.url, api_key=_API_KEY)

    with capture_logs() as logs, pytest.raises(UnavailableError) as failure:
        embedder.embed_text(_TEXT, math.inf)

    assert "api_key [redacted] is not valid" in str(failure.value)
    assert _API_KEY not in repr(logs)


def test_text_server_timeout_unavailable(standin, make_embedder):
    standin.behaviour = Behaviour.NO_ANSWER
    embedder = make_embedder(standin.url, timeout_s=0.2, retries=3)

    with pytest.raises(UnavailableError, match="did not complete its response within 0.2 s"):
        embedder.embed_text(_TEXT, timeout_s=30.0)

    assert len(standin.requests) == 1


def test_text_caller_deadline_exceeded(standin, make_embedder):
    standin.behaviour = Behaviour.NO_ANSWER
    embedder = make_embedder(standin.url, timeout_s=10.0)

    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        embedder.embed_text(_TEXT, timeout_s=0.3)

    assert time.monotonic() - started < 0.8


def test_text_trickled_headers_bounded_by_deadline(standin, make_embedder):
    standin.behaviour = Behaviour.TRICKLE_HEADERS
    embedder = make_embedder(standin.url, timeout_s=10.0)

    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        embedder.embed_text(_TEXT, timeout_s=0.3)

    assert time.monotonic() - started < 0.8


def test_text_dim_must_match_images(standin, make_embedder):
    embedder = make_embedder(standin.url)
    [image_vector] = embedder.embed_images([solid_png(8, 8, (10, 20, 30))], math.inf)
    standin.behaviour = Behaviour.WRONG_LENGTH

    with pytest.raises(UnavailableError, match="dim 511, expected 512"):
        embedder.embed_text(_TEXT, math.inf)

    expected = fake_embedding(solid_png(8, 8, (10, 20, 30)))
    np.testing.assert_allclose(image_vector, _normalised(expected), atol=1e-6)


def test_text_failure_logged(standin, make_embedder):
    standin.behaviour = Behaviour.STATUS_500
    embedder = make_embedder(standin.url, retries=0)

    with capture_logs() as logs, pytest.raises(UnavailableError):
        embedder.embed_text(_TEXT, math.inf)

    [entry] = [entry for entry in logs if entry["event"] == "inference_requests_failed"]
    assert entry["failed"] == 1
    assert "HTTP 500" in entry["first_error"]


def test_text_after_close_unavailable(standin, make_embedder):
    embedder = make_embedder(standin.url)
    embedder.close()

    with pytest.raises(UnavailableError, match="closed"):
        embedder.embed_text(_TEXT, math.inf)
