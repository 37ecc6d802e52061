"""Write a seeded synthetic data folder for milvus_peer.py: clustered unit vectors, queries and their exact top-k.

Base vectors and queries are drawn the same way: a random cluster centre plus gaussian noise, then
L2-normalised. truth.npy contains each query's exact top-k rows of base by inner product, found by numpy
brute force. Only numpy is needed, so this runs in the project's venv and in the peer's.
"""

import argparse
import pathlib

import numpy as np

# Rows of base scored against the queries at once, so one float32 score matrix is 400 MB at 1,000 queries.
_TRUTH_CHUNK_ROWS = 100_000


def clustered_unit_vectors(rng: np.random.Generator, centres: np.ndarray, count: int, noise: float) -> np.ndarray:
    """Draw count float32 unit vectors, each a random row of centres plus gaussian noise of scale noise."""
    dim = centres.shape[1]
    picked = centres[rng.integers(0, centres.shape[0], size=count)]
    vectors = picked + rng.standard_normal((count, dim), dtype=np.float32) * np.float32(noise / np.sqrt(dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32, copy=False)


def exact_top_k(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Return the (q, k) int64 row positions in base with the highest inner product for each query, best first."""
    best_scores = np.full((queries.shape[0], 0), -np.inf, dtype=np.float32)
    best_rows = np.zeros((queries.shape[0], 0), dtype=np.int64)
    for start in range(0, base.shape[0], _TRUTH_CHUNK_ROWS):
        scores = queries @ base[start:start + _TRUTH_CHUNK_ROWS].T
        rows = np.arange(start, start + scores.shape[1], dtype=np.int64)
        best_scores = np.concatenate([best_scores, scores], axis=1)
        best_rows = np.concatenate([best_rows, np.broadcast_to(rows, scores.shape)], axis=1)

        keep = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(best_scores, keep, axis=1)
        best_rows = np.take_along_axis(best_rows, keep, axis=1)
    return best_rows


def main(argv: list[str] | None = None) -> int:
    """Write base.npy, queries.npy and truth.npy to --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True, help="folder to write the .npy files to")
    parser.add_argument("--n", type=int, default=20_000, help="number of base vectors")
    parser.add_argument("--queries", type=int, default=200, help="number of query vectors")
    parser.add_argument("--dim", type=int, default=512, help="vector dimension")
    parser.add_argument("--clusters", type=int, default=200, help="number of gaussian clusters")
    parser.add_argument("--noise", type=float, default=2.0, help="noise norm relative to a unit cluster centre")
    parser.add_argument("--k", type=int, default=100, help="exact neighbours kept per query in truth.npy")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    base = clustered_unit_vectors(rng, centres, args.n, args.noise)
    queries = clustered_unit_vectors(rng, centres, args.queries, args.noise)

    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "base.npy", base)
    np.save(args.out / "queries.npy", queries)
    np.save(args.out / "truth.npy", exact_top_k(base, queries, min(args.k, args.n)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
