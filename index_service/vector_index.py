"""The faiss adapter: inner-product search over L2-normalised vectors, exact or approximate, on the CPU or a GPU."""

import dataclasses
from collections.abc import Iterable
from typing import NamedTuple

import faiss
import numpy as np
import structlog

from imgsearch_common.config import ConfigError
from index_service.index_layout import IndexSpec, Layout, code_bytes, new_index, search_parameters
from index_service.rwlock import ReadWriteLock

log = structlog.get_logger(__name__)

REMOVAL_MODES = ("auto", "remove_ids", "mask")
# Bytes per vector of the id bookkeeping: the id array and the reverse map of IndexIDMap2, or the
# ids and hash table of an IVF index. An estimate, for GetStats.
_ID_BYTES = 56
_TRAINING_SEED = 1234
# faiss brute-force search uses BLAS once queries times dim reach this, and a slower loop below it.
# faiss's default, 128000, keeps batches of up to 249 queries of dim 512 in the loop. Here the loop
# took about 11 ms per query at 100k vectors, and BLAS about 4 ms for a batch of 8.
_BLAS_THRESHOLD = 4096


class Hit(NamedTuple):
    """One search result: the item's row_id in the store and its cosine similarity score."""

    row_id: int
    score: float


@dataclasses.dataclass(frozen=True)
class IndexState:
    """The contents of a vector index for a snapshot: its layout and row ids, and either its vectors or its bytes.

    A flat float32 index is kept as its raw vectors, which load fastest, masked row ids left out.
    Any other layout is kept as faiss's serialisation (`serialized`, uint8), so that a trained
    index is not trained again; its row_ids are all the ids in it, and masked names those of them
    that are hidden. An empty index has dim 0 and no vectors.
    """

    layout: Layout
    dim: int
    row_ids: np.ndarray
    vectors: np.ndarray
    serialized: np.ndarray
    masked: np.ndarray

    @property
    def item_count(self) -> int:
        """The number of vectors that searches can find."""
        return len(self.row_ids) - len(self.masked)


class BuiltIndex:
    """A CPU faiss index of one layout, built away from the VectorIndex that install() hands it to."""

    def __init__(self, index, layout: Layout):
        self.index = index
        self.layout = layout

    @property
    def count(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def add(self, row_ids: np.ndarray, vectors: np.ndarray) -> None:
        ids, xb = _checked_batch(row_ids, vectors)
        if len(ids):
            self.index.add_with_ids(xb, ids)

    def remove(self, row_ids: np.ndarray) -> int:
        ids = np.unique(np.asarray(row_ids, dtype=np.int64))
        if self.index is None or len(ids) == 0:
            return 0
        if not self.layout.removes_in_place:
            raise ValueError(f"an index of layout {self.layout.description} cannot remove vectors")
        return int(self.index.remove_ids(faiss.IDSelectorArray(ids)))


class VectorIndex:
    """A faiss index whose ids are the store's row ids, of the layout that its IndexSpec picks for its size.

    The dim is fixed by the first add; until then the index is empty and searches return nothing.
    Searches may run together; add, remove, install and load take the write lock. The index starts
    flat (or HNSW) and unencoded; once wants_relayout turns true, the owner builds the layout that
    the spec wants with build() and swaps it in with install().

    Removal has two modes. "remove_ids" deletes the vectors from the index at once. An HNSW graph
    and a GPU index cannot, so there removed row ids go into a mask: searches ask faiss for k plus
    the masked count and drop masked hits. Once the mask contains more than max_masked row ids,
    needs_rebuild turns true, and the owner calls rebuild() with the stored vectors. removal="auto"
    picks remove_ids where the index can and the mask elsewhere; "mask" forces the mask, so that
    the GPU's path can be tested on a CPU.
    """

    def __init__(
        self,
        device: str = "auto",
        threads: int = 0,
        removal: str = "auto",
        max_masked: int = 1024,
        spec: IndexSpec = IndexSpec(),
    ):
        if removal not in REMOVAL_MODES:
            raise ValueError(f"removal must be one of {', '.join(REMOVAL_MODES)}, got {removal!r}")
        if threads > 0:
            faiss.omp_set_num_threads(threads)
        self._threads = faiss.omp_get_max_threads()
        faiss.cvar.distance_compute_blas_threshold = _BLAS_THRESHOLD
        self.device = _choose_device(device)
        _check_device_supports(self.device, spec, removal)
        self.spec = spec
        if removal == "auto":
            removal = "mask" if self.device == "gpu" or spec.kind == "hnsw" else "remove_ids"
        self.removal = removal
        self._max_masked = max_masked
        self._gpu_resources = faiss.StandardGpuResources() if self.device == "gpu" else None
        self._index = None
        # Whether the ids of an IndexIDMap ascend, so that a binary search finds a row id's position.
        self._ids_ascend = True
        self._layout = spec.layout_for(0)
        self._masked: set[int] = set()
        self._lock = ReadWriteLock()
        log.info("vector_index_created", device=self.device, removal=self.removal, kind=spec.kind,
                 encoding=spec.encoding, threads=faiss.omp_get_max_threads())

    @property
    def layout(self) -> Layout:
        with self._lock.reading():
            return self._layout

    @property
    def index_type(self) -> str:
        return self.layout.description

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

    @property
    def wants_relayout(self) -> bool:
        """Whether the spec wants another layout for the current size (see IndexSpec.wants_rebuild)."""
        with self._lock.reading():
            count = 0 if self._index is None else self._index.ntotal - len(self._masked)
            return self._index is not None and self.spec.wants_rebuild(self._layout, count)

    @property
    def memory_bytes(self) -> int:
        """An estimate of the memory that the vectors and their ids take."""
        with self._lock.reading():
            if self._index is None:
                return 0
            return int(self._index.ntotal) * (code_bytes(self._layout, self._index.d) + _ID_BYTES)

    def __len__(self) -> int:
        """Return the number of vectors in the index, masked ones excluded."""
        with self._lock.reading():
            return 0 if self._index is None else self._index.ntotal - len(self._masked)

    def add(self, row_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add L2-normalised float32 vectors of shape (n, dim) under int64 row_ids of shape (n,)."""
        ids, xb = _checked_batch(row_ids, vectors)
        with self._lock.writing():
            if self._index is None:
                self._layout = self.spec.layout_for(0)
                self._index = self._on_device(new_index(self._layout, xb.shape[1]))
            if xb.shape[1] != self._index.d:
                raise ValueError(f"vectors have dim {xb.shape[1]}, but the index has dim {self._index.d}")
            if len(ids) and self._ids_ascend and _has_id_map(self._index):
                known = _id_map_view(self._index)
                self._ids_ascend = _ascending(ids) and (len(known) == 0 or ids[0] > known[-1])
            self._index.add_with_ids(xb, ids)

    def remove(self, row_ids: np.ndarray) -> int:
        """Remove row_ids from the index, or mask them; return how many of them the index contained."""
        ids = np.unique(np.asarray(row_ids, dtype=np.int64))
        with self._lock.writing():
            if self._index is None or len(ids) == 0:
                return 0
            if not self._masks():
                return int(self._index.remove_ids(faiss.IDSelectorArray(ids)))
            present = [int(row_id) for row_id in ids[np.isin(ids, self._ids())] if int(row_id) not in self._masked]
            self._masked.update(present)
            return len(present)

    def build(self, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> BuiltIndex:
        """Build an index of the layout that the spec picks for the batches' size, without touching this one.

        Reads every batch into memory first, since a trained layout samples its training vectors
        from all of them.
        """
        parts = [_checked_batch(row_ids, vectors) for row_ids, vectors in batches]
        parts = [(ids, xb) for ids, xb in parts if len(ids)]
        count = sum(len(ids) for ids, _ in parts)
        layout = self.spec.layout_for(count)
        if count == 0:
            return BuiltIndex(None, layout)
        training = _training_sample(parts, layout.trained_items) if layout.needs_training else None
        built = BuiltIndex(new_index(layout, parts[0][1].shape[1], training), layout)
        for ids, xb in parts:
            built.add(ids, xb)
        return built

    def install(self, built: BuiltIndex) -> None:
        """Replace the index with built, clearing the mask; searches wait only for the swap."""
        masked = self._swap(built, set())
        log.info("vector_index_installed", item_count=built.count, index_type=built.layout.description,
                 masked_dropped=masked)

    def rebuild(self, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> int:
        """Replace the index with one built from (row_ids, vectors) batches; return the vector count.

        The caller must keep adds and removals out until this returns.
        """
        built = self.build(batches)
        self.install(built)
        return built.count

    def state(self) -> IndexState:
        """Return the index's contents for a snapshot, masked row ids left out (see IndexState)."""
        with self._lock.reading():
            if self._index is None:
                return _empty_state(self._layout)
            index = self._index if self._gpu_resources is None else faiss.index_gpu_to_cpu(self._index)
            layout, masked = self._layout, np.fromiter(self._masked, dtype=np.int64)
            if layout.kind == "flat" and layout.encoding == "float32":
                row_ids = faiss.vector_to_array(index.id_map).astype(np.int64)
                vectors = _flat_vectors(faiss.downcast_index(index.index))
                keep = ~np.isin(row_ids, masked)
                return IndexState(layout, index.d, row_ids[keep], vectors[keep], np.empty(0, dtype=np.uint8),
                                  np.empty(0, dtype=np.int64))
            serialized = faiss.serialize_index(index)
            row_ids = _index_ids(index)
        return IndexState(layout, int(index.d), row_ids, np.empty((0, 0), dtype=np.float32), serialized, masked)

    def load_state(self, state: IndexState) -> None:
        """Replace the index with the one state describes, as state() returned it, clearing the mask.

        Raises ValueError for a state whose arrays disagree with each other.
        """
        if len(state.serialized):
            index = faiss.deserialize_index(state.serialized)
            if index.d != state.dim or index.ntotal != len(state.row_ids):
                raise ValueError(f"the serialised index has dim {index.d} and {index.ntotal} vectors, "
                                 f"but the state says dim {state.dim} and {len(state.row_ids)} row ids")
            built = BuiltIndex(index, state.layout)
        else:
            built = self._flat_built(state)
        masked = {int(row_id) for row_id in state.masked} if len(state.serialized) else set()
        self._swap(built, masked)

    def _swap(self, built: BuiltIndex, masked: set[int]) -> int:
        """Put built in place of the index, on the device, with masked as its mask; return the old mask's size."""
        device_index = None if built.index is None else self._on_device(built.index)
        ascend = device_index is None or not _has_id_map(device_index) or _ascending(_id_map_view(device_index))
        with self._lock.writing():
            dropped = len(self._masked)
            self._index, self._layout, self._masked, self._ids_ascend = device_index, built.layout, masked, ascend
        return dropped

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the row ids (int64, (n,)) and vectors (float32, (n, dim)) in the index, masked ones left out.

        Vectors of an encoded layout are decoded, so they are approximate. An empty index returns
        arrays of shape (0,) and (0, 0).
        """
        row_ids = self.row_ids()
        found, vectors = self.vectors_if_present(row_ids)
        if vectors.shape[1] == 0:
            return row_ids, np.empty((0, 0), dtype=np.float32)
        return row_ids[found], vectors[found]

    def load(self, row_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the index with a flat float32 one of row_ids and vectors, as arrays() returned them.

        Vectors of shape (0, 0) leave the index empty, with no dim. Raises ValueError for arrays of
        other lengths or shapes.
        """
        no_ids = np.empty(0, dtype=np.int64)
        layout = Layout()
        dim = 0 if np.ndim(vectors) != 2 else np.shape(vectors)[1]
        self.load_state(IndexState(layout, dim, row_ids, vectors, np.empty(0, dtype=np.uint8), no_ids))

    def row_ids(self) -> np.ndarray:
        """Return the row ids in the index, masked ones excluded, as a sorted int64 array."""
        with self._lock.reading():
            if self._index is None:
                return np.empty(0, dtype=np.int64)
            ids = np.sort(self._ids())
            if self._masked:
                ids = ids[~np.isin(ids, np.fromiter(self._masked, dtype=np.int64))]
            return ids

    def search(
        self, vectors: np.ndarray, k: int, effort: int | None = None, selector=None
    ) -> list[list[Hit]]:
        """Return up to k hits per query vector, best first, with scores clamped to [-1, 1].

        effort is the nprobe (ivf) or ef_search (hnsw) of this search; None means the spec's
        default. selector, a faiss IDSelector over row ids, limits the search to the row ids that
        it accepts. Fewer than k hits come back when fewer vectors pass. Masked row ids never come
        back.
        """
        xq = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._lock.reading():
            if self._index is None or self._index.ntotal == 0:
                return [[] for _ in range(xq.shape[0])]
            if xq.shape[1] != self._index.d:
                raise ValueError(f"queries have dim {xq.shape[1]}, but the index has dim {self._index.d}")
            # NOTE: a GPU index rejects k above 2048 (GPU_MAX_SELECTION_K in faiss/gpu/utils/DeviceDefs.cuh),
            # so on a GPU MAX_K plus MAX_MASKED_REMOVALS must stay at or below 2048.
            wanted = min(k + len(self._masked), self._index.ntotal)
            effort = self.spec.default_effort(self._layout) if effort is None else effort
            params = search_parameters(self._layout, effort, wanted, selector)
            # One query runs on one thread either way, and idle OpenMP threads only contend with
            # the rest of the process: a lone flat query took 4x longer with two threads here.
            # The setting belongs to the calling thread.
            faiss.omp_set_num_threads(1 if len(xq) == 1 else self._threads)
            D, I = self._index.search(xq, wanted, params=params)  # noqa: E741 - faiss's names
            masked = frozenset(self._masked)
        return [_real_hits(scores, ids, masked)[:k] for scores, ids in zip(D, I)]

    def vectors(self, row_ids: np.ndarray) -> np.ndarray:
        """Return the vectors of row_ids as a float32 array of shape (n, dim); decoded, so approximate when encoded.

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
            if _has_id_map(self._index):
                self._reconstruct_by_position(ids, found, vectors)
                return found, vectors
            if np.all(found) and len(ids):
                try:
                    return found, self._index.reconstruct_batch(ids)
                except RuntimeError:
                    pass  # faiss raises naming the first missing key; look up one at a time below.
            for position in np.flatnonzero(found):
                try:
                    vectors[position] = self._index.reconstruct(int(ids[position]))
                except RuntimeError:
                    found[position] = False
            return found, vectors

    def _reconstruct_by_position(self, ids: np.ndarray, found: np.ndarray, vectors: np.ndarray) -> None:
        """Fill vectors with those of ids, found by their positions in the id map; clear found for missing ones."""
        known = _id_map_view(self._index)
        if self._ids_ascend:
            order, sorted_known = None, known
        else:
            order = np.argsort(known, kind="stable")
            sorted_known = known[order]
        positions = np.minimum(np.searchsorted(sorted_known, ids), max(len(known) - 1, 0))
        found &= len(known) > 0
        found &= sorted_known[positions] == ids if len(known) else found
        if order is not None:
            positions = order[positions]
        wanted = np.flatnonzero(found)
        if len(wanted):
            inner = faiss.downcast_index(self._index.index)
            vectors[wanted] = inner.reconstruct_batch(positions[wanted].astype(np.int64))

    def _masks(self) -> bool:
        return self.removal == "mask" or not self._layout.removes_in_place

    def _ids(self) -> np.ndarray:
        return _index_ids(self._index)

    def _flat_built(self, state: IndexState) -> BuiltIndex:
        ids, xb = _checked_batch(state.row_ids, state.vectors)
        if xb.shape[1] == 0:
            if len(ids):
                raise ValueError(f"got {len(ids)} row ids but vectors of dim 0")
            return BuiltIndex(None, self.spec.layout_for(0))
        built = BuiltIndex(new_index(state.layout, xb.shape[1]), state.layout)
        built.add(ids, xb)
        return built

    def _on_device(self, index):
        if self._gpu_resources is None:
            return index
        # NOTE: the GPU paths (this copy, the copy back in state(), and removal by mask with a GPU
        # index) have never run on a GPU; the tests force the mask on the CPU.
        return faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)


def _choose_device(device: str) -> str:
    gpus = faiss.get_num_gpus()
    if device == "gpu" and gpus == 0:
        raise ConfigError("IMGSEARCH_INDEX_DEVICE is gpu, but faiss sees no GPU; use auto or cpu")
    if device == "auto":
        return "gpu" if gpus > 0 else "cpu"
    return device


def _check_device_supports(device: str, spec: IndexSpec, removal: str) -> None:
    if device == "gpu" and (spec.kind == "hnsw" or (spec.kind != "ivf" and spec.encoding != "float32")):
        raise ConfigError(
            f"an index of kind {spec.kind} with encoding {spec.encoding} cannot run on a GPU; on a GPU use kind "
            "flat with encoding float32, or kind ivf or auto"
        )
    if removal == "remove_ids" and (device == "gpu" or spec.kind == "hnsw"):
        raise ConfigError(
            f"IMGSEARCH_INDEX_REMOVAL is remove_ids, which {'a GPU' if device == 'gpu' else 'an HNSW'} index "
            "cannot do; use auto or mask"
        )


def _has_id_map(index) -> bool:
    return hasattr(index, "id_map")


def _id_map_view(index) -> np.ndarray:
    """Return the ids of an IndexIDMap as an int64 array over its memory; valid while the index is unchanged."""
    if index.ntotal == 0:
        return np.empty(0, dtype=np.int64)
    return faiss.rev_swig_ptr(index.id_map.data(), index.ntotal)


def _ascending(ids: np.ndarray) -> bool:
    return bool(len(ids) < 2 or np.all(ids[1:] > ids[:-1]))


def _index_ids(index) -> np.ndarray:
    """Return the ids in a CPU or GPU IndexIDMap, IndexIDMap2 or IVF index, unsorted."""
    if hasattr(index, "id_map"):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    if not isinstance(index, faiss.IndexIVF):
        # NOTE: a GPU IVF index keeps its lists on the device; this copy to the CPU never ran on a GPU.
        index = faiss.index_gpu_to_cpu(index)
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    parts = [
        faiss.rev_swig_ptr(lists.get_ids(number), lists.list_size(number)).copy()
        for number in range(lists.nlist)
        if lists.list_size(number)
    ]
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)


def _training_sample(parts: list[tuple[np.ndarray, np.ndarray]], size: int) -> np.ndarray:
    """Return size vectors drawn at random, without repeats, from the batches."""
    count = sum(len(ids) for ids, _ in parts)
    chosen = np.sort(np.random.default_rng(_TRAINING_SEED).choice(count, size=size, replace=False))
    sample, start = [], 0
    for _, xb in parts:
        inside = chosen[(chosen >= start) & (chosen < start + len(xb))] - start
        sample.append(xb[inside])
        start += len(xb)
    return np.concatenate(sample)


def _empty_state(layout: Layout) -> IndexState:
    no_ids = np.empty(0, dtype=np.int64)
    return IndexState(layout, 0, no_ids, np.empty((0, 0), dtype=np.float32), np.empty(0, dtype=np.uint8), no_ids)


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
