"""An embedder that sends each image to a Roboflow Inference server's CLIP endpoint over HTTP."""

import base64
import functools
import io
import threading
import time
from concurrent import futures

import numpy as np
import requests
import structlog
from PIL import Image
from requests.adapters import HTTPAdapter

from embed_service.backends.base import ModelInfo, l2_normalise
from imgsearch_common.errors import (
    DeadlineExceededError,
    ImgsearchError,
    InvalidInputError,
    TooLargeError,
    UnavailableError,
)

log = structlog.get_logger(__name__)

BACKEND = "inference"
EMBED_IMAGE_PATH = "/clip/embed_image"

# Maximum number of characters of a server's error body that are copied into error messages.
_MAX_SERVER_MESSAGE_CHARS = 300
_PROBE_SIDE = 64


class InferenceEmbedder:
    """Embeds images with `POST {url}/clip/embed_image`, one image per request, a few in parallel.

    Only the image bytes are sent (base64 in JSON), never a URL for the server to fetch. The
    server's vectors are not normalised, so each one is L2-normalised here. The dim is learned
    from the first embedding and every later one must match it.
    """

    def __init__(self, url: str, api_key: str, clip_version_id: str, timeout_s: float, concurrency: int):
        self._url = url.rstrip("/")
        self._endpoint = self._url + EMBED_IMAGE_PATH
        self._api_key = api_key
        self._clip_version_id = clip_version_id
        self._timeout_s = timeout_s

        self._session = requests.Session()
        # One pooled connection per worker thread. urllib3 does not retry, so each failure reaches the caller.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=concurrency, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._pool = futures.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="inference")

        self._dim: int | None = None
        self._dim_lock = threading.Lock()
        self._closed = threading.Event()

    def info(self) -> ModelInfo:
        if self._dim is None:
            self.check_ready()
        return ModelInfo(model_id=self._clip_version_id, dim=self._dim, backend=BACKEND)

    def embed_images(self, images: list[bytes], timeout_s: float) -> list[np.ndarray | ImgsearchError]:
        self._raise_if_closed()
        deadline = time.monotonic() + timeout_s
        pending = [self._pool.submit(self._embed_one, data, deadline) for data in images]
        # Each request's own timeout ends by the deadline, so waiting without a timeout is bounded.
        results = [future.result() for future in pending]
        _log_failures(results, self._url)
        return results

    def check_ready(self) -> None:
        self._raise_if_closed()
        result = self._embed_one(_probe_image(), time.monotonic() + self._timeout_s)
        if isinstance(result, ImgsearchError):
            raise UnavailableError(
                f"the Inference server at {self._url} failed the probe embedding: {result}"
            )

    def close(self) -> None:
        self._closed.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._session.close()

    def _raise_if_closed(self) -> None:
        if self._closed.is_set():
            raise UnavailableError("the Inference embedder is closed")

    def _embed_one(self, data: bytes, deadline: float) -> np.ndarray | ImgsearchError:
        try:
            response = self._post(data, deadline)
            return self._parse_embedding(response)
        except ImgsearchError as error:
            return error

    def _post(self, data: bytes, deadline: float) -> requests.Response:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceededError(
                "the deadline ran out before the image was sent to the Inference server"
            )
        timeout = min(self._timeout_s, remaining)
        try:
            # NOTE: requests applies the timeout to the connect and to each socket read, so a
            # server that trickles bytes can hold a request longer than `timeout` in total.
            return self._session.post(self._endpoint, json=self._payload(data), timeout=timeout)
        except requests.Timeout:
            if remaining < self._timeout_s:
                raise DeadlineExceededError(
                    f"the deadline ran out after {timeout:.3g} s waiting for the Inference server "
                    f"at {self._url}"
                ) from None
            raise UnavailableError(
                f"the Inference server at {self._url} did not respond within {timeout:.3g} s"
            ) from None
        except requests.RequestException as error:
            raise UnavailableError(
                f"the request to the Inference server at {self._url} failed: {type(error).__name__}"
            ) from error

    def _payload(self, data: bytes) -> dict:
        payload = {
            "image": {"type": "base64", "value": base64.b64encode(data).decode("ascii")},
            "clip_version_id": self._clip_version_id,
        }
        if self._api_key:
            payload["api_key"] = self._api_key
        return payload

    def _parse_embedding(self, response: requests.Response) -> np.ndarray:
        status = response.status_code
        if status == 400:
            raise InvalidInputError(f"the Inference server rejected the image: {_server_message(response)}")
        if status == 413:
            raise TooLargeError(
                f"the Inference server rejected the image as too large: {_server_message(response)}"
            )
        if status != 200:
            raise UnavailableError(
                f"the Inference server at {self._url} returned HTTP {status}: {_server_message(response)}"
            )

        vector = _vector_from_body(response)
        self._check_dim(vector.size)
        return l2_normalise(vector)

    def _check_dim(self, dim: int) -> None:
        with self._dim_lock:
            if self._dim is None:
                self._dim = dim
                log.info("inference_dim_learned", dim=dim, clip_version_id=self._clip_version_id)
            elif dim != self._dim:
                raise UnavailableError(
                    f"the Inference server returned an embedding of dim {dim}, expected {self._dim}"
                )


def _vector_from_body(response: requests.Response) -> np.ndarray:
    """Parse an {"embeddings": [[...]]} body into its one vector, raising UnavailableError if malformed."""
    try:
        body = response.json()
    except ValueError:
        raise UnavailableError(
            f"the Inference server returned a body that is not JSON: {_server_message(response)}"
        ) from None

    embeddings = body.get("embeddings") if isinstance(body, dict) else None
    if not isinstance(embeddings, list) or len(embeddings) != 1:
        count = len(embeddings) if isinstance(embeddings, list) else "no"
        raise UnavailableError(
            f"the Inference server returned {count} embeddings for one image, expected exactly one"
        )

    values = embeddings[0]
    if not isinstance(values, list) or not values or not all(_is_number(value) for value in values):
        raise UnavailableError(
            "the Inference server returned an embedding that is not a non-empty list of numbers"
        )
    return np.asarray(values, dtype=np.float32)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _server_message(response: requests.Response) -> str:
    """Return the server's error text: the JSON "message" field if there is one, else the body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "message" in body:
        text = str(body["message"])
    else:
        text = response.text.strip() or "(empty body)"
    return text[:_MAX_SERVER_MESSAGE_CHARS]


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
