"""The faiss adapter: exact inner-product search over L2-normalised vectors, on the CPU or a GPU."""

import contextlib
import threading
from collections.abc import Iterator
from typing import NamedTuple

import faiss
import numpy as np
import structlog

from imgsearch_common.config import ConfigError

log = structlog.get_logger(__name__)

INDEX_TYPE = "IDMap2,Flat"


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
    Searches may run together; add takes the write lock.
    """

    def __init__(self, device: str = "auto", threads: int = 0):
        if threads > 0:
            faiss.omp_set_num_threads(threads)
        self.device = _choose_device(device)
        self._gpu_resources = faiss.StandardGpuResources() if self.device == "gpu" else None
        self._index = None
        self._lock = ReadWriteLock()
        log.info("vector_index_created", device=self.device, threads=faiss.omp_get_max_threads())

    @property
    def index_type(self) -> str:
        return INDEX_TYPE

    @property
    def dim(self) -> int | None:
        """Number of components of each vector, or None before the first add."""
        with self._lock.reading():
            return None if self._index is None else self._index.d

    def __len__(self) -> int:
        with self._lock.reading():
            return 0 if self._index is None else self._index.ntotal

    def add(self, row_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add L2-normalised float32 vectors of shape (n, dim) under int64 row_ids of shape (n,)."""
        ids = np.ascontiguousarray(row_ids, dtype=np.int64)
        xb = np.ascontiguousarray(vectors, dtype=np.float32)
        if xb.ndim != 2 or xb.shape[0] != ids.shape[0]:
            raise ValueError(f"expected {ids.shape[0]} vectors as a 2-d array, got shape {xb.shape}")
        with self._lock.writing():
            if self._index is None:
                self._index = self._new_index(xb.shape[1])
            if xb.shape[1] != self._index.d:
                raise ValueError(f"vectors have dim {xb.shape[1]}, but the index has dim {self._index.d}")
            self._index.add_with_ids(xb, ids)

    def search(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """Return up to k hits per query vector, best first, with scores clamped to [-1, 1].

        Fewer than k hits come back when the index contains fewer than k vectors.
        """
        xq = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._lock.reading():
            if self._index is None or self._index.ntotal == 0:
                return [[] for _ in range(xq.shape[0])]
            if xq.shape[1] != self._index.d:
                raise ValueError(f"queries have dim {xq.shape[1]}, but the index has dim {self._index.d}")
            D, I = self._index.search(xq, k)  # noqa: E741 - faiss's names for distances and ids
        return [_real_hits(scores, ids) for scores, ids in zip(D, I)]

    def vectors(self, row_ids: np.ndarray) -> np.ndarray:
        """Return the stored vectors of row_ids as a float32 array of shape (n, dim).

        Raises KeyError naming a row_id that the index does not contain.
        """
        ids = np.ascontiguousarray(row_ids, dtype=np.int64)
        with self._lock.reading():
            if self._index is None:
                if len(ids):
                    raise KeyError(f"row_id {int(ids[0])} is not in the index, which is empty")
                return np.empty((0, 0), dtype=np.float32)
            if len(ids) == 0:
                return np.empty((0, self._index.d), dtype=np.float32)
            try:
                return self._index.reconstruct_batch(ids)
            except RuntimeError as error:
                # IndexIDMap2 raises a RuntimeError naming the key it cannot find.
                raise KeyError(f"not every row_id of {ids[:5].tolist()} (first 5) is in the index: {error}") from error

    def _new_index(self, dim: int):
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        if self._gpu_resources is None:
            return index
        # NOTE: this GPU path has never run, because the machines it was written on have no GPU.
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


def _real_hits(scores: np.ndarray, ids: np.ndarray) -> list[Hit]:
    # faiss pads missing results with id -1 and score -3.4e38.
    return [
        Hit(row_id=int(row_id), score=float(min(1.0, max(-1.0, score))))
        for score, row_id in zip(scores, ids)
        if row_id >= 0
    ]
