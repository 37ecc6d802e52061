"""Tests of the health watcher in embed_service/server.py, stepped one probe at a time.

BackendHealth watches any backend; the Inference backend is the one that goes down and comes back
in practice. A fake server lets each test run the watcher's loop one interval at a time, so no
test depends on timing.
"""

import queue
import threading

import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from structlog.testing import capture_logs

from embed_service.backends.base import ModelInfo
from embed_service.server import BackendHealth, HealthRecordingEmbedder
from embed_service.servicer import SERVICE_NAME
from imgsearch_common.errors import DeadlineExceededError, FailedPreconditionError, InvalidInputError, UnavailableError

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_VECTOR = np.ones(4, dtype=np.float32) / 2


class FakeEmbedder:
    """An embedder whose readiness and embed results the test sets. It counts probes and records close()."""

    def __init__(self):
        self.ready_error: Exception | None = None
        self.results: list = []
        self.raises: Exception | None = None
        self.probes = 0
        self.closed = False

    def info(self) -> ModelInfo:
        return ModelInfo(model_id="fake-model", dim=4, backend="fake")

    def embed_images(self, images: list[bytes], timeout_s: float) -> list:
        if self.raises:
            raise self.raises
        return list(self.results)

    def embed_text(self, text: str, timeout_s: float) -> np.ndarray:
        if self.raises:
            raise self.raises
        return _VECTOR

    def check_ready(self) -> None:
        self.probes += 1
        if self.ready_error:
            raise self.ready_error

    def close(self) -> None:
        self.closed = True


class FakeHealthServicer:
    """Stores the last status set for each service name, as HealthServicer.set does."""

    def __init__(self):
        self.statuses: dict[str, int] = {}

    def set(self, service: str, status: int) -> None:
        self.statuses[service] = status


class SteppedServer:
    """A stand-in for grpc.Server whose wait_for_termination returns when the test calls next_interval or terminate."""

    def __init__(self):
        self._replies: queue.Queue = queue.Queue()
        self._waiting: queue.Queue = queue.Queue()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        self._waiting.put(timeout)
        return self._replies.get(timeout=5)

    def wait_until_waiting(self) -> float:
        """Block until the watcher has finished an iteration, and return the timeout it waits with."""
        return self._waiting.get(timeout=5)

    def next_interval(self) -> None:
        """Let one interval pass, and return once the watcher's next iteration has finished."""
        self._replies.put(True)
        self.wait_until_waiting()

    def terminate(self) -> None:
        self._replies.put(False)


@pytest.fixture
def embedder():
    return FakeEmbedder()


@pytest.fixture
def health_servicer():
    return FakeHealthServicer()


@pytest.fixture
def start_watching(embedder, health_servicer):
    """Start BackendHealth.watch on a SteppedServer, wait for its first probe, and stop it afterwards."""
    running = []

    def start(failure_threshold: int = 3) -> tuple[BackendHealth, SteppedServer]:
        backend_health = BackendHealth(embedder, health_servicer, 0.5, failure_threshold)
        server = SteppedServer()
        watcher = threading.Thread(target=backend_health.watch, args=(server,), daemon=True)
        watcher.start()
        running.append((server, watcher))
        assert server.wait_until_waiting() == 0.5
        return backend_health, server

    yield start
    for server, watcher in running:
        server.terminate()
        watcher.join(timeout=5)


def _status(health_servicer: FakeHealthServicer) -> int:
    assert health_servicer.statuses[""] == health_servicer.statuses[SERVICE_NAME]
    return health_servicer.statuses[SERVICE_NAME]


def test_first_probe_passes_serving(embedder, health_servicer, start_watching):
    with capture_logs() as logs:
        start_watching()

    assert _status(health_servicer) == _SERVING
    assert embedder.probes == 1
    assert [entry["event"] for entry in logs] == ["embed_service_ready"]
    assert logs[0]["model_id"] == "fake-model"


def test_failed_probe_not_serving_then_recovers(embedder, health_servicer, start_watching):
    embedder.ready_error = UnavailableError("server at 127.0.0.1 refused the connection")
    with capture_logs() as logs:
        _, server = start_watching()
        assert _status(health_servicer) == _NOT_SERVING

        server.next_interval()
        assert _status(health_servicer) == _NOT_SERVING
        embedder.ready_error = None
        server.next_interval()

    assert _status(health_servicer) == _SERVING
    assert [entry["event"] for entry in logs] == ["embed_backend_not_ready", "embed_service_ready"]
    assert logs[0]["reason"] == "server at 127.0.0.1 refused the connection"
    assert logs[0]["log_level"] == "warning"


def test_probe_fails_after_serving(embedder, health_servicer, start_watching):
    _, server = start_watching()
    embedder.ready_error = UnavailableError("HTTP 500")

    with capture_logs() as logs:
        server.next_interval()
        server.next_interval()
        embedder.ready_error = UnavailableError("HTTP 504")
        server.next_interval()

    assert _status(health_servicer) == _NOT_SERVING
    assert [entry["reason"] for entry in logs] == ["HTTP 500", "HTTP 504"]


def test_probe_bug_not_serving(embedder, health_servicer, start_watching):
    embedder.ready_error = KeyError("dim")

    with capture_logs() as logs:
        _, server = start_watching()
        embedder.ready_error = None
        server.next_interval()

    assert _status(health_servicer) == _SERVING
    events = [entry["event"] for entry in logs]
    assert events[:2] == ["embed_backend_check_failed_unexpectedly", "embed_backend_not_ready"]


def test_consecutive_failures_turn_not_serving(embedder, health_servicer, start_watching):
    backend_health, _ = start_watching(failure_threshold=3)
    failure = UnavailableError("HTTP 500")

    backend_health.record_results([failure, failure])
    assert _status(health_servicer) == _SERVING
    with capture_logs() as logs:
        backend_health.record_results([failure])

    assert _status(health_servicer) == _NOT_SERVING
    assert logs[0]["event"] == "embed_backend_failed_repeatedly"
    assert logs[0]["consecutive_failures"] == 3
    assert logs[0]["last_error"] == "HTTP 500"


def test_embedded_image_resets_failures(embedder, health_servicer, start_watching):
    backend_health, _ = start_watching(failure_threshold=3)
    failure = UnavailableError("HTTP 500")

    backend_health.record_results([failure, failure, _VECTOR, failure, failure])

    assert _status(health_servicer) == _SERVING


def test_caller_errors_not_counted(embedder, health_servicer, start_watching):
    backend_health, _ = start_watching(failure_threshold=1)

    backend_health.record_results(
        [InvalidInputError("not an image"), DeadlineExceededError("the caller's deadline ran out")]
    )

    assert _status(health_servicer) == _SERVING


def test_only_probe_restores_serving(embedder, health_servicer, start_watching):
    backend_health, server = start_watching(failure_threshold=1)
    backend_health.record_results([UnavailableError("HTTP 500")])

    backend_health.record_results([_VECTOR])
    assert _status(health_servicer) == _NOT_SERVING
    server.next_interval()

    assert _status(health_servicer) == _SERVING


def test_probe_skipped_while_traffic_embeds(embedder, start_watching):
    backend_health, server = start_watching()

    for _ in range(3):
        backend_health.record_results([_VECTOR])
        server.next_interval()
    skipped = embedder.probes
    server.next_interval()

    assert skipped == 1  # only the first probe, before any traffic
    assert embedder.probes == 2


def test_probe_runs_while_traffic_fails(embedder, start_watching):
    backend_health, server = start_watching(failure_threshold=5)

    backend_health.record_results([_VECTOR, UnavailableError("HTTP 500")])
    server.next_interval()
    backend_health.record_results([UnavailableError("HTTP 500")])
    server.next_interval()

    assert embedder.probes == 2  # the interval after an embedded image is skipped, the next is not


def test_recording_embedder_reports_results(embedder, health_servicer, start_watching):
    backend_health, _ = start_watching(failure_threshold=2)
    recording = HealthRecordingEmbedder(embedder, backend_health)
    embedder.results = [UnavailableError("HTTP 500"), UnavailableError("HTTP 500")]

    results = recording.embed_images([b"a", b"b"], timeout_s=1.0)

    assert results == embedder.results
    assert _status(health_servicer) == _NOT_SERVING


def test_recording_embedder_counts_raised_error(embedder, health_servicer, start_watching):
    backend_health, _ = start_watching(failure_threshold=3)
    recording = HealthRecordingEmbedder(embedder, backend_health)
    embedder.raises = UnavailableError("the Inference embedder is closed")

    with pytest.raises(UnavailableError):
        recording.embed_images([b"a", b"b", b"c"], timeout_s=1.0)

    assert _status(health_servicer) == _NOT_SERVING


def test_recording_embedder_counts_text_failures(embedder, health_servicer, start_watching):
    backend_health, _ = start_watching(failure_threshold=2)
    recording = HealthRecordingEmbedder(embedder, backend_health)
    embedder.raises = UnavailableError("the Inference server returned HTTP 500")

    for _ in range(2):
        with pytest.raises(UnavailableError):
            recording.embed_text("a dog", timeout_s=1.0)

    assert _status(health_servicer) == _NOT_SERVING


def test_recording_embedder_text_success_resets(embedder, health_servicer, start_watching):
    backend_health, _ = start_watching(failure_threshold=2)
    recording = HealthRecordingEmbedder(embedder, backend_health)
    embedder.raises = UnavailableError("the Inference server returned HTTP 500")
    with pytest.raises(UnavailableError):
        recording.embed_text("a dog", timeout_s=1.0)
    embedder.raises = None
    recording.embed_text("a dog", timeout_s=1.0)
    embedder.raises = UnavailableError("the Inference server returned HTTP 500")

    with pytest.raises(UnavailableError):
        recording.embed_text("a dog", timeout_s=1.0)

    assert _status(health_servicer) == _SERVING


def test_recording_embedder_text_precondition_not_counted(embedder, health_servicer, start_watching):
    backend_health, _ = start_watching(failure_threshold=1)
    recording = HealthRecordingEmbedder(embedder, backend_health)
    embedder.raises = FailedPreconditionError("text search needs the text model m/textual.onnx")

    with pytest.raises(FailedPreconditionError):
        recording.embed_text("a dog", timeout_s=1.0)

    assert _status(health_servicer) == _SERVING


def test_recording_embedder_delegates(embedder, start_watching):
    backend_health, _ = start_watching()
    recording = HealthRecordingEmbedder(embedder, backend_health)

    recording.check_ready()
    info = recording.info()
    recording.close()

    assert embedder.probes == 2
    assert info.model_id == "fake-model"
    assert embedder.closed


def test_watch_closes_embedder_on_termination(embedder, health_servicer):
    backend_health = BackendHealth(embedder, health_servicer, 0.5, 3)
    server = SteppedServer()
    watcher = threading.Thread(target=backend_health.watch, args=(server,), daemon=True)
    watcher.start()
    server.wait_until_waiting()

    server.terminate()
    watcher.join(timeout=5)

    assert not watcher.is_alive()
    assert embedder.closed
