"""The index service as a child process on 127.0.0.1: kill -9 at seeded moments, SIGTERM mid-stream, restarts.

The embed service is a fake in this test process. Every item that the service acknowledged must
survive a kill with its own metadata, stored once, and every removal too. Items sent but not
acknowledged may or may not be stored, and sending them again must work either way.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imgsearch.index.v1 import index_service_pb2, index_service_pb2_grpc
from index_service.snapshot import FILE_NAME as SNAPSHOT_FILE_NAME
from tests.fakes.images import noise_png
from tests.unit.index_service.index_servers import FakeEmbedService, serve_fake_embed

pytestmark = pytest.mark.integration

_DIM = 16
_MODEL_ID = "fake-clip"
_MAX_MESSAGE_BYTES = 1024 * 1024
_CALL_TIMEOUT_S = 30.0
_START_TIMEOUT_S = 30.0
_REPOSITORY = Path(__file__).resolve().parents[2]
_CORPUS_SIZE = 2000
# Items sent ahead of their responses, as the client library's default window allows.
_IN_FLIGHT = 64

ADDED = index_service_pb2.INGEST_STATUS_ADDED
ALREADY_PRESENT = index_service_pb2.INGEST_STATUS_ALREADY_PRESENT


class IndexProcess:
    """`python -m index_service` as a child process, with its JSON log lines collected from stderr."""

    def __init__(self, data_dir: Path, embed_addr: str, **settings):
        environ = {key: value for key, value in os.environ.items() if not key.startswith("IMGSEARCH_")}
        environ.update(
            IMGSEARCH_INDEX_LISTEN="127.0.0.1:0",
            IMGSEARCH_INDEX_EMBED_ADDR=embed_addr,
            IMGSEARCH_INDEX_DATA_DIR=str(data_dir),
            IMGSEARCH_INDEX_DEVICE="cpu",
            IMGSEARCH_INDEX_FAISS_THREADS="1",
            IMGSEARCH_INDEX_MAX_MESSAGE_BYTES=str(_MAX_MESSAGE_BYTES),
            IMGSEARCH_INDEX_MAX_IMAGE_BYTES=str(_MAX_MESSAGE_BYTES // 2),
        )
        environ.update({f"IMGSEARCH_INDEX_{name.upper()}": str(value) for name, value in settings.items()})
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "index_service"], cwd=_REPOSITORY, env=environ, stderr=subprocess.PIPE, text=True
        )
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        self.channel: grpc.Channel | None = None
        self.stub: index_service_pb2_grpc.IndexServiceStub | None = None

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def events(self) -> list[dict]:
        """Return the JSON log records written so far."""
        records = []
        for line in list(self.lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def event_names(self) -> list[str]:
        return [record.get("event") for record in self.events()]

    def wait_for_event(self, name: str, timeout_s: float = _START_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while time.monotonic() < deadline:
                found = [record for record in self.events() if record.get("event") == name]
                if found:
                    return found[0]
                if self.process.poll() is not None and not self._reader.is_alive():
                    break
                self._changed.wait(timeout=0.1)
        raise AssertionError(f"no {name} event; the service logged:\n" + "\n".join(self.lines[-30:]))

    def connect(self) -> "IndexProcess":
        """Wait until the service serves, and open a channel to it."""
        port = self.wait_for_event("server_started")["port"]
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{port}",
            options=[("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
                     ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES)],
        )
        self.stub = index_service_pb2_grpc.IndexServiceStub(self.channel)
        return self

    def exit_status(self, timeout_s: float = _CALL_TIMEOUT_S) -> int:
        """Wait for the process to end and return its exit status; fail with its last log lines if it does not."""
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the service did not exit within {timeout_s} s; it logged:\n" + "\n".join(self.lines[-40:])
            ) from None

    def kill(self) -> None:
        """Send SIGKILL to this child process and wait for it to end."""
        self.process.kill()
        self.process.wait(timeout=_START_TIMEOUT_S)
        self.close_channel()

    def close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def stop(self) -> None:
        """End the child process if it still runs; used after each test."""
        self.close_channel()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=_START_TIMEOUT_S)
        self._reader.join(timeout=5)
        self.process.stderr.close()


@pytest.fixture
def embed_service():
    handle = serve_fake_embed(FakeEmbedService(dim=_DIM, model_id=_MODEL_ID), _MAX_MESSAGE_BYTES)
    yield handle
    handle.stop()


@pytest.fixture
def start_process(tmp_path, embed_service):
    """Return a function that starts the index service on tmp_path/index; every one is ended after the test."""
    processes = []

    def start(**settings) -> IndexProcess:
        process = IndexProcess(tmp_path / "index", embed_service.address, **settings)
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.stop()


# Kill -9


class _Corpus:
    """Tiny distinct PNGs with their metadata, and what the service has acknowledged and removed of them.

    Even items carry a caller-chosen item_id, odd ones get one from the server.
    """

    def __init__(self, count: int, seed: int):
        self.images = [noise_png(8, 8, seed=seed * 100_000 + n) for n in range(count)]
        self.acknowledged: dict[int, str] = {}
        self.removed: set[int] = set()
        self.pending = list(range(count))

    def request(self, n: int) -> index_service_pb2.IngestImagesRequest:
        return index_service_pb2.IngestImagesRequest(
            image=self.images[n], item_id=f"item-{n}" if n % 2 == 0 else "", uri=f"/corpus/{n}.png",
            metadata=self.metadata(n),
        )

    @staticmethod
    def metadata(n: int) -> dict[str, str]:
        return {"n": str(n), "parity": "even" if n % 2 == 0 else "odd"}

    def alive(self) -> dict[int, str]:
        return {n: item_id for n, item_id in self.acknowledged.items() if n not in self.removed}


def _ingest_until(
    service: IndexProcess, corpus: _Corpus, kill_after: int | None, before_kill=lambda: None
) -> list[int]:
    """Stream the pending items, at most _IN_FLIGHT ahead of their responses, and kill the service after kill_after responses.

    kill_after None streams every pending item. before_kill runs just before the kill. Returns the
    items sent without an acknowledgement.
    """
    sent: list[int] = []
    window = threading.Semaphore(_IN_FLIGHT)
    stream_ended = threading.Event()

    def requests():
        for n in list(corpus.pending):
            while not window.acquire(timeout=0.1):
                if stream_ended.is_set():
                    return
            sent.append(n)
            yield corpus.request(n)

    acknowledged_now = 0
    responses = service.stub.IngestImages(requests(), timeout=_CALL_TIMEOUT_S)
    try:
        for n, response in zip(list(corpus.pending), responses):
            window.release()
            assert response.status in (ADDED, ALREADY_PRESENT), response
            assert response.uri == f"/corpus/{n}.png"
            corpus.acknowledged[n] = response.item_id
            acknowledged_now += 1
            if kill_after is not None and acknowledged_now == kill_after:
                before_kill()
                service.kill()
                break
    except grpc.RpcError as error:
        assert kill_after is not None, error
    finally:
        stream_ended.set()
    corpus.pending = [n for n in corpus.pending if n not in corpus.acknowledged]
    return [n for n in sent if n not in corpus.acknowledged]


def _stored_among(service: IndexProcess, corpus: _Corpus, candidates: list[int]) -> list[int]:
    """Return the candidates that the service stores: by item_id when it was the caller's, else by image."""
    stored = []
    for n in candidates:
        if n % 2 == 0:
            try:
                service.stub.Search(index_service_pb2.SearchRequest(item_id=f"item-{n}", k=1), timeout=_CALL_TIMEOUT_S)
            except grpc.RpcError as error:
                assert error.code() is grpc.StatusCode.NOT_FOUND
                continue
            stored.append(n)
            continue
        request = index_service_pb2.SearchRequest(image=corpus.images[n], k=1)
        [best] = service.stub.Search(request, timeout=_CALL_TIMEOUT_S).neighbours
        if best.match == index_service_pb2.MATCH_KIND_EXACT:
            assert dict(best.metadata) == corpus.metadata(n)
            stored.append(n)
    return stored


def _check_after_restart(service: IndexProcess, corpus: _Corpus, unacknowledged: list[int]) -> None:
    """Every acknowledged item is there once with its metadata, no removed one is, and the count adds up.

    The snapshot and the replay of the store alone must restore the indexes: a kill never leaves
    anything for the consistency check to repair.
    """
    assert "index_repaired" not in service.event_names()
    assert "index_checked" in service.event_names()
    for n, item_id in corpus.alive().items():
        response = service.stub.Search(index_service_pb2.SearchRequest(item_id=item_id, k=1), timeout=_CALL_TIMEOUT_S)
        [best] = response.neighbours
        assert (best.item_id, dict(best.metadata), best.uri) == (item_id, corpus.metadata(n), f"/corpus/{n}.png")
    for n in corpus.removed:
        with pytest.raises(grpc.RpcError) as raised:
            service.stub.Search(index_service_pb2.SearchRequest(item_id=corpus.acknowledged[n], k=1), timeout=5)
        assert raised.value.code() is grpc.StatusCode.NOT_FOUND

    stored_unacknowledged = _stored_among(service, corpus, unacknowledged)
    stats = service.stub.GetStats(index_service_pb2.GetStatsRequest(), timeout=_CALL_TIMEOUT_S)
    assert stats.item_count == len(corpus.alive()) + len(stored_unacknowledged)


def _remove_some(service: IndexProcess, corpus: _Corpus, rng: np.random.Generator, count: int) -> None:
    alive = sorted(corpus.alive())
    chosen = [int(n) for n in rng.choice(alive, size=min(count, len(alive)), replace=False)]
    request = index_service_pb2.RemoveItemsRequest(item_ids=[corpus.acknowledged[n] for n in chosen])
    response = service.stub.RemoveItems(request, timeout=_CALL_TIMEOUT_S)
    assert response.removed_count == len(chosen)
    corpus.removed.update(chosen)


@pytest.mark.slow
def test_acknowledged_items_survive_kill(start_process):
    rng = np.random.default_rng(20260101)
    corpus = _Corpus(count=_CORPUS_SIZE, seed=1)
    # Frequent snapshots, so that some kills land while one is written.
    settings = {"snapshot_after_changes": 150, "snapshot_interval_s": 0.5, "ingest_batch_size": 16}
    unacknowledged: list[int] = []

    for run in range(3):
        service = start_process(**settings).connect()
        _check_after_restart(service, corpus, unacknowledged)
        if corpus.alive():
            _remove_some(service, corpus, rng, count=10)
        # The removals just before the kill are newer than any snapshot, so a restart must replay them.
        unacknowledged = _ingest_until(
            service, corpus, kill_after=int(rng.integers(50, 500)),
            before_kill=lambda service=service: _remove_some(service, corpus, rng, count=5),
        )
        assert service.process.returncode == -signal.SIGKILL, f"run {run}"

    service = start_process(**settings).connect()
    _check_after_restart(service, corpus, unacknowledged)
    left = _ingest_until(service, corpus, kill_after=None)

    assert left == []
    assert corpus.pending == []
    _check_after_restart(service, corpus, [])
    stats = service.stub.GetStats(index_service_pb2.GetStatsRequest(), timeout=_CALL_TIMEOUT_S)
    assert stats.item_count == _CORPUS_SIZE - len(corpus.removed)
    assert len(set(corpus.alive().values())) == len(corpus.alive())


# SIGTERM


def _watch_health(channel: grpc.Channel, statuses: list[int]) -> threading.Thread:
    """Record the statuses that a Health.Watch stream sends, on a thread, until NOT_SERVING or the stream's end.

    The watch is cancelled at NOT_SERVING because the server counts it as an RPC in flight, and
    would wait for it until the end of GRACE_S.
    """

    def watch():
        stub = health_pb2_grpc.HealthStub(channel)
        responses = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=_CALL_TIMEOUT_S)
        try:
            for response in responses:
                statuses.append(response.status)
                if response.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    responses.cancel()
        except grpc.RpcError:
            pass

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_sigterm_drains_stream_and_saves_snapshot(start_process, embed_service, tmp_path):
    service = start_process(grace_s=20, snapshot_interval_s=0, snapshot_after_changes=0, ingest_batch_size=8).connect()
    statuses: list[int] = []
    watcher = _watch_health(service.channel, statuses)
    embed_service.servicer.delay_s = 0.01
    corpus = _Corpus(count=120, seed=7)
    responses = service.stub.IngestImages(iter([corpus.request(n) for n in range(120)]), timeout=_CALL_TIMEOUT_S)

    first = next(responses)
    service.process.send_signal(signal.SIGTERM)
    rest = list(responses)

    assert [response.status for response in [first, *rest]] == [ADDED] * 120
    assert service.exit_status() == 0
    watcher.join(timeout=5)
    assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
    names = service.event_names()
    assert names.index("shutdown_requested") < names.index("snapshot_saved") < names.index("server_stopped")
    assert service.wait_for_event("snapshot_saved")["item_count"] == 120
    assert (tmp_path / "index" / SNAPSHOT_FILE_NAME).exists()

    embed_service.servicer.delay_s = 0.0
    restarted = start_process().connect()

    loaded = restarted.wait_for_event("snapshot_loaded")
    assert (loaded["item_count"], loaded["added_after_snapshot"], loaded["removed_after_snapshot"]) == (120, 0, 0)
    assert "index_rebuilt" not in restarted.event_names()
    stats = restarted.stub.GetStats(index_service_pb2.GetStatsRequest(), timeout=_CALL_TIMEOUT_S)
    assert stats.item_count == 120


def test_start_rejected_for_other_model(start_process, embed_service):
    first = start_process().connect()
    [response] = list(first.stub.IngestImages(iter([_Corpus(1, seed=9).request(0)]), timeout=_CALL_TIMEOUT_S))
    assert response.status == ADDED
    first.process.send_signal(signal.SIGTERM)
    assert first.exit_status() == 0
    embed_service.servicer.model_id = "other-clip"

    rejected = start_process()

    assert rejected.exit_status() != 0
    rejected._reader.join(timeout=5)
    message = "\n".join(rejected.lines)
    assert "index_service: cannot start:" in message
    assert "contains embeddings of model 'fake-clip' (dim 16)" in message
    assert "runs model 'other-clip' (dim 16)" in message
    assert "server_started" not in rejected.event_names()


# A child process that serves with serve_until_signalled, and sends SIGTERM to one of its own
# non-main threads, which the kernel may also pick for a SIGTERM sent to the process.
_SIGNAL_TO_OTHER_THREAD = """
import signal, threading, time
from imgsearch_common.serving import add_health_and_reflection, create_server, serve_until_signalled

server = create_server(max_workers=2, max_message_bytes=1024 * 1024)
health = add_health_and_reflection(server, [])
server.add_insecure_port("127.0.0.1:0")
server.start()
ready = threading.Event()

def idle():
    ready.set()
    time.sleep(60)

thread = threading.Thread(target=idle, daemon=True)
thread.start()
ready.wait()
threading.Timer(0.5, signal.pthread_kill, (thread.ident, signal.SIGTERM)).start()
serve_until_signalled(server, health, [], grace_seconds=0, on_stop=lambda: print("stopped", flush=True))
"""


def test_stop_signal_caught_by_another_thread():
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-c", _SIGNAL_TO_OTHER_THREAD], cwd=_REPOSITORY, capture_output=True, text=True,
        timeout=_START_TIMEOUT_S,
    )

    assert completed.returncode == 0, completed.stderr[-2000:]
    # structlog, not configured in the script, writes its lines to stdout as well.
    assert "stopped" in completed.stdout.splitlines()
    assert time.monotonic() - started < 15
