"""A local stand-in for the Roboflow Inference server's CLIP image embedding endpoint.

It speaks the server's JSON on POST /clip/embed_image: the request is
{"image": {"type": "base64", "value": ...}, "clip_version_id": ..., "api_key": ... (optional)},
and the response is {"embeddings": [[...]]} with one vector that is not normalised. It is not
the real server: the vector is a seeded function of the image bytes, not a CLIP embedding.
"""

import base64
import binascii
import dataclasses
import hashlib
import io
import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image, UnidentifiedImageError

EMBED_IMAGE_PATH = "/clip/embed_image"
DEFAULT_DIM = 512


class Behaviour:
    """Response modes of the stand-in for embed requests, set through InferenceStandIn.behaviour."""

    EMBED = "embed"  # 200 with a vector of norm about 10, or 400 when the bytes are not an image
    STATUS_400 = "status_400"  # 400 with {"message": ...} for every request
    STATUS_500 = "status_500"  # 500 with {"message": ...}
    MALFORMED_JSON = "malformed_json"  # 200 with a body that is not JSON
    WRONG_LENGTH = "wrong_length"  # 200 with a vector one shorter than dim
    SLOW = "slow"  # waits delay_s, then behaves like EMBED


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """One request as the stand-in received it."""

    method: str
    path: str
    content_type: str
    body: dict | None


def fake_embedding(image_bytes: bytes, dim: int = DEFAULT_DIM) -> np.ndarray:
    """Return the unnormalised vector that the stand-in sends for these bytes (norm 9.5 to 10.5)."""
    seed = int.from_bytes(hashlib.sha256(image_bytes).digest()[:8], "big")
    rng = np.random.default_rng(seed)
    vector = rng.standard_normal(dim)
    return vector / np.linalg.norm(vector) * rng.uniform(9.5, 10.5)


class InferenceStandIn:
    """A ThreadingHTTPServer on a free port of 127.0.0.1, used as a context manager."""

    def __init__(self, dim: int = DEFAULT_DIM):
        self.dim = dim
        self.behaviour = Behaviour.EMBED
        self.delay_s = 0.0
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._in_flight = 0
        self._max_in_flight = 0
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="inference-standin",
            daemon=True,
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def max_in_flight(self) -> int:
        """Maximum number of requests that were handled at the same time."""
        with self._lock:
            return self._max_in_flight

    def __enter__(self) -> "InferenceStandIn":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving, and release at once the slow responses that are still waiting."""
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)

    def _finish(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _respond(self, body: dict | None) -> tuple[int, bytes]:
        """Return the status and body for one embed request under the current behaviour."""
        behaviour = self.behaviour
        if behaviour == Behaviour.SLOW:
            self._closing.wait(self.delay_s)
        if behaviour == Behaviour.STATUS_400:
            return _json(HTTPStatus.BAD_REQUEST, {"message": "stand-in was told to reject every image"})
        if behaviour == Behaviour.STATUS_500:
            return _json(HTTPStatus.INTERNAL_SERVER_ERROR, {"message": "stand-in was told to fail"})
        if behaviour == Behaviour.MALFORMED_JSON:
            return HTTPStatus.OK, b'{"embeddings": [[0.1, 0.2'

        image_bytes, problem = _image_bytes(body)
        if problem:
            return _json(HTTPStatus.BAD_REQUEST, {"message": problem})
        vector = fake_embedding(image_bytes, self.dim)
        if behaviour == Behaviour.WRONG_LENGTH:
            vector = vector[:-1]
        return _json(HTTPStatus.OK, {"embeddings": [vector.tolist()], "time": 0.001})


def _image_bytes(body: dict | None) -> tuple[bytes, str]:
    """Return the decoded image bytes, or an error message like the server's for a bad request."""
    image = body.get("image") if isinstance(body, dict) else None
    if (
        not isinstance(image, dict)
        or image.get("type") != "base64"
        or not isinstance(image.get("value"), str)
    ):
        return b"", "request must have image.type 'base64' and a string image.value"
    try:
        data = base64.b64decode(image["value"], validate=True)
    except binascii.Error:
        return b"", "image.value is not valid base64"
    try:
        with Image.open(io.BytesIO(data)) as picture:
            picture.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return b"", "Could not load valid image from base64 string."
    return data, ""


def _json(status: HTTPStatus, payload: dict) -> tuple[int, bytes]:
    return status, json.dumps(payload).encode("utf-8")


def _make_handler(standin: InferenceStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            standin._record(RecordedRequest("POST", self.path, self.headers.get("Content-Type", ""), body))
            try:
                if self.path != EMBED_IMAGE_PATH:
                    status, payload = _json(HTTPStatus.NOT_FOUND, {"message": f"no route {self.path}"})
                else:
                    status, payload = standin._respond(body)
                self._send(status, payload)
            finally:
                standin._finish()

        def _send(self, status: int, payload: bytes) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # The client gave up first, as it does after its timeout.

        def log_message(self, format, *args):  # noqa: A002 - the name is fixed by BaseHTTPRequestHandler
            pass  # Requests are recorded in standin.requests instead of printed.

    return Handler
