"""An embedder that sends each image, or text, to a Roboflow Inference server's CLIP endpoints over HTTP."""

import base64
import functools
import io
import json
import math
import random
import threading
import time
from concurrent import futures

import numpy as np
import requests
import structlog
import urllib3
from PIL import Image
from requests.adapters import HTTPAdapter

from embed_service.backends.base import ImageInput, ModelInfo, l2_normalise
from embed_service.tokenizer import default_tokenizer
from imgsearch_common.errors import (
    DeadlineExceededError,
    ImgsearchError,
    InvalidInputError,
    TooLargeError,
    UnavailableError,
)
from imgsearch_common.images import DecodedImage

log = structlog.get_logger(__name__)

BACKEND = "inference"
EMBED_IMAGE_PATH = "/clip/embed_image"
EMBED_TEXT_PATH = "/clip/embed_text"

# Maximum number of characters of a server's error body that are copied into error messages.
_MAX_SERVER_MESSAGE_CHARS = 300
_PROBE_SIDE = 64
# Maximum bytes taken from the socket by one read, so that the deadline is checked between reads.
_READ_CHUNK_BYTES = 64 * 1024
# A 1024-dim embedding is about 20 KiB of JSON, so a body above this size is no embedding response.
_MAX_BODY_BYTES = 16 * 1024 * 1024
# Upper bound of one backoff, so that a large retry count cannot make an image wait for hours.
_MAX_BACKOFF_S = 10.0
_REDACTED = "[redacted]"
# How long past its deadline a request thread may take to report before the caller gives up on it.
_RESULT_GRACE_S = 0.05


class _RetryableError(UnavailableError):
    """A failure that the next attempt may not repeat: an HTTP 5xx status or a failed connection."""


class InferenceEmbedder:
    """Embeds images with `POST {url}/clip/embed_image`, one image per request, a few in parallel.

    Only the image bytes are sent (base64 in JSON), never a URL for the server to fetch. Text goes
    to `POST {url}/clip/embed_text` as {"text": ...}. The server's vectors are not normalised, so
    each one is L2-normalised here. The dim is learned from the first embedding and every later
    one, of an image or a text, must match it.

    The server rejects text longer than CLIP's context with HTTP 400 (inference 1.8.3), so such
    text is cut to fit first (see ClipTokenizer.fit_to_context).

    Each attempt, its response body included, ends within the smaller of timeout_s and the
    caller's remaining time (see the NOTE in _send for the headers). An HTTP 5xx status or a
    connection error is retried up to `retries` times after a backoff that starts at backoff_s,
    doubles each time and has jitter. A 4xx status, a timeout or a malformed body is not retried.
    At most `concurrency` requests are in flight at once, readiness probes included.
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        clip_version_id: str,
        timeout_s: float,
        concurrency: int,
        retries: int = 2,
        backoff_s: float = 0.2,
    ):
        self._url = url.rstrip("/")
        self._api_key = api_key
        self._clip_version_id = clip_version_id
        self._timeout_s = timeout_s
        self._retries = retries
        self._backoff_s = backoff_s
        self._random = random.Random()

        self._session = requests.Session()
        # With an uncompressed body, each read1() in _read_body is a single socket read, so the
        # deadline is checked between any two reads.
        self._session.headers["Accept-Encoding"] = "identity"
        # urllib3 does not retry, so every failure reaches the retry loop here.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=concurrency, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._slots = threading.BoundedSemaphore(concurrency)
        # Twice as many threads as slots, so that images waiting out a backoff do not hold up others.
        self._pool = futures.ThreadPoolExecutor(max_workers=2 * concurrency, thread_name_prefix="inference")

        self._dim: int | None = None
        self._dim_lock = threading.Lock()
        self._closed = threading.Event()

    def info(self) -> ModelInfo:
        if self._dim is None:
            self.check_ready()
        return ModelInfo(model_id=self._clip_version_id, dim=self._dim, backend=BACKEND)

    def embed_images(self, images: list[ImageInput], timeout_s: float) -> list[np.ndarray | ImgsearchError]:
        self._raise_if_closed()
        started = time.monotonic()
        deadline = started + timeout_s
        pending = [self._pool.submit(self._embed_one, data, deadline) for data in images]
        # A server that trickles its headers can hold a request thread past the budget (see _send).
        # The caller therefore stops waiting at the deadline, or without one at the longest that every
        # attempt and backoff may take, and the thread finishes on its own.
        ends = min(deadline, started + (self._retries + 1) * (self._timeout_s + _MAX_BACKOFF_S))
        results = [self._result_by(future, ends, started, limited_by_caller=ends == deadline) for future in pending]
        _log_failures(results, self._url)
        return results

    def embed_text(self, text: str, timeout_s: float) -> np.ndarray:
        self._raise_if_closed()
        started = time.monotonic()
        deadline = started + timeout_s
        payload = self._text_payload(default_tokenizer().fit_to_context(text))
        future = self._pool.submit(self._embed_text_or_error, payload, deadline)
        # The same bound as for images, and for the same reason: see embed_images.
        ends = min(deadline, started + (self._retries + 1) * (self._timeout_s + _MAX_BACKOFF_S))
        result = self._result_by(future, ends, started, limited_by_caller=ends == deadline)
        _log_failures([result], self._url)
        if isinstance(result, ImgsearchError):
            raise result
        return result

    def _result_by(
        self, future: futures.Future, ends: float, started: float, limited_by_caller: bool
    ) -> np.ndarray | ImgsearchError:
        try:
            return future.result(timeout=max(0.0, ends - time.monotonic()) + _RESULT_GRACE_S)
        except futures.TimeoutError:
            future.cancel()
            return self._timeout_error(ends - started, limited_by_caller)

    def check_ready(self) -> None:
        """Embed a small probe image with one attempt, and raise UnavailableError if that fails.

        The probe is not retried, because the health watcher probes again at its next interval.
        """
        self._raise_if_closed()
        try:
            payload = self._image_payload(_probe_image())
            status, body = self._post(EMBED_IMAGE_PATH, payload, time.monotonic() + self._timeout_s)
            self._parse_embedding(status, body, "image")
        except ImgsearchError as error:
            raise UnavailableError(
                f"the Inference server at {self._url} failed the probe embedding: {error}"
            ) from None

    def close(self) -> None:
        self._closed.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._session.close()

    def _raise_if_closed(self) -> None:
        if self._closed.is_set():
            raise UnavailableError("the Inference embedder is closed")

    def _embed_one(self, image: ImageInput, deadline: float) -> np.ndarray | ImgsearchError:
        try:
            return self._embed_with_retries(EMBED_IMAGE_PATH, self._image_payload(_bytes_to_send(image)), deadline)
        except ImgsearchError as error:
            return error

    def _embed_text_or_error(self, payload: dict, deadline: float) -> np.ndarray | ImgsearchError:
        try:
            return self._embed_with_retries(EMBED_TEXT_PATH, payload, deadline)
        except ImgsearchError as error:
            return error

    def _embed_with_retries(self, path: str, payload: dict, deadline: float) -> np.ndarray:
        """Send the request until it is embedded, it fails in a way not worth retrying, or retries run out.

        A retry starts only when the time left covers its backoff plus as long as the failed attempt took.
        """
        attempts = self._retries + 1
        backoff = self._backoff_s
        for attempt in range(1, attempts + 1):
            started = time.monotonic()
            try:
                status, body = self._post(path, payload, deadline)
                return self._parse_embedding(status, body, "text" if path == EMBED_TEXT_PATH else "image")
            except _RetryableError as error:
                failure = error
            if attempt == attempts:
                break

            delay = backoff * self._random.uniform(0.5, 1.0)
            backoff = min(2 * backoff, _MAX_BACKOFF_S)
            now = time.monotonic()
            if now + delay + (now - started) > deadline:
                raise UnavailableError(
                    f"{failure} (not retried: {deadline - now:.3g} s left before the deadline)"
                ) from None
            log.warning(
                "inference_request_retried",
                url=self._url,
                attempt=attempt,
                max_attempts=attempts,
                delay_s=round(delay, 3),
                error=str(failure),
            )
            if self._closed.wait(delay):
                raise UnavailableError("the Inference embedder was closed during a retry backoff")
        suffix = f" (after {attempts} attempts)" if attempts > 1 else ""
        raise UnavailableError(f"{failure}{suffix}") from None

    def _post(self, path: str, payload: dict, deadline: float) -> tuple[int, bytes]:
        """Send one request and return the status and body, or raise a domain error.

        The whole exchange ends by the deadline and within timeout_s.
        """
        if not self._acquire_slot(deadline):
            raise DeadlineExceededError(
                "the deadline ran out while the request waited for a free connection to the Inference server"
            )
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceededError(
                    "the deadline ran out before the request was sent to the Inference server"
                )
            budget = min(self._timeout_s, remaining)
            try:
                return self._send(self._url + path, payload, budget)
            except requests.Timeout:
                raise self._timeout_error(budget, limited_by_caller=remaining < self._timeout_s) from None
            except requests.ConnectionError as error:
                raise _RetryableError(
                    f"the request to the Inference server at {self._url} failed: {type(error).__name__}"
                ) from error
            except requests.RequestException as error:
                raise UnavailableError(
                    f"the request to the Inference server at {self._url} failed: {type(error).__name__}"
                ) from error
        finally:
            self._slots.release()

    def _acquire_slot(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if math.isinf(remaining):
            return self._slots.acquire()
        return self._slots.acquire(timeout=max(0.0, remaining))

    def _send(self, endpoint: str, payload: dict, budget: float) -> tuple[int, bytes]:
        ends = time.monotonic() + budget
        # total= gives the wait for the status line only what the connect left of the budget.
        # NOTE: that wait is bounded per socket read, not as a whole, so a server that trickles
        # its status line and headers can hold this thread past its budget. The body cannot, and
        # embed_images stops waiting for the thread at the deadline.
        timeout = urllib3.Timeout(total=budget)
        with self._session.post(endpoint, json=payload, timeout=timeout, stream=True) as response:
            return response.status_code, _read_body(response, ends)

    def _timeout_error(self, budget: float, limited_by_caller: bool) -> ImgsearchError:
        if limited_by_caller:
            return DeadlineExceededError(
                f"the deadline ran out after {budget:.3g} s waiting for the Inference server at {self._url}"
            )
        return UnavailableError(
            f"the Inference server at {self._url} did not complete its response within {budget:.3g} s"
        )

    def _image_payload(self, data: bytes) -> dict:
        return self._with_model({"image": {"type": "base64", "value": base64.b64encode(data).decode("ascii")}})

    def _text_payload(self, text: str) -> dict:
        return self._with_model({"text": text})

    def _with_model(self, payload: dict) -> dict:
        payload["clip_version_id"] = self._clip_version_id
        if self._api_key:
            payload["api_key"] = self._api_key
        return payload

    def _parse_embedding(self, status: int, body: bytes, subject: str) -> np.ndarray:
        """Return the normalised vector of a response, or raise; subject ("image" or "text") names the input."""
        if status == 400:
            raise InvalidInputError(f"the Inference server rejected the {subject}: {self._server_text(body)}")
        if status == 413:
            raise TooLargeError(
                f"the Inference server rejected the {subject} as too large: {self._server_text(body)}"
            )
        if 500 <= status <= 599:
            raise _RetryableError(
                f"the Inference server at {self._url} returned HTTP {status}: {self._server_text(body)}"
            )
        if status != 200:
            raise UnavailableError(
                f"the Inference server at {self._url} returned HTTP {status}: {self._server_text(body)}"
            )

        try:
            parsed = json.loads(body)
        except ValueError:
            raise UnavailableError(
                f"the Inference server returned a body that is not JSON: {self._server_text(body)}"
            ) from None
        vector = _vector_from_json(parsed, subject)
        self._check_dim(vector.size)
        return l2_normalise(vector)

    def _server_text(self, body: bytes) -> str:
        """Return the server's error text (its JSON "message" field if it has one) with the API key hidden."""
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and "message" in parsed:
            text = str(parsed["message"])
        else:
            text = body.decode("utf-8", errors="replace").strip() or "(empty body)"
        # A server may quote the request back, and error messages reach logs and callers.
        if self._api_key:
            text = text.replace(self._api_key, _REDACTED)
        return text[:_MAX_SERVER_MESSAGE_CHARS]

    def _check_dim(self, dim: int) -> None:
        with self._dim_lock:
            if self._dim is None:
                self._dim = dim
                log.info("inference_dim_learned", dim=dim, clip_version_id=self._clip_version_id)
            elif dim != self._dim:
                raise UnavailableError(
                    f"the Inference server returned an embedding of dim {dim}, expected {self._dim}"
                )


def _read_body(response: requests.Response, ends: float) -> bytes:
    """Read the whole body by `ends` (time.monotonic()), however slowly the server sends it.

    requests applies its timeout to each socket read, so a server that trickles bytes could hold a
    request without end. Here each read may wait only for the time left. Raises requests.Timeout
    and requests.ConnectionError like requests itself.
    """
    chunks = []
    size = 0
    while True:
        remaining = ends - time.monotonic()
        if remaining <= 0:
            raise requests.Timeout("the response body did not arrive in time")
        _set_socket_timeout(response.raw, remaining)
        try:
            chunk = response.raw.read1(_READ_CHUNK_BYTES)
        except (urllib3.exceptions.TimeoutError, TimeoutError) as error:
            raise requests.Timeout(str(error)) from error
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise requests.ConnectionError(str(error)) from error
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > _MAX_BODY_BYTES:
            raise UnavailableError(
                f"the Inference server's response is larger than {_MAX_BODY_BYTES} bytes, "
                "too large for an embedding response"
            )
        chunks.append(chunk)


def _set_socket_timeout(raw: urllib3.HTTPResponse, seconds: float) -> None:
    # After the last byte, urllib3 may already have returned the connection to its pool.
    socket = getattr(raw.connection, "sock", None)
    if socket is not None:
        socket.settimeout(seconds)


def _vector_from_json(body, subject: str) -> np.ndarray:
    """Return the one vector of an {"embeddings": [[...]]} body, raising UnavailableError if malformed."""
    embeddings = body.get("embeddings") if isinstance(body, dict) else None
    if not isinstance(embeddings, list) or len(embeddings) != 1:
        count = len(embeddings) if isinstance(embeddings, list) else "no"
        raise UnavailableError(
            f"the Inference server returned {count} embeddings for one {subject}, expected exactly one"
        )

    values = embeddings[0]
    if not isinstance(values, list) or not values or not all(_is_number(value) for value in values):
        raise UnavailableError(
            "the Inference server returned an embedding that is not a non-empty list of numbers"
        )
    return np.asarray(values, dtype=np.float32)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bytes_to_send(image: ImageInput) -> bytes:
    """Return the bytes to send: the caller's, except for a decoded image that had transparency.

    The server drops the alpha channel and keeps the colours under transparent pixels, but the
    onnx backend composites them on white. Sending the composited picture as PNG keeps the two
    backends' embeddings of such images equal.
    """
    if isinstance(image, DecodedImage):
        if image.had_transparency:
            buffer = io.BytesIO()
            image.picture.save(buffer, format="PNG")
            return buffer.getvalue()
        return image.data
    return image


@functools.cache
def _probe_image() -> bytes:
    """Return a small PNG gradient that any CLIP server can embed, for readiness checks."""
    ramp = np.linspace(0, 255, _PROBE_SIDE, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(ramp[np.newaxis, :], ramp[:, np.newaxis], 128), axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _log_failures(results: list, url: str) -> None:
    """Log one warning per call for failures that point at the server, not at the images."""
    failures = [result for result in results if isinstance(result, (UnavailableError, DeadlineExceededError))]
    if failures:
        log.warning(
            "inference_requests_failed",
            url=url,
            failed=len(failures),
            total=len(results),
            first_error=str(failures[0]),
        )
