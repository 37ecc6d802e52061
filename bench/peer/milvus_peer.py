"""Measure milvus-lite's insert rate, index build time, QPS and recall@k on a folder of unit vectors.

The peer side of the performance benchmark. It runs in its own virtual environment
(bench/peer/requirements.txt) and imports nothing from the project. pymilvus is imported only inside
the functions that talk to milvus-lite, so the data helpers import and test without it.

The file is not named milvus_lite.py because a script of that name, run as `python bench/peer/<name>`,
shadows the milvus_lite package that pymilvus imports to start the embedded server.
"""

import argparse
import atexit
import dataclasses
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np

# Index kinds this script builds, as milvus-lite's index_type names them. milvus-lite 3.2.2 also builds
# IVF_SQ8 and HNSW_SQ (milvus_lite/index/factory.py), which the benchmark does not compare.
INDEX_TYPES = {"flat": "FLAT", "ivf_flat": "IVF_FLAT", "hnsw": "HNSW"}

_COLLECTION = "peer_bench"
_ID_FIELD = "id"
_VECTOR_FIELD = "vector"
# Vector bytes per insert call: well under the 256 MiB message limit of milvus-lite 3.2.2's gRPC server.
_INSERT_CHUNK_BYTES = 16 * 1024 * 1024
_NORM_TOLERANCE = 1e-3
_WARMUP_QUERIES = 10


class DatasetError(ValueError):
    """A data folder whose files are missing or do not have the expected shapes, types or norms."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Base vectors, query vectors and each query's exact top-k rows of base by inner product."""

    base: np.ndarray
    queries: np.ndarray
    truth: np.ndarray


@dataclasses.dataclass(frozen=True)
class IndexPlan:
    """One index to build and the search parameters to sweep on it."""

    kind: str
    build_params: dict
    search_params: list[dict]


@dataclasses.dataclass(frozen=True)
class TimingOptions:
    """Options of the search measurements: the result count k, the batch size and the sequential query count."""

    k: int
    batch_size: int
    # Queries searched one per call for sequential QPS, from the start of queries.npy. None means all of them.
    sequential_queries: int | None


SearchFunction = Callable[[np.ndarray], list[list[int]]]


def load_dataset(data_dir: pathlib.Path, k: int) -> Dataset:
    """Read base.npy, queries.npy and truth.npy from data_dir, and raise DatasetError if they do not fit together."""
    base = _load_array(data_dir / "base.npy")
    queries = _load_array(data_dir / "queries.npy")
    truth = _load_array(data_dir / "truth.npy")

    check_unit_vectors("base.npy", base)
    check_unit_vectors("queries.npy", queries)
    if queries.shape[1] != base.shape[1]:
        raise DatasetError(f"queries.npy has dim {queries.shape[1]} but base.npy has dim {base.shape[1]}")
    check_truth(truth, queries=queries.shape[0], n=base.shape[0], k=k)
    return Dataset(base=base, queries=queries, truth=truth)


def _load_array(path: pathlib.Path) -> np.ndarray:
    """Load one .npy file without pickles."""
    if not path.is_file():
        raise DatasetError(f"{path} is missing: the data folder needs base.npy, queries.npy and truth.npy")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as error:
        raise DatasetError(f"{path} is not a plain .npy array: {error}") from error


def check_unit_vectors(name: str, vectors: np.ndarray) -> None:
    """Raise DatasetError unless vectors is a non-empty (rows, dim) float32 array of finite L2-normalised rows."""
    if vectors.dtype != np.float32 or vectors.ndim != 2:
        raise DatasetError(
            f"{name} must be a 2-D float32 array (rows, dim), got shape {vectors.shape} dtype {vectors.dtype}"
        )
    if vectors.shape[0] == 0 or vectors.shape[1] == 0:
        raise DatasetError(f"{name} is empty: shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise DatasetError(f"{name} contains NaN or infinite values")

    norms = np.linalg.norm(vectors, axis=1)
    unnormalised = np.flatnonzero(np.abs(norms - 1.0) > _NORM_TOLERANCE)
    if unnormalised.size:
        first = unnormalised[0]
        raise DatasetError(
            f"{name} row {first} has L2 norm {norms[first]:.4f}, and {unnormalised.size} of {len(norms)} rows "
            f"differ from 1 by more than {_NORM_TOLERANCE}. L2-normalise the vectors."
        )


def check_truth(truth: np.ndarray, queries: int, n: int, k: int) -> None:
    """Raise DatasetError unless truth is an int64 (queries, >=k) array of row positions in [0, n)."""
    if truth.dtype != np.int64 or truth.ndim != 2:
        raise DatasetError(
            f"truth.npy must be a 2-D int64 array (queries, k), got shape {truth.shape} dtype {truth.dtype}"
        )
    if truth.shape[0] != queries:
        raise DatasetError(f"truth.npy has {truth.shape[0]} rows but queries.npy has {queries}")
    if truth.shape[1] < k:
        raise DatasetError(f"truth.npy has {truth.shape[1]} neighbours per query, fewer than k={k}")
    if truth.min() < 0 or truth.max() >= n:
        raise DatasetError(f"truth.npy contains row positions outside [0, {n}): min {truth.min()}, max {truth.max()}")


def recall_at_k(found: Sequence[Sequence[int]], truth: np.ndarray, k: int) -> float:
    """Return the mean over queries of |first k found ∩ first k of truth| / k. Missing results count as misses."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if len(found) != truth.shape[0]:
        raise ValueError(f"got results for {len(found)} queries but truth has {truth.shape[0]}")
    if truth.shape[1] < k:
        raise ValueError(f"truth has {truth.shape[1]} neighbours per query, fewer than k={k}")

    hits = [len(set(row[:k]) & set(expected[:k].tolist())) for row, expected in zip(found, truth)]
    return float(np.mean(hits)) / k


def ivf_nlist(n: int) -> int:
    """Return the IVF cell count for n vectors: 4 * sqrt(n), at least 1 and at most n."""
    return max(1, min(n, round(4 * math.sqrt(n))))


def plan_indexes(kinds: Sequence[str], n: int, k: int, options: argparse.Namespace) -> list[IndexPlan]:
    """Return the indexes to build, in the order of kinds, each with its search parameter sweep."""
    plans = []
    for kind in kinds:
        if kind == "flat":
            plans.append(IndexPlan("flat", {}, [{}]))
        elif kind == "ivf_flat":
            # NOTE: milvus-lite 3.2.2 builds one index per segment, each with nlist cells. 100k vectors of dim 512
            # made two segments (65,536 and 34,464 rows), so there IVF_FLAT has twice the cells of one index.
            nlist = ivf_nlist(n)
            nprobes = sorted({min(nprobe, nlist) for nprobe in options.nprobe})
            plans.append(IndexPlan("ivf_flat", {"nlist": nlist}, [{"nprobe": nprobe} for nprobe in nprobes]))
        elif kind == "hnsw":
            # faiss searches HNSW with max(ef, k), so an ef below k would be reported but not used.
            efs = sorted({max(ef, k) for ef in options.ef})
            for m in options.hnsw_m:
                build = {"M": m, "efConstruction": options.ef_construction}
                plans.append(IndexPlan("hnsw", build, [{"ef": ef} for ef in efs]))
        else:
            raise ValueError(f"unknown index kind {kind!r}; expected one of {sorted(INDEX_TYPES)}")
    return plans


def measure_sequential(search: SearchFunction, queries: np.ndarray, warmup: int) -> tuple[float, list[list[int]]]:
    """Search each query in its own call after warmup untimed calls, and return queries per second and the results."""
    for query in queries[:warmup]:
        search(query[np.newaxis])

    found = []
    started = time.perf_counter()
    for query in queries:
        found.extend(search(query[np.newaxis]))
    elapsed = time.perf_counter() - started
    return len(queries) / elapsed, found


def measure_batch(search: SearchFunction, queries: np.ndarray, batch_size: int) -> tuple[float, list[list[int]]]:
    """Search the queries in calls of batch_size, and return queries per second and the results."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    found = []
    started = time.perf_counter()
    for start in range(0, len(queries), batch_size):
        found.extend(search(queries[start:start + batch_size]))
    elapsed = time.perf_counter() - started
    return len(queries) / elapsed, found


def insert_chunk_rows(dim: int) -> int:
    """Return how many float32 vectors of dim fit in one insert call."""
    return max(1, _INSERT_CHUNK_BYTES // (4 * dim))


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _library_versions() -> dict:
    return {name: importlib.metadata.version(name) for name in ("milvus-lite", "pymilvus", "faiss-cpu")}


def _create_collection(client, dim: int) -> None:
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field(_ID_FIELD, DataType.INT64, is_primary=True)
    schema.add_field(_VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dim)
    client.create_collection(_COLLECTION, schema=schema)


def _insert_base(client, base: np.ndarray) -> float:
    """Insert base with ids = row positions, flush, and return the seconds taken."""
    rows_per_call = insert_chunk_rows(base.shape[1])
    started = time.perf_counter()
    for start in range(0, base.shape[0], rows_per_call):
        chunk = base[start:start + rows_per_call]
        client.insert(_COLLECTION, [{_ID_FIELD: start + i, _VECTOR_FIELD: row} for i, row in enumerate(chunk)])
    client.flush(_COLLECTION)
    elapsed = time.perf_counter() - started

    stored = client.get_collection_stats(_COLLECTION)["row_count"]
    if stored != base.shape[0]:
        raise RuntimeError(f"milvus-lite stored {stored} rows after inserting {base.shape[0]}")
    return elapsed


def _build_index(client, plan: IndexPlan, n: int) -> float:
    """Replace the collection's index with plan's, load it, and return the seconds that create_index and load took."""
    client.release_collection(_COLLECTION)
    if client.list_indexes(_COLLECTION):
        client.drop_index(_COLLECTION, _VECTOR_FIELD)

    index_params = client.prepare_index_params()
    # pymilvus 3.0.2 sends the entries of params as top-level key-value pairs, and milvus-lite 3.2.2 ignores
    # those. It reads build parameters only from a JSON "params" pair, which this nesting produces.
    index_params.add_index(
        field_name=_VECTOR_FIELD,
        index_type=INDEX_TYPES[plan.kind],
        metric_type="IP",
        params={"params": plan.build_params},
    )
    # milvus-lite 3.2.2 builds the per-segment indexes in load_collection on a released collection.
    started = time.perf_counter()
    client.create_index(_COLLECTION, index_params)
    client.load_collection(_COLLECTION)
    elapsed = time.perf_counter() - started

    described = client.describe_index(_COLLECTION, _VECTOR_FIELD)
    built = (described["index_type"], described.get("params", {}), described.get("indexed_rows"))
    if built != (INDEX_TYPES[plan.kind], plan.build_params, n):
        raise RuntimeError(f"expected {plan.kind} {plan.build_params} on {n} rows, describe_index returned {described}")
    return elapsed


def _searcher(client, search_params: dict, k: int) -> SearchFunction:
    """Return a function that searches the collection with search_params and returns the ids of each query's hits."""

    def search(queries: np.ndarray) -> list[list[int]]:
        results = client.search(
            _COLLECTION,
            data=list(queries),
            limit=k,
            anns_field=_VECTOR_FIELD,
            search_params={"metric_type": "IP", "params": search_params},
            output_fields=[_ID_FIELD],
        )
        return [[hit["id"] for hit in hits] for hits in results]

    return search


def _measure_plan(client, plan: IndexPlan, dataset: Dataset, timing: TimingOptions) -> list[dict]:
    """Build plan's index and measure every search setting of its sweep."""
    _progress(f"building {plan.kind} {plan.build_params}")
    build_s = _build_index(client, plan, dataset.base.shape[0])
    _progress(f"built {plan.kind} in {build_s:.1f} s")

    settings = []
    for search_params in plan.search_params:
        search = _searcher(client, search_params, timing.k)
        sequential = dataset.queries[:timing.sequential_queries]
        _progress(f"  searching {search_params or 'exhaustively'}: {len(sequential)} queries one per call, "
                  f"{len(dataset.queries)} in calls of {timing.batch_size}")
        sequential_qps, _ = measure_sequential(search, sequential, _WARMUP_QUERIES)
        # Recall comes from the batch calls because they cover every query.
        batch_qps, found = measure_batch(search, dataset.queries, timing.batch_size)
        recall = recall_at_k(found, dataset.truth, timing.k)
        setting = {
            "index": plan.kind,
            "params": {**plan.build_params, **search_params},
            f"recall_at_{timing.k}": recall,
            "sequential_qps": sequential_qps,
            "sequential_queries": len(sequential),
            "batch_qps": batch_qps,
            "build_s": build_s,
        }
        _progress(f"  {setting['params']}: recall@{timing.k} {recall:.3f}, "
                  f"sequential {sequential_qps:.0f} QPS, batch {batch_qps:.0f} QPS")
        settings.append(setting)
    return settings


def run_benchmark(dataset: Dataset, plans: Sequence[IndexPlan], timing: TimingOptions) -> dict:
    """Load dataset into a milvus-lite collection in a temporary folder, measure every plan, and return the results."""
    folder = tempfile.mkdtemp(prefix="milvus-lite-peer-")
    # After an interrupted call, a server thread may go on building an index and write it into the folder
    # after the rmtree below. Interpreter exit joins those threads before atexit handlers, so this one removes
    # the folder last.
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    try:
        insert_s, settings = _measure_in_folder(folder, dataset, plans, timing)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return _result_document(dataset, timing, insert_s, settings)


def _measure_in_folder(
    folder: str, dataset: Dataset, plans: Sequence[IndexPlan], timing: TimingOptions
) -> tuple[float, list[dict]]:
    """Start milvus-lite on a .db in folder, insert the base vectors and measure every plan."""
    from milvus_lite.server_manager import server_manager_instance
    from pymilvus import MilvusClient

    n, dim = dataset.base.shape
    db_path = os.path.join(folder, "peer.db")
    client = MilvusClient(db_path)
    try:
        _create_collection(client, dim)
        _progress(f"inserting {n} vectors of dim {dim}")
        insert_s = _insert_base(client, dataset.base)
        _progress(f"inserted in {insert_s:.1f} s")
        settings = [setting for plan in plans for setting in _measure_plan(client, plan, dataset, timing)]
    finally:
        client.close()
        # pymilvus leaves the embedded server running after close.
        server_manager_instance.release_server(db_path)
    return insert_s, settings


def _result_document(dataset: Dataset, timing: TimingOptions, insert_s: float, settings: list[dict]) -> dict:
    n, dim = dataset.base.shape
    versions = _library_versions()
    return {
        "product": "milvus-lite",
        "version": versions["milvus-lite"],
        "pymilvus_version": versions["pymilvus"],
        "faiss_cpu_version": versions["faiss-cpu"],
        "n": n,
        "d": dim,
        "queries": dataset.queries.shape[0],
        "k": timing.k,
        "batch_size": timing.batch_size,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "insert_s": insert_s,
        "insert_vectors_per_s": n / insert_s,
        "settings": settings,
    }


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=pathlib.Path, required=True,
                        help="folder with base.npy, queries.npy and truth.npy")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="JSON file to write the results to")
    parser.add_argument("--k", type=_positive_int, default=10, help="neighbours per search and recall cut-off")
    parser.add_argument("--index", nargs="+", choices=sorted(INDEX_TYPES), default=["flat", "ivf_flat", "hnsw"],
                        help="index kinds to build, in this order")
    parser.add_argument("--nprobe", nargs="+", type=_positive_int, default=[8, 32, 128],
                        help="IVF_FLAT cells searched per query, one setting each (capped at nlist)")
    parser.add_argument("--ef", nargs="+", type=_positive_int, default=[16, 64, 128],
                        help="HNSW search list sizes, one setting each (raised to k where lower)")
    parser.add_argument("--hnsw-m", nargs="+", type=_positive_int, default=[32],
                        help="HNSW graph degrees M, one index build each (default 32, the index service's "
                        "default IMGSEARCH_INDEX_HNSW_M)")
    parser.add_argument("--ef-construction", type=_positive_int, default=40,
                        help="HNSW build list size (default 40, faiss's default, which the index service keeps)")
    parser.add_argument("--batch-size", type=_positive_int, default=100, help="queries per call for batch QPS")
    parser.add_argument("--sequential-queries", type=_positive_int,
                        help="time one call per query on only the first N queries (default: all queries)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, write its JSON, and return the exit status."""
    args = parse_args(argv)
    try:
        dataset = load_dataset(args.data, args.k)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    plans = plan_indexes(args.index, dataset.base.shape[0], args.k, args)
    timing = TimingOptions(k=args.k, batch_size=args.batch_size, sequential_queries=args.sequential_queries)
    result = run_benchmark(dataset, plans, timing)
    result["duration_s"] = time.perf_counter() - started

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    _progress(f"wrote {args.out} after {result['duration_s']:.0f} s")
    return 0


if __name__ == "__main__":
    # On SIGTERM, SystemExit unwinds run_benchmark, which stops the server and removes its temporary folder.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    raise SystemExit(main())
