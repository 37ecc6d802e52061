"""Synthetic clustered vectors for the performance benchmark, their exact neighbours, and a store filled with them."""

import pathlib

import faiss
import numpy as np

from index_service.store import NewItem, Store

MODEL_ID = "synthetic-clustered-512"
# Vectors per cluster centre, on average; real embeddings gather in groups of alike pictures too.
_PER_CLUSTER = 100
# Spread of the points around their centre, per component; centres are standard normal.
_SPREAD = 0.6
_CHUNK = 100_000


def clustered(count: int, dim: int, seed: int) -> np.ndarray:
    """Return count L2-normalised float32 vectors of dim, drawn around count / 100 random centres.

    The centres depend on count, dim and seed only, so queries_like() can draw from the same ones.
    """
    return _draw(count, dim, np.random.default_rng(seed), _centres(count, dim, seed))


def queries_like(count: int, database_count: int, dim: int, seed: int) -> np.ndarray:
    """Return count query vectors from the clusters of clustered(database_count, dim, seed), but not in it."""
    return _draw(count, dim, np.random.default_rng(seed + 1), _centres(database_count, dim, seed))


def exact_neighbours(database: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Return the positions in database of each query's k largest inner products, best first, by faiss brute force."""
    index = faiss.IndexFlatIP(database.shape[1])
    index.add(database)
    return index.search(queries, k)[1]


def recall_at(found: list[list[int]], truth: np.ndarray) -> float:
    """Return the mean share of each query's true top k (truth's width) among its found positions."""
    k = truth.shape[1]
    return float(np.mean([len(set(hits[:k]) & set(row.tolist())) / k for hits, row in zip(found, truth)]))


def fill_store(data_dir: pathlib.Path, vectors: np.ndarray) -> None:
    """Store vectors as items v0, v1, ... of model MODEL_ID in a new store in data_dir, in large transactions."""
    store = Store(data_dir)
    try:
        settings = {"model_id": MODEL_ID, "dim": str(vectors.shape[1])}
        for start in range(0, len(vectors), _CHUNK):
            items = [
                NewItem(item_id=f"v{n}", sha256=None, uri="", width=0, height=0, metadata={},
                        vector=vectors[n], model_id=MODEL_ID)
                for n in range(start, min(start + _CHUNK, len(vectors)))
            ]
            store.add_items(items, settings if start == 0 else None)
    finally:
        store.close()


def _centres(count: int, dim: int, seed: int) -> np.ndarray:
    clusters = max(1, count // _PER_CLUSTER)
    return np.random.default_rng([seed, 7]).standard_normal((clusters, dim)).astype(np.float32)


def _draw(count: int, dim: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    vectors = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, _CHUNK):
        size = min(_CHUNK, count - start)
        points = centres[rng.integers(0, len(centres), size)]
        points += _SPREAD * rng.standard_normal((size, dim), dtype=np.float32)
        points /= np.linalg.norm(points, axis=1, keepdims=True)
        vectors[start : start + size] = points
    return vectors
