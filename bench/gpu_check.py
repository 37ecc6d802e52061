"""The GPU part of the performance benchmark: faiss-gpu flat and IVF against the CPU, and our service on the GPU.

    python -m bench.gpu_check --out bench/results/gpu.json [--count 1000000]

It exits with status 3, writing nothing, where faiss finds no GPU. bench/gpu_check.sh runs it under a
time limit.
"""

import argparse
import json
import pathlib
import shutil
import sys
import tempfile
import time

import faiss
import numpy as np

from bench import perf_data, perf_search
from bench.perf import _stub
from bench.perf_services import ChildService

_DIM = 512
_K = 10
# faiss GPU indexes take k up to 2048 (GPU_MAX_SELECTION_K in faiss/gpu/utils/DeviceDefs.cuh).
_GPU_MAX_K = 2048
_SCORE_TOLERANCE = 1e-3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args(argv)
    if faiss.get_num_gpus() == 0:
        sys.stderr.write("faiss sees no GPU here, so there is nothing to measure\n")
        return 3
    vectors = perf_data.clustered(args.count, _DIM, seed=4)
    queries = perf_data.queries_like(args.queries, args.count, _DIM, seed=4)
    result = {"count": args.count, "queries": args.queries, "gpus": faiss.get_num_gpus()}
    result["flat"] = _flat_against_cpu(vectors, queries)
    result["ivf"] = _ivf_against_cpu(vectors, queries)
    result["service"] = _service_against_raw_gpu(vectors, queries)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


def _flat_against_cpu(vectors: np.ndarray, queries: np.ndarray) -> dict:
    """Compare GpuIndexFlatIP with the CPU's IndexFlatIP at k = 10 and k = 2048, and time both."""
    resources = faiss.StandardGpuResources()
    cpu = faiss.IndexFlatIP(_DIM)
    cpu.add(vectors)
    gpu = faiss.index_cpu_to_gpu(resources, 0, cpu)
    timings, agreement = {}, {}
    for k in (_K, _GPU_MAX_K):
        started = time.perf_counter()
        cpu_scores, cpu_ids = cpu.search(queries, k)
        cpu_s = time.perf_counter() - started
        started = time.perf_counter()
        gpu_scores, gpu_ids = gpu.search(queries, k)
        gpu_s = time.perf_counter() - started
        timings[f"k{k}"] = {"cpu_qps": len(queries) / cpu_s, "gpu_qps": len(queries) / gpu_s}
        agreement[f"k{k}"] = {
            "same_ids_share": float(np.mean(cpu_ids == gpu_ids)),
            "max_score_difference": float(np.abs(cpu_scores - gpu_scores).max()),
            "scores_within_tolerance": bool(np.abs(cpu_scores - gpu_scores).max() <= _SCORE_TOLERANCE),
        }
    return {"timings": timings, "agreement": agreement}


def _ivf_against_cpu(vectors: np.ndarray, queries: np.ndarray) -> dict:
    """Train the service's IVF layout on the CPU, copy it to the GPU, and compare recall and QPS at nprobe 32."""
    from index_service.index_layout import IndexSpec, new_index

    layout = IndexSpec(kind="ivf").layout_for(len(vectors))
    sample = vectors[np.random.default_rng(0).choice(len(vectors), layout.trained_items, replace=False)]
    cpu = new_index(layout, _DIM, sample)
    cpu.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    cpu.nprobe = 32
    gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
    gpu.nprobe = 32
    truth = perf_data.exact_neighbours(vectors, queries, _K)
    result = {"index_type": layout.description}
    for name, index in (("cpu", cpu), ("gpu", gpu)):
        started = time.perf_counter()
        _, ids = index.search(queries, _K)
        result[f"{name}_qps"] = len(queries) / (time.perf_counter() - started)
        result[f"{name}_recall_at_10"] = perf_data.recall_at(ids.tolist(), truth)
    return result


def _service_against_raw_gpu(vectors: np.ndarray, queries: np.ndarray) -> dict:
    """Run our index service on the GPU over the same vectors; compare a SearchStream with a raw GPU batch."""
    work = pathlib.Path(tempfile.mkdtemp(prefix="imgsearch-gpu-"))
    try:
        perf_data.fill_store(work / "data", vectors)
        env = {"IMGSEARCH_INDEX_DATA_DIR": str(work / "data"), "IMGSEARCH_INDEX_EMBED_ADDR": "127.0.0.1:9",
               "IMGSEARCH_INDEX_DEVICE": "gpu", "IMGSEARCH_INDEX_KIND": "flat"}
        with ChildService("index", env, work / "index.log") as service:
            start_s = service.start(600)
            resources = faiss.StandardGpuResources()
            raw = faiss.index_cpu_to_gpu(resources, 0, perf_search.raw_flat_index(vectors))
            batch = perf_search.batch_qps(lambda xq: raw.search(xq, _K), _stub(service.addr), queries, _K, rounds=3)
            truth = perf_data.exact_neighbours(vectors, queries, _K)
            return {"start_s": start_s, "ours_qps": batch["ours_qps"], "raw_gpu_qps": batch["raw_qps"],
                    "ratio": batch["ours_qps"] / batch["raw_qps"], "recall_at_10": perf_data.recall_at(batch["found"], truth)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
