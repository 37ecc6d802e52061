"""A local stand-in for the Roboflow Inference server's CLIP embedding endpoints, with fault injection.

It speaks the server's JSON on POST /clip/embed_image: the request is
{"image": {"type": "base64", "value": ...}, "clip_version_id": ..., "api_key": ... (optional)},
and on POST /clip/embed_text, where the request is {"text": ..., "clip_version_id": ..., "api_key": ...}.
Both respond {"embeddings": [[...]]} with one vector that is not normalised. It is not the real
server: the vector is a seeded function of the image bytes or the text, not a CLIP embedding. Like
the server (inference 1.8.3), it rejects a text of more than 77 CLIP tokens with HTTP 400.

Faults: `behaviour` applies to every request, fail_next() to the next few requests, and
fail_images_containing() to the images whose bytes contain a marker. stop_listening() and
listen_again() act like a server process that stops and starts again on the same port: in between,
connections are refused.
"""

import base64
import binascii
import collections
import dataclasses
import hashlib
import io
import json
import select
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image, UnidentifiedImageError

from embed_service.tokenizer import default_tokenizer

EMBED_IMAGE_PATH = "/clip/embed_image"
EMBED_TEXT_PATH = "/clip/embed_text"
DEFAULT_DIM = 512
# The server's message for a text above the context length, from inference 1.8.3's ModelInputError handler.
TEXT_TOO_LONG_MESSAGE = (
    "Error with model input. Cause: Text input is too long for the model context length. Shorten the text and retry."
)

# How often a handler that keeps a request open checks whether the client has hung up.
_HANGUP_POLL_S = 0.02


class Behaviour:
    """Response modes of the stand-in for embed requests."""

    EMBED = "embed"  # 200 with a vector of norm about 10, or 400 when the bytes are not an image or the text is too long
    STATUS_400 = "status_400"  # 400 with {"message": ...} for every request
    STATUS_401 = "status_401"  # 401 whose message quotes the request's api_key, as a careless server might
    STATUS_500 = "status_500"  # 500 with {"message": ...}
    STATUS_504 = "status_504"  # 504 with {"message": ...}, as a proxy in front of a stuck server sends
    MALFORMED_JSON = "malformed_json"  # 200 with a body that is not JSON
    WRONG_LENGTH = "wrong_length"  # 200 with a vector one shorter than dim
    SLOW = "slow"  # waits delay_s, then behaves like EMBED
    NO_ANSWER = "no_answer"  # reads the request and never responds, until the client hangs up
    TRICKLE = "trickle"  # sends the headers of a 200 at once, then the body a few bytes at a time
    TRICKLE_HEADERS = "trickle_headers"  # sends the status line and headers a byte at a time
    DROP_CONNECTION = "drop_connection"  # closes the connection without a response


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """One request as the stand-in received it."""

    method: str
    path: str
    content_type: str
    body: dict | None

    @property
    def image(self) -> bytes | None:
        """The decoded bytes of image.value, or None when the body has no valid base64 image."""
        return _decoded_image_value(self.body)

    @property
    def text(self) -> str | None:
        """The body's text field when it is a string, else None."""
        text = self.body.get("text") if isinstance(self.body, dict) else None
        return text if isinstance(text, str) else None


def fake_text_embedding(text: str, dim: int = DEFAULT_DIM) -> np.ndarray:
    """Return the unnormalised vector that the stand-in sends for this text, unrelated to any image's."""
    return fake_embedding(b"text:" + text.encode("utf-8"), dim)


def fake_embedding(image_bytes: bytes, dim: int = DEFAULT_DIM) -> np.ndarray:
    """Return the unnormalised vector that the stand-in sends for these bytes (norm 9.5 to 10.5)."""
    seed = int.from_bytes(hashlib.sha256(image_bytes).digest()[:8], "big")
    rng = np.random.default_rng(seed)
    vector = rng.standard_normal(dim)
    return vector / np.linalg.norm(vector) * rng.uniform(9.5, 10.5)


class InferenceStandIn:
    """A ThreadingHTTPServer on a free port of 127.0.0.1, used as a context manager.

    Settings that tests may change at any time: behaviour, delay_s (SLOW), trickle_interval_s and
    trickle_bytes (TRICKLE).
    """

    def __init__(self, dim: int = DEFAULT_DIM):
        self.dim = dim
        self.behaviour = Behaviour.EMBED
        self.delay_s = 0.0
        self.trickle_interval_s = 0.02
        self.trickle_bytes = 8
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._next_behaviours: collections.deque[str] = collections.deque()
        self._marker_behaviours: dict[bytes, str] = {}
        self._in_flight = 0
        self._max_in_flight = 0
        self._connections: set[socket.socket] = set()
        self._closing = threading.Event()
        self._server = self._bind(0)
        self._port = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def in_flight(self) -> int:
        """Number of requests being handled now."""
        with self._lock:
            return self._in_flight

    @property
    def max_in_flight(self) -> int:
        """Maximum number of requests that were handled at the same time."""
        with self._lock:
            return self._max_in_flight

    def fail_next(self, behaviour: str, count: int = 1) -> None:
        """Apply behaviour to the next count embed requests, then return to self.behaviour."""
        with self._lock:
            self._next_behaviours.extend([behaviour] * count)

    def fail_images_containing(self, marker: bytes, behaviour: str) -> None:
        """Apply behaviour to every request whose image bytes contain marker, before any other rule."""
        with self._lock:
            self._marker_behaviours[marker] = behaviour

    def stop_listening(self) -> None:
        """Close the listening socket and every open connection, so that new connections are refused."""
        self._stop_serving()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # The handler closed it meanwhile.

    def listen_again(self) -> None:
        """Listen on the same port again after stop_listening()."""
        self._server = self._bind(self._port)
        self._start_serving()

    def __enter__(self) -> "InferenceStandIn":
        self._start_serving()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving, and release at once the responses that are still waiting or trickling."""
        self._closing.set()
        self._stop_serving()

    def _bind(self, port: int) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", port), _make_handler(self))
        server.daemon_threads = True
        return server

    def _start_serving(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="inference-standin",
            daemon=True,
        )
        self._thread.start()

    def _stop_serving(self) -> None:
        if self._thread is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._thread = None

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)

    def _finish(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _behaviour_for(self, image: bytes | None) -> str:
        """Return the behaviour for one embed request: a marker rule, then fail_next, then self.behaviour."""
        with self._lock:
            for marker, behaviour in self._marker_behaviours.items():
                if image is not None and marker in image:
                    return behaviour
            if self._next_behaviours:
                return self._next_behaviours.popleft()
            return self.behaviour

    def _respond(self, path: str, body: dict | None, behaviour: str) -> tuple[int, bytes]:
        """Return the status and body for one embed request under a behaviour that sends a response."""
        if behaviour == Behaviour.SLOW:
            self._closing.wait(self.delay_s)
        if behaviour == Behaviour.STATUS_400:
            return _json(HTTPStatus.BAD_REQUEST, {"message": "stand-in was told to reject every image"})
        if behaviour == Behaviour.STATUS_401:
            key = body.get("api_key") if isinstance(body, dict) else None
            return _json(HTTPStatus.UNAUTHORIZED, {"message": f"api_key {key} is not valid"})
        if behaviour == Behaviour.STATUS_500:
            return _json(HTTPStatus.INTERNAL_SERVER_ERROR, {"message": "stand-in was told to fail"})
        if behaviour == Behaviour.STATUS_504:
            return _json(HTTPStatus.GATEWAY_TIMEOUT, {"message": "stand-in was told to time out"})
        if behaviour == Behaviour.MALFORMED_JSON:
            return HTTPStatus.OK, b'{"embeddings": [[0.1, 0.2'

        vector, problem = self._vector_for(path, body)
        if problem:
            return _json(HTTPStatus.BAD_REQUEST, {"message": problem})
        if behaviour == Behaviour.WRONG_LENGTH:
            vector = vector[:-1]
        return _json(HTTPStatus.OK, {"embeddings": [vector.tolist()], "time": 0.001})


    def _vector_for(self, path: str, body: dict | None) -> tuple[np.ndarray | None, str]:
        """Return the vector for a valid request, or None and an error message like the server's."""
        if path == EMBED_TEXT_PATH:
            text, problem = _text(body)
            return (None, problem) if problem else (fake_text_embedding(text, self.dim), "")
        image_bytes, problem = _image_bytes(body)
        return (None, problem) if problem else (fake_embedding(image_bytes, self.dim), "")


def _decoded_image_value(body: dict | None) -> bytes | None:
    image = body.get("image") if isinstance(body, dict) else None
    if not isinstance(image, dict) or image.get("type") != "base64" or not isinstance(image.get("value"), str):
        return None
    try:
        return base64.b64decode(image["value"], validate=True)
    except binascii.Error:
        return None


def _image_bytes(body: dict | None) -> tuple[bytes, str]:
    """Return the decoded image bytes, or an error message like the server's for a bad request."""
    data = _decoded_image_value(body)
    if data is None:
        return b"", "request must have image.type 'base64' and a valid base64 string in image.value"
    try:
        with Image.open(io.BytesIO(data)) as picture:
            picture.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return b"", "Could not load valid image from base64 string."
    return data, ""


def _text(body: dict | None) -> tuple[str, str]:
    """Return the request's text, or an error message like the server's for a bad request."""
    text = body.get("text") if isinstance(body, dict) else None
    if not isinstance(text, str):
        return "", "request must have a string in text"
    # fit_to_context returns the text itself exactly when its ids fit the context.
    if default_tokenizer().fit_to_context(text) != text:
        return "", TEXT_TOO_LONG_MESSAGE
    return text, ""


def _json(status: HTTPStatus, payload: dict) -> tuple[int, bytes]:
    return status, json.dumps(payload).encode("utf-8")


def _make_handler(standin: InferenceStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            super().setup()
            with standin._lock:
                standin._connections.add(self.connection)

        def finish(self):
            with standin._lock:
                standin._connections.discard(self.connection)
            super().finish()

        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            recorded = RecordedRequest("POST", self.path, self.headers.get("Content-Type", ""), body)
            standin._record(recorded)
            try:
                if self.path == EMBED_IMAGE_PATH:
                    self._handle_embed(body, standin._behaviour_for(recorded.image))
                elif self.path == EMBED_TEXT_PATH:
                    self._handle_embed(body, standin._behaviour_for(None))
                else:
                    self._send(*_json(HTTPStatus.NOT_FOUND, {"message": f"no route {self.path}"}))
            finally:
                standin._finish()

        def _handle_embed(self, body: dict | None, behaviour: str) -> None:
            if behaviour == Behaviour.DROP_CONNECTION:
                self.close_connection = True
            elif behaviour == Behaviour.NO_ANSWER:
                self._wait_for_hangup()
                self.close_connection = True
            elif behaviour == Behaviour.TRICKLE:
                self._trickle(*standin._respond(self.path, body, Behaviour.EMBED))
            elif behaviour == Behaviour.TRICKLE_HEADERS:
                self._trickle_headers(*standin._respond(self.path, body, Behaviour.EMBED))
            else:
                self._send(*standin._respond(self.path, body, behaviour))

        def _send(self, status: int, payload: bytes) -> None:
            try:
                self._send_headers(status, len(payload))
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # The client gave up first, as it does after its timeout.

        def _send_headers(self, status: int, length: int) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(length))
            self.end_headers()

        def _trickle(self, status: int, payload: bytes) -> None:
            """Send the headers at once, then trickle_bytes of the body every trickle_interval_s."""
            try:
                self._send_headers(status, len(payload))
                for start in range(0, len(payload), standin.trickle_bytes):
                    if standin._closing.wait(standin.trickle_interval_s):
                        break
                    self.wfile.write(payload[start : start + standin.trickle_bytes])
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True

        def _trickle_headers(self, status: int, payload: bytes) -> None:
            """Send the status line and headers one byte every trickle_interval_s, then the body."""
            head = (
                f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n"
            ).encode("ascii")
            try:
                for index in range(len(head)):
                    if standin._closing.wait(standin.trickle_interval_s):
                        break
                    self.wfile.write(head[index:index + 1])
                    self.wfile.flush()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True

        def _wait_for_hangup(self) -> None:
            """Hold the request open until the client closes its end or the stand-in closes."""
            while not standin._closing.is_set():
                readable, _, _ = select.select([self.connection], [], [], _HANGUP_POLL_S)
                if not readable:
                    continue
                try:
                    if not self.connection.recv(1, socket.MSG_PEEK):
                        return
                except OSError:
                    return

        def log_message(self, format, *args):  # noqa: A002 - the name is fixed by BaseHTTPRequestHandler
            pass  # Requests are recorded in standin.requests instead of printed.

    return Handler
