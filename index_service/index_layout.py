"""Index kinds and encodings: which faiss index a collection of a given size gets, and how it is built and searched.

A flat index compares the query with every vector: exact, and its cost grows with the collection.
IVF clusters the vectors into nlist lists and visits the nprobe lists nearest the query; HNSW
walks a graph of neighbours with a candidate list of ef_search. Both are approximate: they miss
some true neighbours, fewer the harder they search. The encoding is how each vector is kept:
float32 (exact), fp16 (half the memory, scores within about 1e-3) or sq8 (a quarter, scores
within about 1e-2; trained on a sample).
"""

import dataclasses
import math

import faiss
import numpy as np

KINDS = ("auto", "flat", "ivf", "hnsw")
ENCODINGS = ("float32", "fp16", "sq8")
_SCALAR_TYPES = {"fp16": faiss.ScalarQuantizer.QT_fp16, "sq8": faiss.ScalarQuantizer.QT_8bit}
# Minimum number of vectors that train an IVF index or an sq8 encoding. Below it the index stays flat float32.
MIN_TRAINING_ITEMS = 1000
# faiss's k-means wants at least this many training vectors per list (it warns below 39).
_TRAINING_ITEMS_PER_LIST = 39
_MAX_NLIST = 65536


@dataclasses.dataclass(frozen=True)
class Layout:
    """A concrete index: its kind (flat, ivf or hnsw), encoding, nlist (ivf) or m (hnsw), and training size."""

    kind: str = "flat"
    encoding: str = "float32"
    nlist: int = 0
    hnsw_m: int = 0
    trained_items: int = 0

    @property
    def needs_training(self) -> bool:
        return self.kind == "ivf" or self.encoding == "sq8"

    @property
    def removes_in_place(self) -> bool:
        """Whether faiss can delete vectors from this index; an HNSW graph cannot."""
        return self.kind != "hnsw"

    @property
    def description(self) -> str:
        """A faiss-factory-like name, for example "IDMap,Flat", "IVF1024,SQ8" or "IDMap,HNSW32,Flat"."""
        encoding = {"float32": "Flat", "fp16": "SQfp16", "sq8": "SQ8"}[self.encoding]
        if self.kind == "ivf":
            return f"IVF{self.nlist},{encoding}"
        if self.kind == "hnsw":
            return f"IDMap,HNSW{self.hnsw_m},{encoding}"
        return f"IDMap,{encoding}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> "Layout":
        known = {field.name for field in dataclasses.fields(cls)}
        if set(fields) != known:
            raise ValueError(f"an index layout has fields {sorted(known)}, got {sorted(fields)}")
        return cls(**fields)


@dataclasses.dataclass(frozen=True)
class IndexSpec:
    """The configured index, from which layout_for() picks a Layout for each collection size.

    kind "auto" is flat below ivf_min_items and IVF from there on; "ivf" is IVF from
    MIN_TRAINING_ITEMS on. nlist 0 means about 4 * sqrt(n), at most n / 39. nprobe and ef_search
    are the defaults of searches that set none. At most train_items vectors train an index.
    """

    kind: str = "auto"
    encoding: str = "float32"
    ivf_min_items: int = 100_000
    nlist: int = 0
    nprobe: int = 32
    hnsw_m: int = 32
    ef_search: int = 128
    train_items: int = 50_000

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"index kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"index encoding must be one of {', '.join(ENCODINGS)}, got {self.encoding!r}")
        for name in ("nprobe", "hnsw_m", "ef_search", "train_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def layout_for(self, item_count: int) -> Layout:
        """Return the layout that a collection of item_count vectors should have."""
        trainable = item_count >= MIN_TRAINING_ITEMS
        trained_items = min(item_count, self.train_items)
        ivf = (self.kind == "ivf" and trainable) or (self.kind == "auto" and item_count >= max(self.ivf_min_items, 1))
        if ivf:
            return Layout("ivf", self.encoding, self._nlist_for(trained_items, item_count), 0, trained_items)
        encoding = self.encoding if self.encoding != "sq8" or trainable else "float32"
        kind = "hnsw" if self.kind == "hnsw" else "flat"
        trained = trained_items if encoding == "sq8" else 0
        return Layout(kind, encoding, 0, self.hnsw_m if kind == "hnsw" else 0, trained)

    def wants_rebuild(self, current: Layout, item_count: int) -> bool:
        """Return whether an index of layout current should be rebuilt now that it contains item_count vectors.

        True when the kind or encoding should change, when an IVF index should have at least twice
        its lists, or when four times its training set is now available.
        """
        target = self.layout_for(item_count)
        if (target.kind, target.encoding) != (current.kind, current.encoding):
            return True
        if current.kind == "ivf" and target.nlist >= 2 * current.nlist:
            return True
        return current.needs_training and target.trained_items >= 4 * current.trained_items

    def default_effort(self, layout: Layout) -> int:
        """Return the nprobe (ivf) or ef_search (hnsw) of a search that sets none; 0 for flat."""
        if layout.kind == "ivf":
            return min(self.nprobe, layout.nlist)
        return self.ef_search if layout.kind == "hnsw" else 0

    def _nlist_for(self, trained_items: int, item_count: int) -> int:
        requested = self.nlist or round(4 * math.sqrt(item_count))
        return max(1, min(requested, trained_items // _TRAINING_ITEMS_PER_LIST, _MAX_NLIST))


def new_index(layout: Layout, dim: int, training: np.ndarray | None = None):
    """Return an empty CPU faiss index of layout for vectors of dim, trained on training when it needs it.

    Flat and HNSW indexes sit in an IndexIDMap. Its ids stay in ascending order, because row ids
    only grow and removal keeps the order, so vector_index looks vectors up by binary search over
    them. IndexIDMap2's hash map would do the same, but building it for a million vectors took 4 s.

    Raises ValueError when a layout that needs training gets fewer than its trained_items vectors.
    """
    if layout.needs_training and (training is None or len(training) < layout.trained_items):
        got = 0 if training is None else len(training)
        raise ValueError(f"layout {layout.description} needs {layout.trained_items} training vectors, got {got}")
    if layout.kind == "ivf":
        index = _new_ivf(layout, dim)
    elif layout.kind == "hnsw":
        index = faiss.IndexIDMap(_new_hnsw(layout, dim))
    else:
        index = faiss.IndexIDMap(_new_flat(layout, dim))
    if layout.needs_training:
        index.train(np.ascontiguousarray(training[: layout.trained_items], dtype=np.float32))
    return index


def search_parameters(layout: Layout, effort: int, k: int, selector=None):
    """Return the faiss SearchParameters of one search, or None when a flat index needs none.

    effort is the nprobe (ivf) or ef_search (hnsw); it is clamped to [1, nlist] or raised to k.
    The caller must keep selector alive until the search returns.
    """
    if layout.kind == "ivf":
        return faiss.SearchParametersIVF(nprobe=max(1, min(effort, layout.nlist)), sel=selector)
    if layout.kind == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=max(effort, k), sel=selector)
    return None if selector is None else faiss.SearchParameters(sel=selector)


def code_bytes(layout: Layout, dim: int) -> int:
    """Return the bytes that one vector takes in layout's encoding."""
    return dim * {"float32": 4, "fp16": 2, "sq8": 1}[layout.encoding]


def _new_flat(layout: Layout, dim: int):
    if layout.encoding == "float32":
        return faiss.IndexFlatIP(dim)
    return faiss.IndexScalarQuantizer(dim, _SCALAR_TYPES[layout.encoding], faiss.METRIC_INNER_PRODUCT)


def _new_hnsw(layout: Layout, dim: int):
    if layout.encoding == "float32":
        return faiss.IndexHNSWFlat(dim, layout.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    return faiss.IndexHNSWSQ(dim, _SCALAR_TYPES[layout.encoding], layout.hnsw_m, faiss.METRIC_INNER_PRODUCT)


def _new_ivf(layout: Layout, dim: int):
    quantizer = faiss.IndexFlatIP(dim)
    if layout.encoding == "float32":
        index = faiss.IndexIVFFlat(quantizer, dim, layout.nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, dim, layout.nlist, _SCALAR_TYPES[layout.encoding], faiss.METRIC_INNER_PRODUCT
        )
    # The IVF index owns its quantizer, so it must outlive this function's reference.
    index.own_fields = True
    quantizer.this.disown()
    # A hash table from id to list position lets the index remove and reconstruct vectors by id.
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    return index
