"""Search measurements, ours over gRPC beside raw faiss in this process, alternated so that both meet the same noise."""

import time
from collections.abc import Callable

import faiss
import numpy as np

from bench.perf_data import MODEL_ID
from imgsearch.common.v1 import common_pb2
from imgsearch.index.v1 import index_service_pb2
from index_service import vector_index

RPC_TIMEOUT_S = 600.0
_SERVICE_BLAS_THRESHOLD = vector_index._BLAS_THRESHOLD  # noqa: SLF001 - the raw side matches the service


def raw_flat_index(vectors: np.ndarray):
    """Return the index that the service keeps for a flat collection, with ids = positions in vectors."""
    index = faiss.IndexIDMap(faiss.IndexFlatIP(vectors.shape[1]))
    index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    return index


def search_request(vector: np.ndarray, k: int, **params) -> index_service_pb2.SearchRequest:
    return index_service_pb2.SearchRequest(
        embedding=common_pb2.Embedding(values=vector.tolist(), model_id=MODEL_ID),
        k=k,
        search_params=index_service_pb2.SearchParams(**params),
    )


def positions(response: index_service_pb2.SearchResponse) -> list[int]:
    """Return the positions of a response's neighbours in the benchmark's vectors (item v12 is position 12)."""
    return [int(neighbour.item_id[1:]) for neighbour in response.neighbours]


def single_latencies(raw_search: Callable[[np.ndarray], object], stub, queries: np.ndarray, k: int) -> dict:
    """Time one query at a time, raw then ours, query by query; return both lists in ms and our results.

    Raw faiss runs a lone query on one OpenMP thread, as the service does, which is its fastest here.
    """
    requests = [search_request(query, k) for query in queries]
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return _alternated(raw_search, stub, queries, requests)
    finally:
        faiss.omp_set_num_threads(threads)


def _alternated(raw_search: Callable[[np.ndarray], object], stub, queries: np.ndarray, requests: list) -> dict:
    """Time each query raw and ours, swapping which goes first on every other query, so order effects cancel."""
    raw_ms, ours_ms, found = [], [], []
    for number, (query, request) in enumerate(zip(queries, requests)):
        if number % 2:
            ours_s, response = _timed(lambda: stub.Search(request, timeout=RPC_TIMEOUT_S))
            raw_s, _ = _timed(lambda: raw_search(query[np.newaxis, :]))
        else:
            raw_s, _ = _timed(lambda: raw_search(query[np.newaxis, :]))
            ours_s, response = _timed(lambda: stub.Search(request, timeout=RPC_TIMEOUT_S))
        raw_ms.append(raw_s * 1000)
        ours_ms.append(ours_s * 1000)
        found.append(positions(response))
    return {"raw_ms": raw_ms, "ours_ms": ours_ms, "found": found}


def _timed(call: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def ours_sequential(stub, queries: np.ndarray, k: int, **params) -> dict:
    """Time our Search one query at a time with the given search params; return the QPS and the results."""
    requests = [search_request(query, k, **params) for query in queries]
    found = []
    started = time.perf_counter()
    for request in requests:
        found.append(positions(stub.Search(request, timeout=RPC_TIMEOUT_S)))
    return {"qps": len(requests) / (time.perf_counter() - started), "found": found}


def batch_qps(raw_search: Callable[[np.ndarray], object], stub, queries: np.ndarray, k: int, rounds: int) -> dict:
    """Time all queries in one raw faiss call and in one SearchStream, alternately, rounds times; keep the best of each.

    Raw faiss uses the BLAS threshold that the service sets, so that both run the same code.
    """
    faiss.cvar.distance_compute_blas_threshold = _SERVICE_BLAS_THRESHOLD
    requests = [search_request(query, k) for query in queries]
    raw_s, ours_s, found = [], [], []
    for _ in range(rounds):
        started = time.perf_counter()
        raw_search(queries)
        raw_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        responses = list(stub.SearchStream(iter(requests), timeout=RPC_TIMEOUT_S))
        ours_s.append(time.perf_counter() - started)
        found = [positions(r.response) for r in responses]
        failed = [r.error.message for r in responses if r.HasField("error")]
        if failed:
            raise RuntimeError(f"{len(failed)} queries of the SearchStream failed, the first with: {failed[0]}")
    return {"raw_qps": len(queries) / min(raw_s), "ours_qps": len(queries) / min(ours_s), "found": found}


def ours_stream(stub, queries: np.ndarray, k: int, rounds: int, **params) -> dict:
    """Time all queries in one SearchStream with the given search params, rounds times; return the best QPS."""
    requests = [search_request(query, k, **params) for query in queries]
    best_s, found = float("inf"), []
    for _ in range(rounds):
        started = time.perf_counter()
        responses = list(stub.SearchStream(iter(requests), timeout=RPC_TIMEOUT_S))
        best_s = min(best_s, time.perf_counter() - started)
        found = [positions(r.response) for r in responses]
    return {"qps": len(queries) / best_s, "found": found}


def percentile(values: list[float], share: float) -> float:
    return float(np.percentile(np.asarray(values), share))
