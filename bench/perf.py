"""The performance benchmark: our services measured side by side with raw faiss and with milvus-lite, in one run.

    python -m bench.perf --out bench/results [--quick] [--peer-python .venv-milvus/bin/python]

Every figure is a ratio of two things measured in the same run, because these machines are noisy,
unless its unit is another one. See the README's Performance section.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import faiss
import grpc
import numpy as np
import structlog

from bench import perf_data, perf_ingest, perf_search
from bench.perf_figures import Figure, at_least, at_most, reported, table, update_readme, write_plot, write_summary
from bench.perf_services import ChildService
from imgsearch.index.v1 import index_service_pb2, index_service_pb2_grpc
from imgsearch_common.logs import configure_logging

log = structlog.get_logger(__name__)

_K = 10
_DIM = 512
_START_TIMEOUT_S = 900.0
_NPROBES = (4, 8, 16, 32, 64)
_EF_SEARCHES = (16, 32, 64, 128)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The sizes of one run: the collection sizes, query counts and images."""

    mode: str
    small: int
    large: int
    queries: int
    latency_queries: int
    large_latency_queries: int
    images: int
    ivf_min_items: int
    peer_timeout_s: float


FULL = Sizes("full", 100_000, 1_000_000, 1000, 200, 60, 512, 100_000, 600.0)
QUICK = Sizes("quick", 5_000, 20_000, 200, 40, 20, 48, 5_000, 300.0)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    configure_logging("info")
    sizes = QUICK if args.quick else FULL
    if args.faiss_threads:
        faiss.omp_set_num_threads(args.faiss_threads)
    started = time.perf_counter()
    work = pathlib.Path(tempfile.mkdtemp(prefix="imgsearch-perf-", dir=args.work_dir))
    try:
        figures, context = Benchmark(sizes, work, args).run()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    context["seconds"] = round(time.perf_counter() - started, 1)
    _write(figures, context, args)


class Benchmark:
    """The benchmark's phases over one work folder; run() returns the figures and the context."""

    def __init__(self, sizes: Sizes, work: pathlib.Path, args: argparse.Namespace):
        self.sizes = sizes
        self.work = work
        self.args = args
        self.figures: list[Figure] = []
        self.details: dict = {}

    def run(self) -> tuple[list[Figure], dict]:
        self._small_collection()
        self._large_collection()
        self._images()
        context = {
            "mode": self.sizes.mode,
            "machine": f"{platform.machine()}, {_cpu_count()} CPUs",
            "dim": _DIM,
            "k": _K,
            "query_count": self.sizes.queries,
            "sizes": dataclasses.asdict(self.sizes),
            "gpu": _gpu_note(),
            "details": self.details,
        }
        return self.figures, context

    # The small collection: overhead, batches, ingest of vectors, IVF and SQ8, and the peer

    def _small_collection(self) -> None:
        n = self.sizes.small
        vectors = perf_data.clustered(n, _DIM, seed=1)
        queries = perf_data.queries_like(self.sizes.queries, n, _DIM, seed=1)
        truth = perf_data.exact_neighbours(vectors, queries, _K)
        data_dir = self.work / "small"
        raw = perf_search.raw_flat_index(vectors)
        with self._index_service(data_dir, kind="flat") as service:
            rate = perf_ingest.vectors_through_service(service.addr, vectors)
            self.figures.append(reported("ingest of precomputed vectors, durable", rate, "vectors/s",
                                         f"{n:,} vectors of d={_DIM}, one fsync per stored batch"))
            stub = _stub(service.addr)
            self._overhead(f"{_size(n)}", raw, stub, queries[: self.sizes.latency_queries])
            batch = perf_search.batch_qps(lambda xq: raw.search(xq, _K), stub, queries, _K, rounds=3)
            self.figures.append(at_least(f"SearchStream QPS / raw faiss batch QPS at {_size(n)}",
                                         batch["ours_qps"] / batch["raw_qps"], 0.9,
                                         note=f"{len(queries)} queries in one stream and in one faiss call"))
            flat_sequential = perf_search.ours_sequential(stub, queries, _K)
            self.details["small"] = {"batch": _without_found(batch),
                                     "flat_sequential_qps": flat_sequential["qps"],
                                     "flat_recall": perf_data.recall_at(batch["found"], truth)}
        ours_ivf = self._approximate_small(data_dir, queries, truth)
        self._peer(vectors, queries, truth, flat_sequential, ours_ivf)

    def _overhead(self, size: str, raw, stub, queries: np.ndarray) -> dict:
        latencies = perf_search.single_latencies(lambda xq: raw.search(xq, _K), stub, queries, _K)
        raw_p50, ours_p50 = (perf_search.percentile(latencies[key], 50) for key in ("raw_ms", "ours_ms"))
        raw_p99, ours_p99 = (perf_search.percentile(latencies[key], 99) for key in ("raw_ms", "ours_ms"))
        self.figures.append(at_most(f"Search p50 over gRPC - (1.1 x raw faiss p50 + 1 ms) at {size}",
                                    ours_p50 - (1.1 * raw_p50 + 1.0), 0.0, "ms",
                                    f"ours {ours_p50:.2f} ms, raw {raw_p50:.2f} ms"))
        self.figures.append(reported(f"Search p99 over gRPC / raw faiss p99 at {size}", ours_p99 / raw_p99, "x",
                                     f"ours {ours_p99:.2f} ms, raw {raw_p99:.2f} ms"))
        summary = {"raw_p50_ms": raw_p50, "ours_p50_ms": ours_p50, "raw_p99_ms": raw_p99, "ours_p99_ms": ours_p99}
        self.details[f"overhead_{size}"] = summary
        return summary

    def _approximate_small(self, data_dir: pathlib.Path, queries: np.ndarray, truth: np.ndarray) -> list[dict]:
        """Restart the small collection as IVF, then as IVF with sq8; return the IVF sweep."""
        with self._index_service(data_dir, kind="auto") as service:
            sweep = self._nprobe_sweep(_stub(service.addr), queries, truth)
            stats = _stats(service.addr)
            chosen = _best_at_recall(sweep, 0.95)
            stream = perf_search.ours_stream(_stub(service.addr), queries, _K, rounds=2, nprobe=chosen["nprobe"])
            self.details["small_ivf_stream"] = {"nprobe": chosen["nprobe"], "qps": stream["qps"],
                                                "recall_at_10": perf_data.recall_at(stream["found"], truth)}
        with self._index_service(data_dir, kind="auto", encoding="sq8") as service:
            sq8 = self._nprobe_sweep(_stub(service.addr), queries, truth)
            sq8_stats = _stats(service.addr)
        with self._index_service(data_dir, kind="hnsw") as service:
            hnsw = self._effort_sweep(_stub(service.addr), queries, truth, "ef_search", _EF_SEARCHES)
            hnsw_stats = _stats(service.addr)
        best_hnsw = _best_at_recall(hnsw, 0.95)
        flat_qps = self.details["small"]["flat_sequential_qps"]
        self.figures.append(reported(f"HNSW Search QPS / flat Search QPS at {_size(self.sizes.small)}",
                                     best_hnsw["qps"] / flat_qps, "x",
                                     f"{hnsw_stats.index_type}, ef_search {best_hnsw['ef_search']}, recall@10 "
                                     f"{best_hnsw['recall_at_10']:.3f}; both over gRPC, one query per call"))
        self.details["small_hnsw"] = {"index_type": hnsw_stats.index_type, "sweep": hnsw}
        self.figures.append(reported(f"index memory, IVF with sq8 / IVF with float32 at {_size(self.sizes.small)}",
                                     sq8_stats.index_memory_bytes / stats.index_memory_bytes, "x",
                                     f"GetStats estimates; sq8 recall@10 {_best_recall(sq8):.3f}"))
        self.details["small_ivf"] = {"index_type": stats.index_type, "sweep": sweep,
                                     "sq8_index_type": sq8_stats.index_type, "sq8_sweep": sq8}
        return sweep

    def _nprobe_sweep(self, stub, queries: np.ndarray, truth: np.ndarray) -> list[dict]:
        return self._effort_sweep(stub, queries, truth, "nprobe", _NPROBES)

    def _effort_sweep(self, stub, queries: np.ndarray, truth: np.ndarray, name: str, values) -> list[dict]:
        """Return QPS and recall@10 of sequential searches for each value of the search param name."""
        sweep = []
        for value in values:
            result = perf_search.ours_sequential(stub, queries[: self.sizes.latency_queries], _K, **{name: value})
            recall = perf_data.recall_at(result["found"], truth[: self.sizes.latency_queries])
            sweep.append({name: value, "qps": result["qps"], "recall_at_10": recall})
        return sweep

    def _peer(self, vectors, queries, truth, flat_sequential: dict, ours_ivf: list[dict]) -> None:
        if not self.args.peer_python:
            self.details["peer"] = {"skipped": "no --peer-python given"}
            return
        data = self.work / "peer-data"
        data.mkdir()
        np.save(data / "base.npy", vectors)
        np.save(data / "queries.npy", queries)
        np.save(data / "truth.npy", truth.astype(np.int64))
        out = self.work / "peer.json"
        command = [self.args.peer_python, "bench/peer/milvus_peer.py", "--data", str(data), "--out", str(out),
                   "--k", str(_K), "--sequential-queries", str(self.sizes.latency_queries)]
        subprocess.run(command, check=True, timeout=self.sizes.peer_timeout_s)
        peer = json.loads(out.read_text())
        self.details["peer"] = peer
        self._peer_figures(peer, flat_sequential, ours_ivf)

    def _peer_figures(self, peer: dict, flat_sequential: dict, ours_ivf: list[dict]) -> None:
        size = _size(self.sizes.small)
        settings = peer["settings"]
        flat = [s for s in settings if s["index"].lower() == "flat"]
        if flat:
            self.figures.append(at_least(f"our Search QPS / milvus-lite QPS, exact, at {size}",
                                         flat_sequential["qps"] / flat[0]["sequential_qps"], 2.0,
                                         note=f"one query per call, recall {flat[0]['recall_at_10']:.3f} both"))
        approximate = [s for s in settings if s["index"].lower() != "flat"]
        if approximate and ours_ivf:
            ours = _best_at_recall(ours_ivf, 0.95)
            theirs = [s for s in approximate if s["recall_at_10"] <= ours["recall_at_10"] + 1e-9] or approximate
            best = max(theirs, key=lambda s: s["sequential_qps"])
            self.figures.append(at_least(
                f"our IVF Search QPS / milvus-lite's best QPS at no better recall, at {size}",
                ours["qps"] / best["sequential_qps"], 2.0,
                note=f"ours nprobe {ours['nprobe']}, recall {ours['recall_at_10']:.3f}; milvus-lite {best['index']} "
                     f"{best['params']}, recall {best['recall_at_10']:.3f}"))
        stream = self.details.get("small_ivf_stream")
        if stream:
            theirs = [s for s in settings if s["recall_at_10"] <= stream["recall_at_10"] + 1e-9] or settings
            best_batch = max(theirs, key=lambda s: s["batch_qps"])
            self.figures.append(at_least(
                f"our IVF SearchStream QPS / milvus-lite's best batch QPS at no better recall, at {size}",
                stream["qps"] / best_batch["batch_qps"], 2.0,
                note=f"ours nprobe {stream['nprobe']}, recall {stream['recall_at_10']:.3f}, all queries in one stream; "
                     f"milvus-lite {best_batch['index']} {best_batch['params']} in calls of {peer['batch_size']}, "
                     f"recall {best_batch['recall_at_10']:.3f}"))

    # The large collection: overhead at size, memory, start time, IVF against flat

    def _large_collection(self) -> None:
        n = self.sizes.large
        vectors = perf_data.clustered(n, _DIM, seed=2)
        queries = perf_data.queries_like(self.sizes.queries, n, _DIM, seed=2)
        truth = perf_data.exact_neighbours(vectors, queries, _K)
        data_dir = self.work / "large"
        started = time.perf_counter()
        perf_data.fill_store(data_dir, vectors)
        self.details["large_fill_store_s"] = round(time.perf_counter() - started, 1)

        empty_rss = self._empty_rss()
        with self._index_service(data_dir, kind="flat"):
            pass  # The first start builds the index from the store; stopping writes the snapshot.
        os.sync()  # The snapshot's pages go to disk now rather than during the timed start.
        with self._index_service(data_dir, kind="flat") as service:
            start_s = service.started_in_s
            self.details["large_restore_log"] = _last_log_line(service.log_path, "snapshot_loaded")
            rss = service.rss_bytes
            # Built only now, so that the timed start met no more memory pressure than a restart would.
            raw = perf_search.raw_flat_index(vectors)
            overhead = self._overhead(_size(n), raw, _stub(service.addr), queries[: self.sizes.large_latency_queries])
            batch = perf_search.batch_qps(lambda xq: raw.search(xq, _K), _stub(service.addr), queries, _K, rounds=3)

        self.figures.append(at_least(f"SearchStream QPS / raw faiss batch QPS at {_size(n)}",
                                     batch["ours_qps"] / batch["raw_qps"], 0.9,
                                     note=f"{len(queries)} queries in one stream and in one faiss call"))
        raw_bytes = n * _DIM * 4
        self.figures.append(at_most(f"memory per vector / raw float32 bytes, flat, at {_size(n)}",
                                    (rss - empty_rss) / raw_bytes, 1.1, "x",
                                    f"index service RSS {rss / 2**20:.0f} MiB, empty service {empty_rss / 2**20:.0f} MiB"))
        self.figures.append(at_most(f"time to serve {_size(n)} vectors after a restart, flat", start_s, 3.0, "s",
                                    "process start to health SERVING, snapshot in the page cache"))
        raw = vectors = None  # 4 GB that the IVF phase does not need
        self._large_ivf(data_dir, queries, truth, overhead)

    def _large_ivf(self, data_dir: pathlib.Path, queries: np.ndarray, truth: np.ndarray, overhead: dict) -> None:
        env = {"ivf_min_items": str(self.sizes.ivf_min_items)}
        with self._index_service(data_dir, kind="auto", **env):
            pass  # The first start trains the IVF index; stopping writes it to the snapshot.
        os.sync()
        with self._index_service(data_dir, kind="auto", **env) as service:
            start_s = service.started_in_s
            sweep = self._nprobe_sweep(_stub(service.addr), queries, truth)
            stats = _stats(service.addr)
        raw_flat_qps = 1000.0 / overhead["raw_p50_ms"]
        chosen = _best_at_recall(sweep, 0.95)
        size = _size(self.sizes.large)
        self.figures.append(at_least(f"recall@10 of IVF at {size}", chosen["recall_at_10"], 0.95, "",
                                     f"{stats.index_type}, nprobe {chosen['nprobe']}"))
        self.figures.append(at_least(f"IVF Search QPS over gRPC / raw flat faiss QPS at {size}",
                                     chosen["qps"] / raw_flat_qps, 10.0,
                                     note=f"at that recall; raw flat {raw_flat_qps:.1f} QPS, one query per call"))
        self.figures.append(reported(f"time to serve {size} vectors after a restart, IVF", start_s, "s"))
        self.details["large_ivf"] = {"index_type": stats.index_type, "sweep": sweep, "start_s": start_s}

    def _empty_rss(self) -> int:
        with self._index_service(self.work / "empty", kind="flat") as service:
            time.sleep(0.5)
            return service.rss_bytes

    # Images through both services, against the embedder alone

    def _images(self) -> None:
        images = perf_ingest.image_set(self.args.dataset, self.sizes.images, seed=3)
        alone = perf_ingest.embedder_alone(self.args.model_dir, images)
        fingerprinted = perf_ingest.embedder_with_fingerprints(self.args.model_dir, images)
        embed_env = {"IMGSEARCH_EMBED_BACKEND": "onnx", "IMGSEARCH_EMBED_MODEL_DIR": str(self.args.model_dir)}
        with ChildService("embed", embed_env, self.work / "embed.log") as embed:
            embed.start(_START_TIMEOUT_S)
            with self._index_service(self.work / "images", kind="flat", embed_addr=embed.addr) as index:
                rate = perf_ingest.through_services(index.addr, images)
        self.figures.append(at_least("ingest images/s through both services / embedder alone", rate / alone, 0.9,
                                     note=f"{len(images)} JPEGs, tiny random CLIP; {rate:.0f} vs {alone:.0f} images/s"))
        self.figures.append(reported(
            "ingest images/s through both services / decode, fingerprint and embed in-process", rate / fingerprinted,
            "x", f"the services' own cost beyond the embed service's work; {fingerprinted:.0f} images/s in-process"))
        self.details["images"] = {"through_services_per_s": rate, "embedder_alone_per_s": alone,
                                  "decode_fingerprint_embed_per_s": fingerprinted}

    def _index_service(self, data_dir: pathlib.Path, kind: str, embed_addr: str = "127.0.0.1:9", **settings):
        env = {"IMGSEARCH_INDEX_DATA_DIR": str(data_dir), "IMGSEARCH_INDEX_EMBED_ADDR": embed_addr,
               "IMGSEARCH_INDEX_KIND": kind, "IMGSEARCH_INDEX_IVF_MIN_ITEMS": str(self.sizes.ivf_min_items),
               "IMGSEARCH_INDEX_EMBED_TIMEOUT_S": "600", "IMGSEARCH_INDEX_MAX_MESSAGE_BYTES": str(64 * 2**20),
               **{f"IMGSEARCH_INDEX_{name.upper()}": value for name, value in settings.items()}}
        return _StartedService(ChildService("index", env, self.work / "index.log"))


class _StartedService:
    """A context manager that starts a ChildService, records its start time, and stops it."""

    def __init__(self, service: ChildService):
        self.service = service
        self.started_in_s = 0.0

    def __enter__(self) -> ChildService:
        self.started_in_s = self.service.start(_START_TIMEOUT_S)
        self.service.started_in_s = self.started_in_s
        return self.service

    def __exit__(self, *exc_info) -> None:
        status = self.service.stop()
        if status != 0 and exc_info[0] is None:
            raise RuntimeError(f"the index service exited with status {status}, see {self.service.log_path}")


def _last_log_line(path: pathlib.Path, event: str) -> dict:
    """Return the last JSON log line of path whose event is event, or an empty dict."""
    found = {}
    for line in path.read_text(errors="replace").splitlines():
        if f'"{event}"' in line:
            try:
                found = json.loads(line)
            except json.JSONDecodeError:
                continue
    return found


def _stub(addr: str) -> index_service_pb2_grpc.IndexServiceStub:
    options = [("grpc.max_receive_message_length", 64 * 2**20), ("grpc.max_send_message_length", 64 * 2**20)]
    return index_service_pb2_grpc.IndexServiceStub(grpc.insecure_channel(addr, options=options))


def _stats(addr: str) -> index_service_pb2.GetStatsResponse:
    return _stub(addr).GetStats(index_service_pb2.GetStatsRequest(), timeout=30)


def _best_at_recall(sweep: list[dict], recall: float) -> dict:
    """Return the fastest setting of a sweep with at least recall, or the one with the best recall when none has it."""
    good = [s for s in sweep if s["recall_at_10"] >= recall]
    return max(good, key=lambda s: s["qps"]) if good else max(sweep, key=lambda s: s["recall_at_10"])


def _best_recall(sweep: list[dict]) -> float:
    return max(s["recall_at_10"] for s in sweep)


def _without_found(result: dict) -> dict:
    return {key: value for key, value in result.items() if key != "found"}


def _size(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else f"{n // 1000}k"


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def _gpu_note() -> dict:
    gpus = faiss.get_num_gpus()
    if gpus == 0:
        return {"available": False, "summary": "none on this machine, so no GPU figures were measured "
                "(bench/gpu_check.sh runs them where faiss sees a GPU)."}
    return {"available": True, "count": gpus, "summary": f"{gpus} visible to faiss; see bench/gpu_check.sh."}


def _write(figures: list[Figure], context: dict, args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = "perf-quick" if args.quick else "perf"
    name = "summary-quick.json" if args.quick else "summary.json"
    write_summary(figures, context, args.out / name)
    text = table(figures, context)
    (args.out / f"{prefix}.md").write_text(text)
    write_plot(figures, args.out / f"{prefix}.png")
    if args.readme and not args.quick:
        update_readme(args.readme, text + f"\n![performance ratios](bench/results/{prefix}.png)\n")
    sys.stdout.write(text)
    missed = [figure.name for figure in figures if figure.met is False]
    log.info("perf_benchmark_finished", seconds=context["seconds"], figures=len(figures), missed=missed)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, required=True, help="folder of the results")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test of every phase")
    parser.add_argument("--model-dir", type=pathlib.Path, default=pathlib.Path("models/tiny-clip-random"))
    parser.add_argument("--dataset", type=lambda value: pathlib.Path(value) if value else None,
                        help="folder of JPEGs for the image ingest; without it the images are generated")
    parser.add_argument("--peer-python", help="Python of the milvus-lite environment; without it no peer is run")
    parser.add_argument("--readme", type=pathlib.Path, help="README whose bench-perf section gets the table")
    parser.add_argument("--work-dir", help="folder for the temporary data (default: the system's temp folder)")
    parser.add_argument("--faiss-threads", type=int, default=0, help="OpenMP threads of the raw faiss side")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
