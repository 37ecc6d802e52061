"""Tests for fetch_clip_onnx against a local HTTP server that serves the tiny test model."""

import http.server
import json
import re
import socket
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from imgsearch_client import model_fetch
from imgsearch_client.model_fetch import FetchError, fetch_clip_onnx

TINY_MODEL_DIR = Path(__file__).resolve().parents[3] / "models" / "tiny-clip-random"
B32_PREFIX = "/Xenova/clip-vit-base-patch32/resolve/main/onnx"
B16_PREFIX = "/Xenova/clip-vit-base-patch16/resolve/main/onnx"
OUTPUT_FILES = {"visual.onnx", "textual.onnx", "imgsearch-model.json"}


class FakeHub:
    """Serves fixed bodies by path on 127.0.0.1, like the file URLs of a Hugging Face server.

    A path in `stalled` sends its headers and first bytes, then waits until the test ends.
    A path in `truncated` promises more bytes in Content-Length than it sends.
    """

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.stalled: set[str] = set()
        self.stalled_before_headers: set[str] = set()
        self.truncated: set[str] = set()
        self.requested: list[str] = []
        self.release = threading.Event()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        # A short poll interval keeps shutdown(), and so each test's teardown, fast.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address
        return f"http://{host}:{port}"

    def serve_tiny_model(self, prefix: str) -> None:
        self.files[f"{prefix}/vision_model.onnx"] = (TINY_MODEL_DIR / "visual.onnx").read_bytes()
        self.files[f"{prefix}/text_model.onnx"] = (TINY_MODEL_DIR / "textual.onnx").read_bytes()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _handler_class(self):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.requested.append(self.path)
                if self.path in hub.stalled_before_headers:
                    hub.release.wait(timeout=10)
                    return
                body = hub.files.get(self.path)
                if body is None:
                    self.send_error(404, "Entry not found")
                    return
                self._send(body)

            def _send(self, body: bytes) -> None:
                declared = len(body) + 1000 if self.path in hub.truncated else len(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(declared))
                self.end_headers()
                if self.path in hub.stalled:
                    self.wfile.write(body[:100])
                    self.wfile.flush()
                    hub.release.wait(timeout=10)
                    return
                self.wfile.write(body)

        return Handler


@pytest.fixture
def hub():
    server = FakeHub()
    server.start()
    yield server
    server.stop()


def test_fetch_writes_model_folder(hub, tmp_path):
    hub.serve_tiny_model(B32_PREFIX)
    out_dir = tmp_path / "clip"

    metadata_path = fetch_clip_onnx("ViT-B-32", out_dir, base_url=hub.base_url, timeout_s=5)

    assert metadata_path == out_dir / "imgsearch-model.json"
    assert {path.name for path in out_dir.iterdir()} == OUTPUT_FILES
    assert (out_dir / "visual.onnx").read_bytes() == (TINY_MODEL_DIR / "visual.onnx").read_bytes()
    assert (out_dir / "textual.onnx").read_bytes() == (TINY_MODEL_DIR / "textual.onnx").read_bytes()


def test_fetch_writes_metadata(hub, tmp_path):
    hub.serve_tiny_model(B32_PREFIX)

    fetch_clip_onnx("ViT-B-32", tmp_path, base_url=hub.base_url, timeout_s=5)

    metadata = json.loads((tmp_path / "imgsearch-model.json").read_text())
    assert metadata["model_id"] == "ViT-B-32"
    assert metadata["random_weights"] is False
    assert metadata["dim"] == 512
    assert metadata["image_size"] == 224
    assert metadata["context_length"] == 77
    assert metadata["source"] == f"{hub.base_url}/Xenova/clip-vit-base-patch32/tree/main"


def test_fetched_visual_tower_runs(hub, tmp_path):
    hub.serve_tiny_model(B32_PREFIX)

    fetch_clip_onnx("ViT-B-32", tmp_path, base_url=hub.base_url, timeout_s=5)

    session = ort.InferenceSession(str(tmp_path / "visual.onnx"), providers=["CPUExecutionProvider"])
    pixels = np.zeros((1, 3, 224, 224), dtype=np.float32)
    (embedding,) = session.run(None, {session.get_inputs()[0].name: pixels})
    assert embedding.shape == (1, 512)
    assert np.all(np.isfinite(embedding))


def test_fetch_vit_b16_uses_its_repository(hub, tmp_path):
    hub.serve_tiny_model(B16_PREFIX)

    fetch_clip_onnx("ViT-B-16", tmp_path, base_url=hub.base_url + "/", timeout_s=5)

    assert hub.requested == [f"{B16_PREFIX}/vision_model.onnx", f"{B16_PREFIX}/text_model.onnx"]
    assert json.loads((tmp_path / "imgsearch-model.json").read_text())["model_id"] == "ViT-B-16"


def test_fetch_uses_requested_revision(hub, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    hub.serve_tiny_model(f"/Xenova/clip-vit-base-patch32/resolve/{commit}/onnx")

    fetch_clip_onnx("ViT-B-32", tmp_path, base_url=hub.base_url, timeout_s=5, revision=commit)

    metadata = json.loads((tmp_path / "imgsearch-model.json").read_text())
    assert metadata["source"].endswith(f"/tree/{commit}")


def test_fetch_reports_progress(hub, tmp_path):
    hub.serve_tiny_model(B32_PREFIX)
    calls = []

    fetch_clip_onnx(
        "ViT-B-32", tmp_path, base_url=hub.base_url, timeout_s=5,
        on_progress=lambda url, received, total: calls.append((url, received, total)),
    )

    visual_url = f"{hub.base_url}{B32_PREFIX}/vision_model.onnx"
    visual_size = (TINY_MODEL_DIR / "visual.onnx").stat().st_size
    visual_calls = [call for call in calls if call[0] == visual_url]
    assert visual_calls[-1] == (visual_url, visual_size, visual_size)
    received = [call[1] for call in visual_calls]
    assert received == sorted(received)


def test_fetch_rejects_unknown_model(hub, tmp_path):
    with pytest.raises(ValueError, match="unknown CLIP model 'ViT-Z-99'.*ViT-B-16, ViT-B-32"):
        fetch_clip_onnx("ViT-Z-99", tmp_path, base_url=hub.base_url, timeout_s=5)

    assert hub.requested == []


@pytest.mark.parametrize("existing", sorted(OUTPUT_FILES))
def test_fetch_rejects_existing_file(hub, tmp_path, existing):
    hub.serve_tiny_model(B32_PREFIX)
    (tmp_path / existing).write_bytes(b"keep me")

    message = f"{existing} already exists; remove it, or fetch with overwrite=True"
    with pytest.raises(FetchError, match=message):
        fetch_clip_onnx("ViT-B-32", tmp_path, base_url=hub.base_url, timeout_s=5)

    assert (tmp_path / existing).read_bytes() == b"keep me"
    assert hub.requested == []


def test_fetch_overwrite_replaces_files(hub, tmp_path):
    hub.serve_tiny_model(B32_PREFIX)
    for name in OUTPUT_FILES:
        (tmp_path / name).write_bytes(b"old")

    fetch_clip_onnx("ViT-B-32", tmp_path, base_url=hub.base_url, timeout_s=5, overwrite=True)

    assert (tmp_path / "visual.onnx").read_bytes() == (TINY_MODEL_DIR / "visual.onnx").read_bytes()
    assert json.loads((tmp_path / "imgsearch-model.json").read_text())["model_id"] == "ViT-B-32"


def test_fetch_http_404_names_url(hub, tmp_path):
    hub.serve_tiny_model(B32_PREFIX)
    del hub.files[f"{B32_PREFIX}/text_model.onnx"]
    url = f"{hub.base_url}{B32_PREFIX}/text_model.onnx"

    with pytest.raises(FetchError, match=re.escape(f"GET {url} failed: HTTP 404")):
        fetch_clip_onnx("ViT-B-32", tmp_path, base_url=hub.base_url, timeout_s=5)

    assert list(tmp_path.iterdir()) == []


def test_fetch_timeout_before_headers_names_url(hub, tmp_path):
    hub.serve_tiny_model(B32_PREFIX)
    hub.stalled_before_headers.add(f"{B32_PREFIX}/vision_model.onnx")
    url = f"{hub.base_url}{B32_PREFIX}/vision_model.onnx"

    with pytest.raises(FetchError, match=re.escape(f"GET {url} timed out after 0.3 s")):
        fetch_clip_onnx("ViT-B-32", tmp_path, base_url=hub.base_url, timeout_s=0.3)

    assert list(tmp_path.iterdir()) == []


def test_fetch_timeout_mid_body_names_url(hub, tmp_path):
    hub.serve_tiny_model(B32_PREFIX)
    hub.stalled.add(f"{B32_PREFIX}/text_model.onnx")
    url = f"{hub.base_url}{B32_PREFIX}/text_model.onnx"

    with pytest.raises(FetchError, match=re.escape(f"GET {url} timed out after 0.3 s")):
        fetch_clip_onnx("ViT-B-32", tmp_path, base_url=hub.base_url, timeout_s=0.3)

    assert list(tmp_path.iterdir()) == []


def test_fetch_truncated_body_fails(hub, tmp_path):
    hub.serve_tiny_model(B32_PREFIX)
    hub.truncated.add(f"{B32_PREFIX}/vision_model.onnx")
    url = f"{hub.base_url}{B32_PREFIX}/vision_model.onnx"

    with pytest.raises(FetchError, match=re.escape(f"GET {url} ")):
        fetch_clip_onnx("ViT-B-32", tmp_path, base_url=hub.base_url, timeout_s=2)

    assert list(tmp_path.iterdir()) == []


def test_fetch_rejects_non_onnx_body(hub, tmp_path):
    hub.serve_tiny_model(B32_PREFIX)
    hub.files[f"{B32_PREFIX}/vision_model.onnx"] = b"<html>Sign in to continue</html>"
    url = f"{hub.base_url}{B32_PREFIX}/vision_model.onnx"

    with pytest.raises(FetchError, match=re.escape(f"{url} is not a usable ONNX model")):
        fetch_clip_onnx("ViT-B-32", tmp_path, base_url=hub.base_url, timeout_s=5)

    assert list(tmp_path.iterdir()) == []


def test_fetch_rejects_swapped_towers(hub, tmp_path):
    hub.files[f"{B32_PREFIX}/vision_model.onnx"] = (TINY_MODEL_DIR / "textual.onnx").read_bytes()
    hub.files[f"{B32_PREFIX}/text_model.onnx"] = (TINY_MODEL_DIR / "visual.onnx").read_bytes()

    with pytest.raises(FetchError, match="vision_model.onnx is not a usable ONNX model"):
        fetch_clip_onnx("ViT-B-32", tmp_path, base_url=hub.base_url, timeout_s=5)

    assert list(tmp_path.iterdir()) == []


def test_fetch_rejects_wrong_dim(hub, tmp_path, monkeypatch):
    hub.serve_tiny_model(B32_PREFIX)
    wrong = model_fetch.ClipSource("Xenova/clip-vit-base-patch32", dim=768)
    monkeypatch.setitem(model_fetch.CLIP_SOURCES, "ViT-B-32", wrong)

    with pytest.raises(FetchError, match=r"shape \[1, 512\], expected \[1, 768\]"):
        fetch_clip_onnx("ViT-B-32", tmp_path, base_url=hub.base_url, timeout_s=5)

    assert list(tmp_path.iterdir()) == []


def test_fetch_failure_keeps_existing_files(hub, tmp_path):
    for name in OUTPUT_FILES:
        (tmp_path / name).write_bytes(b"old")

    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_clip_onnx("ViT-B-32", tmp_path, base_url=hub.base_url, timeout_s=5, overwrite=True)

    contents = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert contents == {name: b"old" for name in OUTPUT_FILES}


def test_fetch_connection_refused_names_url(tmp_path):
    # A port that was just free, with nothing listening on it any more.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        base_url = "http://127.0.0.1:%d" % probe.getsockname()[1]
    url = f"{base_url}{B32_PREFIX}/vision_model.onnx"

    with pytest.raises(FetchError, match=re.escape(f"GET {url} failed: ")):
        fetch_clip_onnx("ViT-B-32", tmp_path, base_url=base_url, timeout_s=2)

    assert list(tmp_path.iterdir()) == []


def test_fetch_model_command_prints_json(hub, tmp_path, monkeypatch, capsys):
    from imgsearch_client import commands, model_fetch

    hub.serve_tiny_model(B32_PREFIX)
    monkeypatch.setattr(model_fetch, "HUGGING_FACE_URL", hub.base_url)
    monkeypatch.setattr(model_fetch.fetch_clip_onnx, "__defaults__",
                        (hub.base_url, 5, model_fetch.DEFAULT_REVISION, False, None))

    assert commands.fetch_model("ViT-B-32", tmp_path, force=False, as_json=True) == 0

    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == "ViT-B-32"
    assert set(OUTPUT_FILES) <= set(printed["files"])
