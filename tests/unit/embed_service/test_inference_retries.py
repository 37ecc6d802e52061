"""Tests of the Inference embedder against a misbehaving server: retries, timeouts, isolation, secrets.

The faults come from the local stand-in (tests/fakes/inference_standin.py). Timeouts and backoffs
are a few hundredths of a second, so every test finishes in about a second or less.
"""

import base64
import logging
import math
import socket
import threading
import time

import grpc
import numpy as np
import pytest
from structlog.testing import capture_logs

from embed_service.backends import inference_embedder
from imgsearch_common.errors import DeadlineExceededError, InvalidInputError, UnavailableError
from imgsearch_common.grpc_errors import status_for
from tests.fakes.images import noise_images, solid_png
from tests.fakes.inference_standin import Behaviour, fake_embedding

_API_KEY = "rf-secret-key-5e1f7c"
_MARKER = b"FAULTY-IMAGE"


def _image(seed: int = 0) -> bytes:
    return solid_png(8, 8, (seed, 40, 80))


def _marked(image: bytes) -> bytes:
    # Pillow ignores bytes after a PNG's IEND chunk, so the marked image still decodes.
    return image + _MARKER


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _retry_logs(logs: list[dict]) -> list[dict]:
    return [entry for entry in logs if entry["event"] == "inference_request_retried"]


@pytest.mark.parametrize("behaviour", [Behaviour.STATUS_500, Behaviour.STATUS_504, Behaviour.DROP_CONNECTION])
def test_retry_then_success(standin, make_embedder, behaviour):
    standin.fail_next(behaviour, count=2)
    embedder = make_embedder(standin.url, retries=2)

    with capture_logs() as logs:
        [result] = embedder.embed_images([_image()], math.inf)

    assert isinstance(result, np.ndarray)
    expected = fake_embedding(_image())
    np.testing.assert_allclose(result, expected / np.linalg.norm(expected), atol=1e-6)
    assert len(standin.requests) == 3
    retries = _retry_logs(logs)
    assert [entry["attempt"] for entry in retries] == [1, 2]
    assert all(entry["log_level"] == "warning" for entry in retries)
    assert all(entry["max_attempts"] == 3 for entry in retries)


def test_retries_exhausted_unavailable(standin, make_embedder):
    standin.behaviour = Behaviour.STATUS_500
    embedder = make_embedder(standin.url, retries=2)

    [result] = embedder.embed_images([_image()], math.inf)

    assert isinstance(result, UnavailableError)
    assert "HTTP 500" in str(result)
    assert "after 3 attempts" in str(result)
    assert status_for(result)[0] is grpc.StatusCode.UNAVAILABLE
    assert len(standin.requests) == 3


def test_retries_zero_sends_once(standin, make_embedder):
    standin.behaviour = Behaviour.STATUS_500
    embedder = make_embedder(standin.url, retries=0)

    with capture_logs() as logs:
        [result] = embedder.embed_images([_image()], math.inf)

    assert isinstance(result, UnavailableError)
    assert "attempts" not in str(result)
    assert len(standin.requests) == 1
    assert _retry_logs(logs) == []


def test_connection_refused_retried_unavailable(make_embedder):
    embedder = make_embedder(_closed_port_url(), retries=2)

    with capture_logs() as logs:
        [result] = embedder.embed_images([_image()], math.inf)

    assert isinstance(result, UnavailableError)
    assert "ConnectionError" in str(result)
    assert "after 3 attempts" in str(result)
    assert status_for(result)[0] is grpc.StatusCode.UNAVAILABLE
    assert len(_retry_logs(logs)) == 2


@pytest.mark.parametrize(
    ("behaviour", "error_type", "text"),
    [
        (Behaviour.STATUS_400, InvalidInputError, "stand-in was told to reject every image"),
        (Behaviour.STATUS_401, UnavailableError, "HTTP 401"),
        (Behaviour.MALFORMED_JSON, UnavailableError, "not JSON"),
    ],
)
def test_no_retry_on_4xx_or_bad_body(standin, make_embedder, behaviour, error_type, text):
    standin.behaviour = behaviour
    embedder = make_embedder(standin.url, retries=3)

    with capture_logs() as logs:
        [result] = embedder.embed_images([_image()], math.inf)

    assert isinstance(result, error_type)
    assert text in str(result)
    assert len(standin.requests) == 1
    assert _retry_logs(logs) == []


def test_no_retry_on_unknown_route(standin, make_embedder):
    embedder = make_embedder(standin.url + "/wrong-prefix", retries=3)

    [result] = embedder.embed_images([_image()], math.inf)

    assert isinstance(result, UnavailableError)
    assert "HTTP 404" in str(result)
    assert len(standin.requests) == 1


def test_no_retry_on_wrong_length(standin, make_embedder):
    embedder = make_embedder(standin.url, retries=3)
    embedder.check_ready()
    standin.behaviour = Behaviour.WRONG_LENGTH

    [result] = embedder.embed_images([_image()], math.inf)

    assert isinstance(result, UnavailableError)
    assert "dim 511, expected 512" in str(result)
    assert len(standin.requests) == 2  # the probe and one embed request


def test_no_retry_after_timeout(standin, make_embedder):
    standin.behaviour = Behaviour.NO_ANSWER
    embedder = make_embedder(standin.url, timeout_s=0.2, retries=3)

    [result] = embedder.embed_images([_image()], timeout_s=30.0)

    assert isinstance(result, UnavailableError)
    assert "did not complete its response within 0.2 s" in str(result)
    assert len(standin.requests) == 1


def test_backoff_doubles_with_jitter(standin, make_embedder):
    standin.behaviour = Behaviour.STATUS_500
    embedder = make_embedder(standin.url, retries=3, backoff_s=0.02)

    with capture_logs() as logs:
        started = time.monotonic()
        embedder.embed_images([_image()], math.inf)
        elapsed = time.monotonic() - started

    delays = [entry["delay_s"] for entry in _retry_logs(logs)]
    assert len(delays) == 3
    for index, delay in enumerate(delays):
        base = 0.02 * 2**index
        assert base * 0.5 - 0.001 <= delay <= base + 0.001
    assert elapsed >= sum(delays) - 0.005


def test_backoff_capped(standin, make_embedder, monkeypatch):
    monkeypatch.setattr(inference_embedder, "_MAX_BACKOFF_S", 0.03)
    standin.behaviour = Behaviour.STATUS_500
    embedder = make_embedder(standin.url, retries=4, backoff_s=0.02)

    with capture_logs() as logs:
        embedder.embed_images([_image()], math.inf)

    delays = [entry["delay_s"] for entry in _retry_logs(logs)]
    assert len(delays) == 4
    assert all(delay <= 0.03 + 0.001 for delay in delays)
    assert all(delay >= 0.015 - 0.001 for delay in delays[1:])


def test_many_retries_stop_at_deadline(standin, make_embedder):
    # Forty retries with doubling backoffs would take minutes. The one-second deadline stops them early.
    standin.behaviour = Behaviour.STATUS_500
    embedder = make_embedder(standin.url, retries=40, backoff_s=0.2)

    started = time.monotonic()
    [result] = embedder.embed_images([_image()], timeout_s=1.0)
    elapsed = time.monotonic() - started

    assert isinstance(result, UnavailableError)
    assert "not retried" in str(result)
    assert 1 < len(standin.requests) < 10
    assert elapsed < 1.0


def test_retry_skipped_when_deadline_too_close(standin, make_embedder):
    standin.behaviour = Behaviour.STATUS_500
    embedder = make_embedder(standin.url, retries=2, backoff_s=2.0)

    with capture_logs() as logs:
        started = time.monotonic()
        [result] = embedder.embed_images([_image()], timeout_s=0.5)
        elapsed = time.monotonic() - started

    assert isinstance(result, UnavailableError)
    assert "not retried" in str(result)
    assert "HTTP 500" in str(result)
    assert len(standin.requests) == 1
    assert _retry_logs(logs) == []
    assert elapsed < 0.5


def test_trickled_body_bounded_by_timeout(standin, make_embedder):
    # Eight bytes every 20 ms: no single read waits long, but the whole body would take many seconds.
    standin.behaviour = Behaviour.TRICKLE
    embedder = make_embedder(standin.url, timeout_s=0.3, retries=2)

    started = time.monotonic()
    [result] = embedder.embed_images([_image()], timeout_s=30.0)
    elapsed = time.monotonic() - started

    assert isinstance(result, UnavailableError)
    assert "did not complete its response within 0.3 s" in str(result)
    assert 0.3 <= elapsed < 0.8
    assert len(standin.requests) == 1


def test_trickled_body_bounded_by_deadline(standin, make_embedder):
    standin.behaviour = Behaviour.TRICKLE
    embedder = make_embedder(standin.url, timeout_s=10.0)

    started = time.monotonic()
    [result] = embedder.embed_images([_image()], timeout_s=0.3)
    elapsed = time.monotonic() - started

    assert isinstance(result, DeadlineExceededError)
    assert status_for(result)[0] is grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 0.8


def test_trickled_headers_bounded_by_deadline(standin, make_embedder):
    # One header byte every 20 ms: each socket read is quick, but the headers take about 2 s.
    standin.behaviour = Behaviour.TRICKLE_HEADERS
    embedder = make_embedder(standin.url, timeout_s=10.0)

    started = time.monotonic()
    [result] = embedder.embed_images([_image()], timeout_s=0.3)
    elapsed = time.monotonic() - started

    assert isinstance(result, DeadlineExceededError)
    assert elapsed < 0.8


def test_no_answer_deadline_exceeded(standin, make_embedder):
    standin.behaviour = Behaviour.NO_ANSWER
    embedder = make_embedder(standin.url, timeout_s=10.0)

    started = time.monotonic()
    [result] = embedder.embed_images([_image()], timeout_s=0.3)
    elapsed = time.monotonic() - started

    assert isinstance(result, DeadlineExceededError)
    assert elapsed < 0.8


def test_slow_answer_within_timeout_succeeds(standin, make_embedder):
    standin.behaviour = Behaviour.SLOW
    standin.delay_s = 0.1
    embedder = make_embedder(standin.url, timeout_s=1.0)

    [result] = embedder.embed_images([_image()], timeout_s=2.0)

    assert isinstance(result, np.ndarray)


@pytest.mark.parametrize(
    ("behaviour", "error_type"),
    [
        (Behaviour.STATUS_500, UnavailableError),
        (Behaviour.MALFORMED_JSON, UnavailableError),
        (Behaviour.NO_ANSWER, DeadlineExceededError),
    ],
)
def test_faulty_image_others_embedded(standin, make_embedder, behaviour, error_type):
    standin.fail_images_containing(_MARKER, behaviour)
    embedder = make_embedder(standin.url, timeout_s=5.0)
    images = noise_images(5, seed=21)
    images[2] = _marked(images[2])

    results = embedder.embed_images(images, timeout_s=0.5)

    assert isinstance(results[2], error_type)
    for index in (0, 1, 3, 4):
        expected = fake_embedding(images[index])
        assert isinstance(results[index], np.ndarray)
        np.testing.assert_allclose(results[index], expected / np.linalg.norm(expected), atol=1e-6)


def test_faulty_image_retried_alone(standin, make_embedder):
    standin.fail_images_containing(_MARKER, Behaviour.STATUS_500)
    embedder = make_embedder(standin.url, retries=2)
    images = noise_images(3, seed=22)
    images[0] = _marked(images[0])

    embedder.embed_images(images, math.inf)

    sent = [request.image for request in standin.requests]
    assert sent.count(images[0]) == 3
    assert sent.count(images[1]) == 1
    assert sent.count(images[2]) == 1


def test_concurrency_bounded_with_probes(standin, make_embedder):
    standin.behaviour = Behaviour.SLOW
    standin.delay_s = 0.05
    embedder = make_embedder(standin.url, concurrency=2)
    probe_errors = []

    def probe_repeatedly():
        for _ in range(4):
            try:
                embedder.check_ready()
            except UnavailableError as error:
                probe_errors.append(error)

    prober = threading.Thread(target=probe_repeatedly)
    prober.start()
    results = embedder.embed_images(noise_images(8, seed=23), timeout_s=10.0)
    prober.join()

    assert all(isinstance(result, np.ndarray) for result in results)
    assert probe_errors == []
    assert len(standin.requests) == 12
    assert standin.max_in_flight == 2


def test_wait_for_slot_bounded_by_deadline(standin, make_embedder):
    standin.fail_images_containing(_MARKER, Behaviour.NO_ANSWER)
    embedder = make_embedder(standin.url, concurrency=1, timeout_s=5.0)
    blocker = threading.Thread(target=embedder.embed_images, args=([_marked(_image(1))], 0.6))
    blocker.start()
    _wait_until(lambda: standin.in_flight == 1)

    started = time.monotonic()
    [result] = embedder.embed_images([_image(2)], timeout_s=0.2)
    elapsed = time.monotonic() - started
    blocker.join()

    assert isinstance(result, DeadlineExceededError)
    assert "free connection" in str(result)
    assert elapsed < 0.6
    assert len(standin.requests) == 1


def test_close_interrupts_backoff(standin, make_embedder):
    standin.behaviour = Behaviour.STATUS_500
    embedder = make_embedder(standin.url, retries=1, backoff_s=20.0)
    results = []
    caller = threading.Thread(target=lambda: results.extend(embedder.embed_images([_image()], math.inf)))
    caller.start()
    _wait_until(lambda: len(standin.requests) == 1)

    started = time.monotonic()
    embedder.close()
    caller.join(timeout=5)

    assert time.monotonic() - started < 2.0
    assert isinstance(results[0], UnavailableError)
    assert "closed during a retry backoff" in str(results[0])


def test_api_key_never_logged_or_returned(standin, make_embedder, caplog):
    caplog.set_level(logging.DEBUG)
    standin.fail_images_containing(b"KEY-ECHO", Behaviour.STATUS_401)
    standin.fail_images_containing(b"SERVER-ERROR", Behaviour.STATUS_500)
    standin.fail_images_containing(b"HANG-UP", Behaviour.DROP_CONNECTION)
    standin.fail_images_containing(b"NO-ANSWER", Behaviour.NO_ANSWER)
    embedder = make_embedder(standin.url, api_key=_API_KEY, timeout_s=0.3)
    images = [_image(1), _image(2) + b"KEY-ECHO", _image(3) + b"SERVER-ERROR", _image(4) + b"HANG-UP"]
    images.append(_image(5) + b"NO-ANSWER")

    with capture_logs() as logs:
        embedder.check_ready()
        results = embedder.embed_images(images, timeout_s=5.0)
    with pytest.raises(UnavailableError) as probe_failure:
        make_embedder(_closed_port_url(), api_key=_API_KEY).check_ready()

    assert isinstance(results[0], np.ndarray)
    assert all(isinstance(result, UnavailableError) for result in results[1:])
    assert "api_key [redacted] is not valid" in str(results[1])
    assert {request.body["api_key"] for request in standin.requests} == {_API_KEY}
    assert len(_retry_logs(logs)) == 4
    assert any(record.levelno == logging.DEBUG for record in caplog.records)
    assert _API_KEY not in caplog.text
    assert _API_KEY not in repr(logs)
    assert all(_API_KEY not in str(result) for result in results[1:])
    assert _API_KEY not in str(probe_failure.value)


def test_images_sent_as_base64_only(standin, make_embedder):
    embedder = make_embedder(standin.url)
    images = noise_images(3, seed=24)

    embedder.check_ready()
    standin.fail_next(Behaviour.STATUS_500, count=2)
    embedder.embed_images(images, math.inf)

    assert len(standin.requests) == 6
    for request in standin.requests:
        assert request.body["image"]["type"] == "base64"
        assert set(request.body["image"]) == {"type", "value"}
        assert base64.b64decode(request.body["image"]["value"], validate=True) == request.image
    assert {request.image for request in standin.requests} >= set(images)


def _wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition did not become true in time"
        time.sleep(0.005)
