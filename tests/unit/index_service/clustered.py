"""Clustered unit vectors for index tests: uniform random vectors have no neighbour structure."""

import numpy as np


def clustered_vectors(count: int, dim: int, clusters: int, seed: int, spread: float = 0.35) -> np.ndarray:
    """Return count unit float32 vectors of dim, drawn around clusters random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    points = centres[rng.integers(0, clusters, count)] + spread * rng.standard_normal((count, dim)).astype(np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def exact_top_k(database: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Return the positions of the k largest inner products of each query, best first."""
    scores = queries @ database.T
    return np.argsort(-scores, axis=1)[:, :k]


def recall_at_k(found: list[list[int]], truth: np.ndarray) -> float:
    """Return the mean share of each query's true top k that found contains."""
    k = truth.shape[1]
    return float(np.mean([len(set(hits[:k]) & set(row.tolist())) / k for hits, row in zip(found, truth)]))
