"""Download real CLIP ONNX weights into the model folder layout that the embed service reads."""

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnxruntime as ort
import requests
import structlog
import urllib3

log = structlog.get_logger(__name__)

HUGGING_FACE_URL = "https://huggingface.co"
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_REVISION = "main"

VISUAL_FILE = "visual.onnx"
TEXTUAL_FILE = "textual.onnx"
METADATA_FILE = "imgsearch-model.json"

_CHUNK_BYTES = 1 << 20
_IMAGE_SIZE = 224
_CONTEXT_LENGTH = 77
_PARTIAL_SUFFIX = ".partial"


@dataclasses.dataclass(frozen=True)
class ClipSource:
    """A CLIP model's two towers in a Hugging Face repository, with its embedding dim."""

    repository: str
    dim: int
    visual_path: str = "onnx/vision_model.onnx"
    textual_path: str = "onnx/text_model.onnx"


# Xenova's transformers.js exports of OpenAI's CLIP checkpoints. Their vision model takes
# pixel_values float32 [batch, 3, 224, 224] and returns image_embeds [batch, 512], the projected
# image embedding. Their text model takes input_ids int64 [batch, sequence], where the tiny test
# model takes int32, so a reader of textual.onnx must use the dtype that the session reports.
CLIP_SOURCES = {
    "ViT-B-32": ClipSource("Xenova/clip-vit-base-patch32", dim=512),
    "ViT-B-16": ClipSource("Xenova/clip-vit-base-patch16", dim=512),
}

# Called with (url, bytes received so far, total bytes or None when the server sends no length).
ProgressCallback = Callable[[str, int, int | None], None]


class FetchError(Exception):
    """A fetch failed: a target file exists, a download failed, or a downloaded file failed its check."""


def fetch_clip_onnx(
    model: str,
    out_dir: Path,
    base_url: str = HUGGING_FACE_URL,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    revision: str = DEFAULT_REVISION,
    overwrite: bool = False,
    on_progress: ProgressCallback | None = None,
) -> Path:
    """Download a CLIP model's visual and textual towers into out_dir, then write its metadata.

    Each file streams to a temporary file in out_dir, is checked with ONNX Runtime on a zero
    input, and is then renamed into place. imgsearch-model.json is written last, so a folder
    that has it is complete. timeout_s bounds the connection and each read, not the whole
    download. Returns the path of imgsearch-model.json.

    Raises ValueError for an unknown model, and FetchError when a target file exists and
    overwrite is false, or when a download or a check fails.
    """
    source = _source_for(model)
    out_dir = Path(out_dir)
    if not overwrite:
        _check_absent([out_dir / VISUAL_FILE, out_dir / TEXTUAL_FILE, out_dir / METADATA_FILE])
    out_dir.mkdir(parents=True, exist_ok=True)

    visual_url = file_url(base_url, source.repository, revision, source.visual_path)
    textual_url = file_url(base_url, source.repository, revision, source.textual_path)
    _fetch_towers(source, visual_url, textual_url, out_dir, timeout_s, on_progress)

    repository_url = f"{base_url.rstrip('/')}/{source.repository}/tree/{revision}"
    metadata_path = _write_metadata(out_dir, model, source.dim, repository_url)
    log.info("clip_model_fetched", model=model, out_dir=str(out_dir), revision=revision)
    return metadata_path


def file_url(base_url: str, repository: str, revision: str, path: str) -> str:
    """Build the Hugging Face download URL of one file at one revision (a branch or commit)."""
    return f"{base_url.rstrip('/')}/{repository}/resolve/{revision}/{path}"


def _fetch_towers(
    source: ClipSource,
    visual_url: str,
    textual_url: str,
    out_dir: Path,
    timeout_s: float,
    on_progress: ProgressCallback | None,
) -> None:
    """Download and check both towers, then rename them into out_dir.

    A failed download or check leaves out_dir as it was and removes the temporary files.
    """
    downloaded: list[Path] = []
    try:
        with requests.Session() as session:
            for url in (visual_url, textual_url):
                downloaded.append(_download(session, url, out_dir, timeout_s, on_progress))
        visual_part, textual_part = downloaded
        _check_tower(visual_part, visual_url, _visual_feeds, "image_embeds", source.dim)
        _check_tower(textual_part, textual_url, _textual_feeds, "text_embeds", source.dim)

        # Without metadata the folder reads as incomplete while the towers are being replaced.
        (out_dir / METADATA_FILE).unlink(missing_ok=True)
        os.replace(visual_part, out_dir / VISUAL_FILE)
        os.replace(textual_part, out_dir / TEXTUAL_FILE)
    finally:
        for path in downloaded:
            path.unlink(missing_ok=True)


def _source_for(model: str) -> ClipSource:
    try:
        return CLIP_SOURCES[model]
    except KeyError:
        known = ", ".join(sorted(CLIP_SOURCES))
        raise ValueError(f"unknown CLIP model {model!r}; expected one of {known}") from None


def _check_absent(paths: list[Path]) -> None:
    for path in paths:
        if path.exists():
            raise FetchError(
                f"{path} already exists; remove it, or fetch with overwrite=True "
                "(imgsearch fetch-model --force)"
            )


def _download(
    session: requests.Session,
    url: str,
    out_dir: Path,
    timeout_s: float,
    on_progress: ProgressCallback | None,
) -> Path:
    """Stream url into a new temporary file in out_dir and return its path.

    The temporary file is removed when the download fails.
    """
    handle, name = tempfile.mkstemp(dir=out_dir, prefix=".", suffix=_PARTIAL_SUFFIX)
    path = Path(name)
    started = time.monotonic()
    try:
        with os.fdopen(handle, "wb") as file:
            received = _stream_to(session, url, file, timeout_s, on_progress)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    log.info("model_file_downloaded", url=url, bytes=received, seconds=round(time.monotonic() - started, 3))
    return path


def _stream_to(
    session: requests.Session,
    url: str,
    file: BinaryIO,
    timeout_s: float,
    on_progress: ProgressCallback | None,
) -> int:
    try:
        with session.get(url, stream=True, timeout=timeout_s) as response:
            if response.status_code != 200:
                raise FetchError(
                    f"GET {url} failed: HTTP {response.status_code} {response.reason}; "
                    "check the model name, the revision and the base URL"
                )
            total = _content_length(response)
            received = 0
            for chunk in response.iter_content(_CHUNK_BYTES):
                file.write(chunk)
                received += len(chunk)
                if on_progress is not None:
                    on_progress(url, received, total)
    except requests.RequestException as error:
        raise _request_error(url, timeout_s, error) from error

    if total is not None and received != total:
        raise FetchError(f"GET {url} failed: received {received} bytes, expected {total} from Content-Length")
    return received


def _content_length(response: requests.Response) -> int | None:
    # With a Content-Encoding, requests decodes the body, so its size differs from the header.
    if response.headers.get("Content-Encoding") or "Content-Length" not in response.headers:
        return None
    try:
        return int(response.headers["Content-Length"])
    except ValueError:
        return None


def _request_error(url: str, timeout_s: float, error: requests.RequestException) -> FetchError:
    # requests raises a read timeout in the middle of the body as a ConnectionError wrapping
    # urllib3's ReadTimeoutError, not as requests.Timeout.
    timed_out = isinstance(error, requests.Timeout) or any(
        isinstance(argument, urllib3.exceptions.ReadTimeoutError) for argument in error.args
    )
    if timed_out:
        return FetchError(f"GET {url} timed out after {timeout_s} s without data from the server")
    return FetchError(f"GET {url} failed: {error}")


def _visual_feeds(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    pixels = session.get_inputs()[0]
    return {pixels.name: np.zeros((1, 3, _IMAGE_SIZE, _IMAGE_SIZE), dtype=np.float32)}


def _textual_feeds(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    feeds = {}
    for tensor in session.get_inputs():
        dtype = np.int32 if tensor.type == "tensor(int32)" else np.int64
        fill = 1 if tensor.name == "attention_mask" else 0
        feeds[tensor.name] = np.full((1, _CONTEXT_LENGTH), fill, dtype=dtype)
    return feeds


def _check_tower(
    path: Path,
    url: str,
    build_feeds: Callable[[ort.InferenceSession], dict[str, np.ndarray]],
    output_name: str,
    dim: int,
) -> None:
    """Run a downloaded tower on a zero input and check it returns one finite dim-long embedding."""
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [output.name for output in session.get_outputs()]
        name = output_name if output_name in names else names[0]
        (embedding,) = session.run([name], build_feeds(session))
    except Exception as error:  # noqa: BLE001 - ONNX Runtime's errors derive directly from Exception
        raise FetchError(f"{url} is not a usable ONNX model: {error}") from error

    if embedding.shape != (1, dim):
        raise FetchError(
            f"{url} returned output {name} of shape {list(embedding.shape)}, expected [1, {dim}]"
        )
    if not np.all(np.isfinite(embedding)):
        raise FetchError(f"{url} returned non-finite values for a zero input")


def _write_metadata(out_dir: Path, model: str, dim: int, source_url: str) -> Path:
    metadata = {
        "model_id": model,
        "random_weights": False,
        "dim": dim,
        "image_size": _IMAGE_SIZE,
        "context_length": _CONTEXT_LENGTH,
        "source": source_url,
    }
    path = out_dir / METADATA_FILE
    handle, name = tempfile.mkstemp(dir=out_dir, prefix=".", suffix=_PARTIAL_SUFFIX)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(json.dumps(metadata, indent=2) + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return path
