"""The items of an ingest batch: their types, the checks and normalisation of each, and the results they get."""

import dataclasses
import enum
import math
import secrets
from collections.abc import Mapping, Sequence

import numpy as np

from imgsearch_common.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    ImgsearchError,
    InvalidInputError,
    TooLargeError,
    UnavailableError,
)
from index_service.candidates import Duplicate, PendingItem
from index_service.duplicates import MatchKind, OnDuplicate
from index_service.embedder import Embedding
from index_service.store import NewItem, StoredItem

MAX_ITEM_ID_CHARS = 256
ASSIGNED_ID_PREFIX = "img_"
_ASSIGNED_ID_RANDOM_BYTES = 10  # 20 hex characters


@dataclasses.dataclass(frozen=True)
class IngestItem:
    """One image or embedding to add, with its optional caller-chosen item_id, uri and metadata.

    An item carries either image bytes or, with embedding set, a vector from the model model_id,
    which is stored as it is (normalised) without calling the embedder. on_duplicate sets what
    happens when the image duplicates a stored item or an earlier item of its batch, and
    duplicate_match sets which matches count: EXACT, or NEAR for exact or near. An embedding has
    no fingerprint, so it duplicates nothing.
    """

    image: bytes = b""
    item_id: str = ""
    uri: str = ""
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    on_duplicate: OnDuplicate = OnDuplicate.SKIP
    duplicate_match: MatchKind = MatchKind.EXACT
    embedding: Sequence[float] | None = None
    model_id: str = ""


class IngestStatus(enum.Enum):
    """Outcome of one ingested item."""

    ADDED = "added"
    ALREADY_PRESENT = "already_present"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class IngestResult:
    """The outcome of one ingested item; error is set only when status is FAILED.

    duplicate_of_item_id names the item that the image duplicates, with duplicate_match saying
    how, when the duplicate policy found one.
    """

    status: IngestStatus
    item_id: str = ""
    error: ImgsearchError | None = None
    duplicate_of_item_id: str = ""
    duplicate_match: MatchKind = MatchKind.UNSPECIFIED


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A valid ingest item that may become a new stored item.

    An embedding item has its unit vector and model_id set, no image, and sha256 None.
    """

    position: int
    item_id: str
    sha256: str | None
    uri: str
    width: int
    height: int
    metadata: dict[str, str]
    image: bytes
    on_duplicate: OnDuplicate
    duplicate_match: MatchKind
    vector: np.ndarray | None = None
    model_id: str = ""


def drop_batch_duplicates(
    candidates: list[Candidate], results: list
) -> tuple[list[Candidate], dict[int, int]]:
    """Keep the first candidate of each sha256 and item_id in the batch.

    Returns the kept candidates and, for each later candidate with the same bytes, or with the same
    item_id and vector as an earlier embedding, the position of the first one, whose result it will
    follow. A later candidate that reuses an item_id with other content fails with AlreadyExistsError.
    """
    leader_by_sha256: dict[str, int] = {}
    leader_by_item_id: dict[str, Candidate] = {}
    kept = []
    leader_by_follower = {}
    for candidate in candidates:
        leader = leader_by_item_id.get(candidate.item_id)
        if candidate.sha256 is not None and candidate.sha256 in leader_by_sha256:
            leader_by_follower[candidate.position] = leader_by_sha256[candidate.sha256]
        elif leader is not None and _same_vector(leader, candidate.vector, candidate.model_id):
            leader_by_follower[candidate.position] = leader.position
        elif leader is not None:
            results[candidate.position] = failed(item_id_taken(candidate.item_id))
        else:
            if candidate.sha256 is not None:
                leader_by_sha256[candidate.sha256] = candidate.position
            leader_by_item_id[candidate.item_id] = candidate
            kept.append(candidate)
    return kept, leader_by_follower


def _same_vector(item: Candidate | StoredItem, vector: np.ndarray | None, model_id: str) -> bool:
    """Return whether an embedding item, given or stored, has exactly this unit vector of model_id."""
    if vector is None or item.model_id != model_id:
        return False
    other = item.vector
    return other is not None and other.shape == vector.shape and bool(np.array_equal(other, vector))


def stored_item_id_result(candidate: Candidate, stored: StoredItem) -> IngestResult:
    """Return the result of a candidate whose item_id is stored and whose bytes are not.

    It is ALREADY_PRESENT when the stored item has the candidate's model and exactly its unit
    vector, as when an embedding is sent again, and ALREADY_EXISTS otherwise.
    """
    if _same_vector(stored, candidate.vector, candidate.model_id):
        return IngestResult(IngestStatus.ALREADY_PRESENT, stored.item_id)
    return failed(item_id_taken(candidate.item_id))


def follow(leader: IngestResult) -> IngestResult:
    """Return the result of an item that repeats an earlier item of its batch: the same bytes, or the same embedding.

    It is the leader's result, except that an added leader makes it ALREADY_PRESENT.
    """
    if leader.status is IngestStatus.ADDED:
        return IngestResult(IngestStatus.ALREADY_PRESENT, leader.item_id)
    return leader


def pending_item(candidate: Candidate, embedding: Embedding) -> PendingItem:
    return PendingItem(item_id=candidate.item_id, vector=embedding.vector, fingerprint=embedding.fingerprint)


def added(item_id: str, duplicate: Duplicate | None) -> IngestResult:
    if duplicate is None:
        return IngestResult(IngestStatus.ADDED, item_id)
    return IngestResult(
        IngestStatus.ADDED, item_id, duplicate_of_item_id=duplicate.item_id, duplicate_match=duplicate.match
    )


def skipped(duplicate: Duplicate) -> IngestResult:
    return IngestResult(
        IngestStatus.ALREADY_PRESENT,
        duplicate.item_id,
        duplicate_of_item_id=duplicate.item_id,
        duplicate_match=duplicate.match,
    )


def rejected(duplicate: Duplicate) -> IngestResult:
    error = AlreadyExistsError(
        f"the image duplicates stored item_id {duplicate.item_id!r} (match {duplicate.match.value}); "
        "set on_duplicate to ADD to store it anyway"
    )
    return IngestResult(
        IngestStatus.FAILED, error=error, duplicate_of_item_id=duplicate.item_id, duplicate_match=duplicate.match
    )


def validate_item_id(item_id: str) -> None:
    if len(item_id) > MAX_ITEM_ID_CHARS:
        raise InvalidInputError(
            f"item_id is {len(item_id)} characters long, above the limit of {MAX_ITEM_ID_CHARS}"
        )
    if not item_id.isprintable():
        raise InvalidInputError(f"item_id {item_id!r} contains non-printable characters")
    if item_id != item_id.strip():
        raise InvalidInputError(f"item_id {item_id!r} has leading or trailing whitespace")


def check_image_bytes(image: bytes, max_image_bytes: int) -> None:
    if len(image) > max_image_bytes:
        raise TooLargeError(f"image is {len(image)} bytes, above the limit of {max_image_bytes} bytes")


def new_item_id() -> str:
    return ASSIGNED_ID_PREFIX + secrets.token_hex(_ASSIGNED_ID_RANDOM_BYTES)


def unit_vector(values: Sequence[float]) -> np.ndarray:
    """Return a given embedding as a float32 unit vector; raises InvalidInputError naming what is wrong with it."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise InvalidInputError("embedding has no values; send a vector with one value per dim")
    if not np.all(np.isfinite(array)):
        raise InvalidInputError("embedding contains NaN or infinite values")
    vector = normalised(array)
    if vector is None:
        raise InvalidInputError("embedding is all zeros, so it has no direction")
    return vector


def normalised(vector: np.ndarray) -> np.ndarray | None:
    """Return the float32 unit vector along vector, or None when it is zero or not finite."""
    values = np.asarray(vector, dtype=np.float64)
    norm = float(np.linalg.norm(values)) if np.all(np.isfinite(values)) else 0.0
    if norm == 0.0 or not math.isfinite(norm):
        return None
    return (values / norm).astype(np.float32)


def failed(error: ImgsearchError) -> IngestResult:
    return IngestResult(IngestStatus.FAILED, error=error)


def item_id_taken(item_id: str) -> AlreadyExistsError:
    return AlreadyExistsError(
        f"item_id {item_id!r} is already used by an item with other content; choose another item_id"
    )


def item_id_removed(item_id: str) -> FailedPreconditionError:
    return FailedPreconditionError(
        f"item_id {item_id!r} belonged to a removed item, and item_ids are never reused; choose another item_id"
    )


def given_vector_mismatch(model_id: str | None, dim: int | None, embedding: Embedding) -> InvalidInputError:
    return InvalidInputError(
        f"embedding is from model {embedding.model_id!r} with dim {embedding.vector.shape[0]}, but the collection "
        f"contains model {model_id!r} with dim {dim}"
    )


def model_mismatch(model_id: str | None, dim: int | None, embedding: Embedding) -> FailedPreconditionError:
    return FailedPreconditionError(
        f"the collection contains embeddings of model {model_id!r} (dim {dim}), but the embed service sent "
        f"model {embedding.model_id!r} (dim {embedding.vector.shape[0]}); run the embed service with "
        f"model {model_id!r} or use a new data directory"
    )


def invalid_embedding_from_service() -> UnavailableError:
    return UnavailableError("the embed service sent an embedding that is all zeros or not finite")


def new_item(candidate: Candidate, embedding: Embedding) -> NewItem:
    return NewItem(
        item_id=candidate.item_id,
        sha256=candidate.sha256,
        uri=candidate.uri,
        width=candidate.width,
        height=candidate.height,
        metadata=candidate.metadata,
        vector=embedding.vector,
        model_id=embedding.model_id,
        fingerprint=embedding.fingerprint,
    )
