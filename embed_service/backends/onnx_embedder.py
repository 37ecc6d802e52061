"""An embedder that runs a CLIP model's visual and text towers in-process with ONNX Runtime."""

import dataclasses
import functools
import hashlib
import json
import threading
import time
from concurrent import futures
from pathlib import Path

import numpy as np
import onnxruntime
import structlog

from embed_service.backends.base import ImageInput, ModelInfo, l2_normalise, picture_of
from embed_service.preprocess import INPUT_SIZE, preprocess
from embed_service.tokenizer import CONTEXT_LENGTH, END_OF_TEXT_ID, START_OF_TEXT_ID, ClipTokenizer
from imgsearch_common.errors import DeadlineExceededError, FailedPreconditionError, ImgsearchError, UnavailableError

log = structlog.get_logger(__name__)

BACKEND = "onnx"
MODEL_FILE = "visual.onnx"
TEXT_MODEL_FILE = "textual.onnx"
METADATA_FILE = "imgsearch-model.json"
# Name of the embedding output in CLIP visual exports that have several outputs. Without it, output 0 is used.
EMBEDDING_OUTPUT = "image_embeds"
# The same for CLIP text exports.
TEXT_EMBEDDING_OUTPUT = "text_embeds"
# Input names of CLIP text exports: the token ids, and in some exports a mask of the real tokens.
TEXT_IDS_INPUT = "input_ids"
TEXT_MASK_INPUT = "attention_mask"
_TEXT_INPUT_TYPES = {"tensor(int32)": np.int32, "tensor(int64)": np.int64}

# Pillow releases the GIL while it decodes and resizes, so a few threads overlap that work.
_PREPROCESS_WORKERS = 4
_HASH_CHUNK_BYTES = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class _LoadedModel:
    session: onnxruntime.InferenceSession
    input_name: str
    output_name: str
    input_size: int
    info: ModelInfo


@dataclasses.dataclass(frozen=True)
class _LoadedTextModel:
    session: onnxruntime.InferenceSession
    tokenizer: ClipTokenizer
    ids_type: type
    mask_type: type | None
    output_name: str

    def embed(self, ids: list[int]) -> np.ndarray:
        """Run the model on one text's ids, zero-padded to the context length, and return the raw vector."""
        feeds = {TEXT_IDS_INPUT: _padded(ids, self.tokenizer.context_length, self.ids_type)}
        if self.mask_type is not None:
            feeds[TEXT_MASK_INPUT] = _padded([1] * len(ids), self.tokenizer.context_length, self.mask_type)
        return self.session.run([self.output_name], feeds)[0][0]


class OnnxEmbedder:
    """Embeds images with MODEL_DIR/visual.onnx on the CPU: decode and preprocess, then one run per batch.

    The model is loaded on first use, so a service can start before its model file exists and
    turn ready once it appears. MODEL_DIR/imgsearch-model.json may set "model_id" and
    "random_weights". Without a model_id, the id is "onnx-" and 12 hex digits of the file's SHA-256.

    Text is tokenized with CLIP's BPE vocabulary and embedded with MODEL_DIR/textual.onnx, loaded on
    the first text, which must take token ids (int32 or int64, [batch, context]) and return
    embeddings of the image model's dim. The context length is imgsearch-model.json's
    "context_length", 77 by default. Without textual.onnx, images are still embedded and text
    raises FailedPreconditionError.
    """

    def __init__(self, model_dir: Path, threads: int, max_image_pixels: int):
        self._model_dir = Path(model_dir)
        self._threads = threads
        self._max_image_pixels = max_image_pixels
        self._pool = futures.ThreadPoolExecutor(
            max_workers=_PREPROCESS_WORKERS, thread_name_prefix="preprocess"
        )
        self._lock = threading.Lock()
        self._model: _LoadedModel | None = None
        # A separate lock, so that images are embedded while the text model loads.
        self._text_lock = threading.Lock()
        self._text_model: _LoadedTextModel | None = None
        self._closed = False

    def info(self) -> ModelInfo:
        return self._loaded_model().info

    def check_ready(self) -> None:
        self._loaded_model()

    def embed_images(self, images: list[ImageInput], timeout_s: float) -> list[np.ndarray | ImgsearchError]:
        model = self._loaded_model()
        deadline = time.monotonic() + timeout_s
        decode = functools.partial(self._input_or_error, size=model.input_size)
        results: list[np.ndarray | ImgsearchError] = list(self._pool.map(decode, images))

        positions = [index for index, result in enumerate(results) if isinstance(result, np.ndarray)]
        if not positions:
            return results
        if time.monotonic() >= deadline:
            late = DeadlineExceededError("the deadline ran out before the model ran on this image")
            for index in positions:
                results[index] = late
            return results

        batch = np.concatenate([results[index] for index in positions])
        outputs = model.session.run([model.output_name], {model.input_name: batch})[0]
        for index, vector in zip(positions, outputs, strict=True):
            results[index] = _normalised_or_error(vector)
        return results

    def embed_text(self, text: str, timeout_s: float) -> np.ndarray:
        deadline = time.monotonic() + timeout_s
        model = self._loaded_text_model()
        ids = model.tokenizer.encode(text)
        if time.monotonic() >= deadline:
            raise DeadlineExceededError("the deadline ran out before the model ran on the text")
        return l2_normalise(model.embed(ids))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._model = None
        with self._text_lock:
            self._text_model = None
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _loaded_model(self) -> _LoadedModel:
        with self._lock:
            if self._closed:
                raise UnavailableError("the ONNX embedder is closed")
            if self._model is None:
                self._model = _load_model(self._model_dir, self._threads)
            return self._model

    def _loaded_text_model(self) -> _LoadedTextModel:
        dim = self._loaded_model().info.dim
        with self._text_lock:
            if self._closed:
                raise UnavailableError("the ONNX embedder is closed")
            if self._text_model is None:
                self._text_model = _load_text_model(self._model_dir, self._threads, dim)
            return self._text_model

    def _input_or_error(self, image: ImageInput, size: int) -> np.ndarray | ImgsearchError:
        try:
            return preprocess(picture_of(image, self._max_image_pixels), size)
        except ImgsearchError as error:
            return error


def _normalised_or_error(vector: np.ndarray) -> np.ndarray | ImgsearchError:
    try:
        return l2_normalise(vector)
    except ImgsearchError as error:
        return error


def _load_model(model_dir: Path, threads: int) -> _LoadedModel:
    """Open the session and describe the model, or raise UnavailableError that names the problem."""
    path = model_dir / MODEL_FILE
    if not path.is_file():
        raise UnavailableError(f"ONNX model not found: {path} does not exist")
    metadata = _read_metadata(model_dir / METADATA_FILE)
    session = _open_session(path, threads)

    input_name, input_size = _describe_input(session, path)
    output_name = _choose_output(session)
    dim = _output_dim(session, input_name, input_size, output_name)
    model_id = metadata.get("model_id") or "onnx-" + _sha256_hex(path)[:12]

    info = ModelInfo(model_id=model_id, dim=dim, backend=BACKEND)
    log.info("onnx_model_loaded", path=str(path), model_id=model_id, dim=dim, input_size=input_size)
    if metadata.get("random_weights"):
        log.warning(
            "onnx_model_has_random_weights",
            model_id=model_id,
            detail="embeddings are not semantically meaningful",
        )
    return _LoadedModel(session, input_name, output_name, input_size, info)


def _load_text_model(model_dir: Path, threads: int, dim: int) -> _LoadedTextModel:
    """Open the text model and check it against the image model's dim, or raise FailedPreconditionError."""
    path = model_dir / TEXT_MODEL_FILE
    if not path.is_file():
        raise FailedPreconditionError(
            f"text search needs the CLIP text model {path}, which does not exist; put the textual.onnx of "
            f"the same CLIP model beside {MODEL_FILE} (imgsearch fetch-model downloads both)"
        )
    context_length = _context_length(_read_metadata(model_dir / METADATA_FILE), model_dir / METADATA_FILE)
    session = _open_session(path, threads, FailedPreconditionError)
    ids_type, mask_type = _describe_text_inputs(session, path, context_length)
    names = [output.name for output in session.get_outputs()]
    output_name = TEXT_EMBEDDING_OUTPUT if TEXT_EMBEDDING_OUTPUT in names else names[0]
    model = _LoadedTextModel(session, ClipTokenizer(context_length=context_length), ids_type, mask_type, output_name)

    probe_dim = _text_output_dim(model, path)
    if probe_dim != dim:
        raise FailedPreconditionError(
            f"ONNX text model {path} returns embeddings of dim {probe_dim}, but {MODEL_FILE} returns dim {dim}; "
            "both must come from the same CLIP model"
        )
    log.info("onnx_text_model_loaded", path=str(path), dim=dim, context_length=context_length)
    return model


def _context_length(metadata: dict, path: Path) -> int:
    value = metadata.get("context_length", CONTEXT_LENGTH)
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise FailedPreconditionError(f"model metadata {path}: context_length must be an integer of 2 or more")
    return value


def _describe_text_inputs(
    session: onnxruntime.InferenceSession, path: Path, context_length: int
) -> tuple[type, type | None]:
    """Return the numpy types of the ids input and of the optional mask input."""
    inputs = {model_input.name: model_input for model_input in session.get_inputs()}
    unknown = sorted(set(inputs) - {TEXT_IDS_INPUT, TEXT_MASK_INPUT})
    if TEXT_IDS_INPUT not in inputs or unknown:
        raise FailedPreconditionError(
            f"ONNX text model {path} must take {TEXT_IDS_INPUT} and optionally {TEXT_MASK_INPUT}, "
            f"its inputs are {sorted(inputs)}"
        )
    for model_input in inputs.values():
        shape = model_input.shape
        if model_input.type not in _TEXT_INPUT_TYPES or len(shape) != 2:
            raise FailedPreconditionError(
                f"ONNX text model {path} input {model_input.name} must be int32 or int64 of shape "
                f"[batch, {context_length}], it is {model_input.type} {shape}"
            )
        if isinstance(shape[1], int) and shape[1] != context_length:
            raise FailedPreconditionError(
                f"ONNX text model {path} input {model_input.name} takes {shape[1]} tokens, but the context "
                f"length is {context_length}; set context_length in {METADATA_FILE}"
            )
    mask = inputs.get(TEXT_MASK_INPUT)
    return _TEXT_INPUT_TYPES[inputs[TEXT_IDS_INPUT].type], None if mask is None else _TEXT_INPUT_TYPES[mask.type]


def _text_output_dim(model: _LoadedTextModel, path: Path) -> int:
    """Run the model on the empty text, whose ids are the start and end tokens, and return the dim."""
    try:
        vector = model.embed([START_OF_TEXT_ID, END_OF_TEXT_ID])
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own unrelated types for bad models
        raise FailedPreconditionError(f"ONNX text model {path} failed on a probe text: {error}") from error
    if vector.ndim != 1:
        raise FailedPreconditionError(
            f"ONNX text model {path} output {model.output_name} must have shape (batch, dim), "
            f"got {(1, *vector.shape)}"
        )
    return int(vector.shape[0])


def _padded(values: list[int], length: int, dtype: type) -> np.ndarray:
    """Return a (1, length) array of values followed by zeros, as openai/CLIP's clip.tokenize pads."""
    array = np.zeros((1, length), dtype=dtype)
    array[0, : len(values)] = values
    return array


def _read_metadata(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnavailableError(f"model metadata {path} could not be read: {error}") from error
    if not isinstance(metadata, dict):
        raise UnavailableError(f"model metadata {path} must be a JSON object, got {type(metadata).__name__}")
    if not isinstance(metadata.get("model_id", ""), str):
        raise UnavailableError(f"model metadata {path}: model_id must be a string")
    return metadata


def _open_session(
    path: Path, threads: int, error_type: type[ImgsearchError] = UnavailableError
) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
    try:
        # TODO: only the CPU provider is used. A GPU needs onnxruntime-gpu and a setting for it.
        return onnxruntime.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own unrelated types for bad files
        raise error_type(f"ONNX model {path} could not be loaded: {error}") from error


def _describe_input(session: onnxruntime.InferenceSession, path: Path) -> tuple[str, int]:
    """Return the input name and side. A symbolic side means that the model takes INPUT_SIZE."""
    model_input = session.get_inputs()[0]
    shape = model_input.shape
    if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
        raise UnavailableError(
            f"ONNX model {path} must take NCHW images with 3 channels, its input is {shape}"
        )
    if isinstance(shape[0], int):
        raise UnavailableError(f"ONNX model {path} must have a dynamic batch dimension, its input is {shape}")
    height, width = shape[2], shape[3]
    if isinstance(height, int) and isinstance(width, int) and height != width:
        raise UnavailableError(f"ONNX model {path} must take square images, its input is {shape}")
    size = height if isinstance(height, int) else INPUT_SIZE
    return model_input.name, size


def _choose_output(session: onnxruntime.InferenceSession) -> str:
    names = [output.name for output in session.get_outputs()]
    return EMBEDDING_OUTPUT if EMBEDDING_OUTPUT in names else names[0]


def _output_dim(session: onnxruntime.InferenceSession, input_name: str, size: int, output_name: str) -> int:
    """Read the dim from the output shape, or run the model once on zeros when it is symbolic."""
    shape = next(output.shape for output in session.get_outputs() if output.name == output_name)
    if len(shape) == 2 and isinstance(shape[1], int):
        return shape[1]
    probe = np.zeros((1, 3, size, size), dtype=np.float32)
    output = session.run([output_name], {input_name: probe})[0]
    if output.ndim != 2 or output.shape[0] != 1:
        raise UnavailableError(
            f"ONNX model output {output_name} must have shape (batch, dim), got {output.shape}"
        )
    return int(output.shape[1])


def _sha256_hex(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()
