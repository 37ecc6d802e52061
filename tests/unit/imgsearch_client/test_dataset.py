"""Tests of finding COCO128 for the demo, the download served by a local HTTP server."""

import http.server
import io
import threading
import zipfile

import pytest
from PIL import Image

from imgsearch_client.dataset import DatasetError, locate_coco128


def _zip_of_jpegs(count: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for number in range(count):
            picture = io.BytesIO()
            Image.new("RGB", (8, 6), (number, 0, 0)).save(picture, format="JPEG")
            archive.writestr(f"coco128/images/train2017/{number:012d}.jpg", picture.getvalue())
    return buffer.getvalue()


@pytest.fixture
def zip_server():
    """Serve one zip at /coco128.zip on 127.0.0.1; the test sets its bytes."""
    served = {"body": b""}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/coco128.zip":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(served["body"])))
            self.end_headers()
            self.wfile.write(served["body"])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_given_folder_is_used_as_is(tmp_path):
    assert locate_coco128(str(tmp_path), tmp_path / "cache") == tmp_path


def test_missing_given_folder_fails(tmp_path):
    with pytest.raises(DatasetError, match="dataset folder not found"):
        locate_coco128(str(tmp_path / "absent"), tmp_path / "cache")


def test_download_extracts_and_checks(zip_server, tmp_path):
    served, base = zip_server
    served["body"] = _zip_of_jpegs(128)

    folder = locate_coco128("", tmp_path / "cache", url=f"{base}/coco128.zip")

    assert folder == tmp_path / "cache" / "coco128" / "images" / "train2017"
    assert len(list(folder.glob("*.jpg"))) == 128


def test_incomplete_download_is_rejected(zip_server, tmp_path):
    served, base = zip_server
    served["body"] = _zip_of_jpegs(5)

    with pytest.raises(DatasetError, match="contains 5 .jpg files, expected 128"):
        locate_coco128("", tmp_path / "cache", url=f"{base}/coco128.zip")


def test_http_error_names_the_url(zip_server, tmp_path):
    _, base = zip_server

    with pytest.raises(DatasetError, match="coco129.zip failed with HTTP 404"):
        locate_coco128("", tmp_path / "cache", url=f"{base}/coco129.zip")


def test_corrupt_zip_is_rejected(zip_server, tmp_path):
    served, base = zip_server
    served["body"] = b"this is not a zip file"

    with pytest.raises(DatasetError, match="not a valid zip file"):
        locate_coco128("", tmp_path / "cache", url=f"{base}/coco128.zip")
