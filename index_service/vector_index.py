"""The faiss adapter: exact inner-product search over L2-normalised vectors, on the CPU or a GPU."""

import contextlib
import threading
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import faiss
import numpy as np
import structlog

from imgsearch_common.config import ConfigError

log = structlog.get_logger(__name__)

INDEX_TYPE = "IDMap2,Flat"
REMOVAL_MODES = ("auto", "remove_ids", "mask")


class Hit(NamedTuple):
    """One search result: the item's row_id in the store and its cosine similarity score."""

    row_id: int
    score: float


class ReadWriteLock:
    """A lock that lets many readers in together but gives a writer sole access.

    Writers take precedence: once a writer waits, new readers wait too, so a stream of
    searches cannot starve an add.
    """

    def __init__(self):
        self._condition = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._writing and self._writers_waiting == 0)
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                if self._readers == 0:
                    self._condition.notify_all()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        with self._condition:
            self._writers_waiting += 1
            self._condition.wait_for(lambda: not self._writing and self._readers == 0)
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._condition:
                self._writing = False
                self._condition.notify_all()


class VectorIndex:
    """An IndexIDMap2 over IndexFlatIP whose ids are the store's row ids.

    The dim is fixed by the first add; until then the index is empty and searches return nothing.
    Searches may run together; add, remove, rebuild and load take the write lock.

    Removal has two modes. "remove_ids" deletes the vectors from the index at once; the CPU
    IndexIDMap2 supports it. A GPU index does not (GpuIndexFlat has no remove_ids), so there removed
    row ids go into a mask: searches ask faiss for k plus the masked count and drop masked hits.
    Once the mask contains more than max_masked row ids, needs_rebuild turns true, and the owner
    calls rebuild() with the stored vectors. removal="auto" picks remove_ids on the CPU and the
    mask on a GPU; "mask" forces the mask, so that the GPU's path can be tested on a CPU.
    """

    def __init__(self, device: str = "auto", threads: int = 0, removal: str = "auto", max_masked: int = 1024):
        if removal not in REMOVAL_MODES:
            raise ValueError(f"removal must be one of {', '.join(REMOVAL_MODES)}, got {removal!r}")
        if threads > 0:
            faiss.omp_set_num_threads(threads)
        self.device = _choose_device(device)
        if self.device == "gpu" and removal == "remove_ids":
            raise ConfigError("IMGSEARCH_INDEX_REMOVAL is remove_ids, which a GPU index cannot do; use auto or mask")
        if removal == "auto":
            removal = "mask" if self.device == "gpu" else "remove_ids"
        self.removal = removal
        self._max_masked = max_masked
        self._gpu_resources = faiss.StandardGpuResources() if self.device == "gpu" else None
        self._index = None
        self._masked: set[int] = set()
        self._lock = ReadWriteLock()
        log.info("vector_index_created", device=self.device, removal=self.removal, threads=faiss.omp_get_max_threads())

    @property
    def index_type(self) -> str:
        return INDEX_TYPE

    @property
    def dim(self) -> int | None:
        """Number of components of each vector, or None before the first add."""
        with self._lock.reading():
            return None if self._index is None else self._index.d

    @property
    def masked_count(self) -> int:
        """Number of removed row ids whose vectors are still in the index, hidden by the mask."""
        with self._lock.reading():
            return len(self._masked)

    @property
    def needs_rebuild(self) -> bool:
        """Whether the mask has grown past max_masked, so that the owner should call rebuild()."""
        with self._lock.reading():
            return len(self._masked) > self._max_masked

    def __len__(self) -> int:
        """Return the number of vectors in the index, masked ones excluded."""
        with self._lock.reading():
            return 0 if self._index is None else self._index.ntotal - len(self._masked)

    def add(self, row_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add L2-normalised float32 vectors of shape (n, dim) under int64 row_ids of shape (n,)."""
        ids, xb = _checked_batch(row_ids, vectors)
        with self._lock.writing():
            if self._index is None:
                self._index = self._new_index(xb.shape[1])
            if xb.shape[1] != self._index.d:
                raise ValueError(f"vectors have dim {xb.shape[1]}, but the index has dim {self._index.d}")
            self._index.add_with_ids(xb, ids)

    def remove(self, row_ids: np.ndarray) -> int:
        """Remove row_ids from the index, or mask them; return how many of them the index contained."""
        ids = np.unique(np.asarray(row_ids, dtype=np.int64))
        with self._lock.writing():
            if self._index is None or len(ids) == 0:
                return 0
            if self.removal == "remove_ids":
                return int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))
            present = [int(row_id) for row_id in ids[self._contains(ids)] if int(row_id) not in self._masked]
            self._masked.update(present)
            return len(present)

    def rebuild(self, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> int:
        """Replace the index with one built from (row_ids, vectors) batches, clearing the mask.

        The new index is built before the write lock is taken, so searches go on meanwhile. The
        caller must keep adds and removals out until this returns. Returns the vector count.
        """
        index = None
        for row_ids, vectors in batches:
            ids, xb = _checked_batch(row_ids, vectors)
            if index is None:
                index = faiss.IndexIDMap2(faiss.IndexFlatIP(xb.shape[1]))
            index.add_with_ids(xb, ids)
        device_index = None if index is None else self._on_device(index)
        with self._lock.writing():
            masked = len(self._masked)
            self._index = device_index
            self._masked = set()
        count = 0 if index is None else index.ntotal
        log.info("vector_index_rebuilt", item_count=count, masked_dropped=masked)
        return count

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Return copies of the row ids (int64, shape (n,)) and vectors (float32, shape (n, dim)) in the index.

        Masked row ids are left out. An empty index returns arrays of shape (0,) and (0, 0).
        """
        with self._lock.reading():
            if self._index is None:
                return np.empty(0, dtype=np.int64), np.empty((0, 0), dtype=np.float32)
            index = self._index if self._gpu_resources is None else faiss.index_gpu_to_cpu(self._index)
            row_ids = faiss.vector_to_array(index.id_map).astype(np.int64)
            vectors = _flat_vectors(faiss.downcast_index(index.index))
            masked = frozenset(self._masked)
        if masked:
            keep = ~np.isin(row_ids, np.fromiter(masked, dtype=np.int64))
            row_ids, vectors = row_ids[keep], vectors[keep]
        return row_ids, vectors

    def load(self, row_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the index with one of the given row ids and vectors, as arrays() returned them, clearing the mask.

        Vectors of shape (0, 0) leave the index empty, with no dim. Raises ValueError for arrays of
        other lengths or shapes.
        """
        ids, xb = _checked_batch(row_ids, vectors)
        index = None
        if xb.shape[1] > 0:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(xb.shape[1]))
            index.add_with_ids(xb, ids)
        elif len(ids):
            raise ValueError(f"got {len(ids)} row ids but vectors of dim 0")
        device_index = None if index is None else self._on_device(index)
        with self._lock.writing():
            self._index = device_index
            self._masked = set()

    def row_ids(self) -> np.ndarray:
        """Return the row ids in the index, masked ones excluded, as a sorted int64 array."""
        with self._lock.reading():
            if self._index is None:
                return np.empty(0, dtype=np.int64)
            ids = np.sort(faiss.vector_to_array(self._index.id_map).astype(np.int64))
            if self._masked:
                ids = ids[~np.isin(ids, np.fromiter(self._masked, dtype=np.int64))]
            return ids

    def search(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """Return up to k hits per query vector, best first, with scores clamped to [-1, 1].

        Fewer than k hits come back when the index contains fewer than k vectors. Masked row ids
        never come back.
        """
        xq = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._lock.reading():
            if self._index is None or self._index.ntotal == 0:
                return [[] for _ in range(xq.shape[0])]
            if xq.shape[1] != self._index.d:
                raise ValueError(f"queries have dim {xq.shape[1]}, but the index has dim {self._index.d}")
            # NOTE: a GPU index rejects k above 2048 (GPU_MAX_SELECTION_K in faiss/gpu/utils/DeviceDefs.cuh),
            # so on a GPU MAX_K plus MAX_MASKED_REMOVALS must stay at or below 2048.
            D, I = self._index.search(xq, min(k + len(self._masked), self._index.ntotal))  # noqa: E741 - faiss's names
            masked = frozenset(self._masked)
        return [_real_hits(scores, ids, masked)[:k] for scores, ids in zip(D, I)]

    def vectors(self, row_ids: np.ndarray) -> np.ndarray:
        """Return the stored vectors of row_ids as a float32 array of shape (n, dim).

        Raises KeyError naming a row_id that the index does not contain or has masked.
        """
        found, vectors = self.vectors_if_present(row_ids)
        if not np.all(found):
            ids = np.asarray(row_ids, dtype=np.int64)
            if self.dim is None:
                raise KeyError(f"row_id {int(ids[0])} is not in the index, which is empty")
            raise KeyError(f"not every row_id of {ids[:5].tolist()} (first 5) is in the index: "
                           f"row_id {int(ids[~found][0])} is missing")
        return vectors

    def vectors_if_present(self, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (found, vectors) for row_ids: a bool array, and float32 vectors with zeros where found is False.

        Items removed while a long reader ran come back as not found instead of raising. An empty
        index returns vectors of shape (n, 0).
        """
        ids = np.ascontiguousarray(row_ids, dtype=np.int64)
        with self._lock.reading():
            if self._index is None:
                return np.zeros(len(ids), dtype=bool), np.empty((len(ids), 0), dtype=np.float32)
            found = np.ones(len(ids), dtype=bool)
            if self._masked:
                found = np.array([int(row_id) not in self._masked for row_id in ids], dtype=bool)
            vectors = np.zeros((len(ids), self._index.d), dtype=np.float32)
            if np.all(found) and len(ids):
                try:
                    return found, self._index.reconstruct_batch(ids)
                except RuntimeError:
                    pass  # IndexIDMap2 raises naming the first missing key; look up one at a time below.
            for position in np.flatnonzero(found):
                try:
                    vectors[position] = self._index.reconstruct(int(ids[position]))
                except RuntimeError:
                    found[position] = False
            return found, vectors

    def _contains(self, ids: np.ndarray) -> np.ndarray:
        return np.isin(ids, faiss.vector_to_array(self._index.id_map))

    def _new_index(self, dim: int):
        return self._on_device(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)))

    def _on_device(self, index):
        if self._gpu_resources is None:
            return index
        # NOTE: the GPU paths (this copy, the copy back in arrays(), and removal by mask with a GPU
        # index) have never run on a GPU; the tests force the mask on the CPU.
        # faiss GPU indexes reject k above GPU_MAX_SELECTION_K (2048 in faiss/gpu/utils/DeviceDefs.cuh)
        # unless faiss is built with cuVS, so MAX_K must stay at or below that on a GPU.
        return faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)


def _choose_device(device: str) -> str:
    gpus = faiss.get_num_gpus()
    if device == "gpu" and gpus == 0:
        raise ConfigError("IMGSEARCH_INDEX_DEVICE is gpu, but faiss sees no GPU; use auto or cpu")
    if device == "auto":
        return "gpu" if gpus > 0 else "cpu"
    return device


def _flat_vectors(flat) -> np.ndarray:
    """Return a copy of the vectors of an IndexFlat, read from its storage rather than decoded one by one."""
    if flat.ntotal == 0:
        return np.empty((0, flat.d), dtype=np.float32)
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d).copy()


def _checked_batch(row_ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.ascontiguousarray(row_ids, dtype=np.int64)
    xb = np.ascontiguousarray(vectors, dtype=np.float32)
    if xb.ndim != 2 or xb.shape[0] != ids.shape[0]:
        raise ValueError(f"expected {ids.shape[0]} vectors as a 2-d array, got shape {xb.shape}")
    return ids, xb


def _real_hits(scores: np.ndarray, ids: np.ndarray, masked: frozenset[int]) -> list[Hit]:
    # faiss pads missing results with id -1 and score -3.4e38.
    return [
        Hit(row_id=int(row_id), score=float(min(1.0, max(-1.0, score))))
        for score, row_id in zip(scores, ids)
        if row_id >= 0 and int(row_id) not in masked
    ]
