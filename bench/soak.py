"""The soak run: both services as child processes under concurrent search, ingest and remove load, then checks.

Run with `make soak`. Searchers query by image, item_id and embedding. Ingesters stream fresh,
distinct images with metadata, and a remover removes acknowledged items. The run then checks that:
- no call failed unexpectedly;
- no search returned an item whose removal was acknowledged before the search started;
- image queries of stored items found them first, with their metadata intact;
- GetStats counts the acknowledged adds less the acknowledged removals;
- each service's RSS grew less than a bound after a warm-up;
- both services stayed SERVING, and exited with 0 on SIGTERM.
bench/soak_load.py has the clients, and bench/soak_services.py the child processes.
"""

import argparse
import collections
import dataclasses
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

from bench.soak_load import Ledger, Load, Recorder, Removal, SearchRecord, SoakSettings, preload, run_clients
from bench.soak_services import SERVICES, Sampler, ServiceProcesses, cpu_seconds
from imgsearch_client.arguments import positive_float
from imgsearch_client.client import ClientError, IndexClient, check_health

# Reports list at most this many examples of each kind of failure, but their counts cover all of them.
_MAX_EXAMPLES = 20


def percentiles_ms(latencies_s: list[float]) -> dict[str, float]:
    """Return the count and the p50, p99 and maximum of latencies_s, in milliseconds."""
    values = np.asarray(latencies_s) * 1000.0
    return {
        "count": len(values),
        "p50_ms": round(float(np.percentile(values, 50)), 2),
        "p99_ms": round(float(np.percentile(values, 99)), 2),
        "max_ms": round(float(values.max()), 2),
    }


def rss_growth_mib(t_s: list[float], rss_mib: list[float | None], warmup_s: float) -> float | None:
    """Return how far RSS rose above its first sample at or after warmup_s.

    Samples of None, taken after the process exited, are left out. Returns None when no sample is that late.
    """
    after = [rss for t, rss in zip(t_s, rss_mib, strict=True) if t >= warmup_s and rss is not None]
    if not after:
        return None
    return round(max(after) - after[0], 1)


@dataclasses.dataclass
class SearchFindings:
    """Findings of the finished searches about removals.

    removed_returned lists the items that a search returned although it started after their removal
    was acknowledged. unexpected_errors lists the failed searches that no removal explains, and
    removed_queries counts the searches whose query named an item removed before they started.
    """

    removed_returned: list[dict] = dataclasses.field(default_factory=list)
    unexpected_errors: list[dict] = dataclasses.field(default_factory=list)
    removed_queries: int = 0


def check_searches(searches: list[SearchRecord], ledger: Ledger) -> SearchFindings:
    """Check every search against the removals in ledger.

    A search that started after an item's removal was acknowledged must not return the item, and
    an item_id query for it must fail with NOT_FOUND. NOT_FOUND is expected only for an item whose
    removal was sent before the search finished.
    """
    findings = SearchFindings()
    for search in searches:
        query_removal = ledger.removal(search.query_item_id) if search.query_item_id else None
        if _removed_before(query_removal, search.started_at):
            findings.removed_queries += 1
        if search.error_code:
            expected = (search.kind == "item_id" and search.error_code == "NOT_FOUND"
                        and query_removal is not None and query_removal.sent_at < search.finished_at)
            if not expected:
                findings.unexpected_errors.append(
                    {"rpc": f"Search ({search.kind})", "code": search.error_code, "message": search.error_message}
                )
            continue
        if search.kind == "item_id" and _removed_before(query_removal, search.started_at):
            findings.removed_returned.append({"item_id": search.query_item_id, "query": "item_id", "found_as": "query"})
        for item_id in search.result_item_ids:
            if _removed_before(ledger.removal(item_id), search.started_at):
                findings.removed_returned.append({"item_id": item_id, "query": search.kind, "found_as": "neighbour"})
    return findings


def _removed_before(removal: Removal | None, moment: float) -> bool:
    return removal is not None and removal.acknowledged_at is not None and removal.acknowledged_at < moment


def stored_images_missed(searches: list[SearchRecord], ledger: Ledger) -> list[dict]:
    """Return the image searches for a stored item that did not return that item first.

    An item whose removal was sent before the search finished may be gone, so it is skipped.
    """
    missed = []
    for search in searches:
        if search.kind != "image" or search.error_code:
            continue
        removal = ledger.removal(search.query_item_id)
        if removal is not None and removal.sent_at < search.finished_at:
            continue
        if not search.result_item_ids or search.result_item_ids[0] != search.query_item_id:
            missed.append({"item_id": search.query_item_id, "first": search.result_item_ids[:1]})
    return missed


def _error_table(recorder: Recorder, search_errors: list[dict]) -> list[dict]:
    counts = collections.Counter(recorder.errors)
    examples = dict(recorder.error_examples)
    for error in search_errors:
        counts[(error["rpc"], error["code"])] += 1
        examples.setdefault((error["rpc"], error["code"]), error["message"])
    return [{"rpc": rpc, "code": code, "count": count, "example": examples[(rpc, code)]}
            for (rpc, code), count in sorted(counts.items())]


def _throughput(recorder: Recorder, settings: SoakSettings, load_s: float) -> dict:
    work = recorder.work
    return {
        "searcher": {"clients": settings.searchers, "searches": work["searches"],
                     "searches_per_s": round(work["searches"] / load_s, 1)},
        "ingester": {"clients": settings.ingesters, "streams": work["ingest_streams"],
                     "images_added": work["images_added"], "images_per_s": round(work["images_added"] / load_s, 1)},
        "remover": {"clients": settings.removers, "calls": work["remove_calls"], "items_removed": work["items_removed"],
                    "items_per_s": round(work["items_removed"] / load_s, 1)},
    }


def _latency_table(recorder: Recorder) -> dict:
    latencies = dict(recorder.latencies_s)
    searches = [value for rpc, values in latencies.items() if rpc.startswith("Search (") for value in values]
    if searches:
        latencies["Search"] = searches
    return {rpc: percentiles_ms(values) for rpc, values in sorted(latencies.items()) if values}


def _memory_section(sampler: Sampler, settings: SoakSettings) -> dict:
    """Summarise each service's RSS series, beside the rise of the item count that explains part of the growth."""
    counts = [count for t, count in zip(sampler.series["t_s"], sampler.series["item_count"], strict=True)
              if t >= settings.effective_warmup_s and count is not None]
    section = {
        "warmup_s": settings.effective_warmup_s,
        "max_growth_mib": settings.max_rss_growth_mib,
        "item_count_rise_after_warmup": counts[-1] - counts[0] if counts else None,
        "services": {},
    }
    for service in SERVICES:
        series = sampler.series[f"{service}_rss_mib"]
        known = [rss for rss in series if rss is not None]
        section["services"][service] = {
            "first_mib": known[0] if known else None,
            "max_mib": max(known) if known else None,
            "last_mib": known[-1] if known else None,
            "growth_after_warmup_mib": rss_growth_mib(sampler.series["t_s"], series, settings.effective_warmup_s),
        }
    section["series"] = sampler.series
    return section


@dataclasses.dataclass
class _Ending:
    """Figures that the run takes after the load stopped."""

    final_count: int | None = None
    health: dict[str, str] = dataclasses.field(default_factory=dict)
    exit_codes: dict[str, int | None] = dataclasses.field(default_factory=dict)
    # CPU seconds that each service and the load generator used while the clients ran.
    cpu_s: dict[str, float] = dataclasses.field(default_factory=dict)


def evaluate_checks(report: dict) -> dict[str, bool]:
    """Return whether each check passed, by name, from the report's figures."""
    items = report["items"]
    growths = [s["growth_after_warmup_mib"] for s in report["memory"]["services"].values()]
    return {
        "no_unexpected_errors": not report["errors"],
        "removed_items_never_returned": not report["removed_items_returned"]["count"],
        "stored_images_found_first": not report["stored_images_missed"]["count"],
        "metadata_intact": not report["metadata_mismatches"]["count"],
        "count_matches": items["final_count"] == items["expected_count"],
        "rss_bounded": all(g is not None and g < report["memory"]["max_growth_mib"] for g in growths),
        "serving_throughout": not report["not_serving"],
        "serving_at_end": all(status == "SERVING" for status in report["health_at_end"].values()),
        "clean_exit": all(code == 0 for code in report["exit_codes"].values()),
    }


def build_report(settings: SoakSettings, load_s: float, ledger: Ledger, recorder: Recorder, sampler: Sampler,
                 ending: _Ending) -> dict:
    """Assemble the report document: settings, throughput, latencies, checks and the RSS series."""
    findings = check_searches(recorder.searches, ledger)
    missed = stored_images_missed(recorder.searches, ledger)
    added, removed = ledger.counts()
    report = {
        "settings": {**dataclasses.asdict(settings), "model_dir": str(settings.model_dir),
                     "warmup_s": settings.effective_warmup_s},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "load_s": round(load_s, 2),
        "throughput": _throughput(recorder, settings, load_s),
        "latency": _latency_table(recorder),
        "items": {"acknowledged_adds": added, "acknowledged_removals": removed,
                  "expected_count": added - removed, "final_count": ending.final_count},
        "errors": _error_table(recorder, findings.unexpected_errors),
        "removed_items_returned": {"count": len(findings.removed_returned),
                                   "examples": findings.removed_returned[:_MAX_EXAMPLES],
                                   "queries_of_removed_items": findings.removed_queries},
        "stored_images_missed": {"count": len(missed), "examples": missed[:_MAX_EXAMPLES]},
        "metadata_mismatches": {"count": len(recorder.metadata_mismatches),
                                "examples": recorder.metadata_mismatches[:_MAX_EXAMPLES]},
        "cpu_s": ending.cpu_s,
        "memory": _memory_section(sampler, settings),
        "not_serving": sampler.not_serving,
        "health_at_end": ending.health,
        "exit_codes": ending.exit_codes,
    }
    report["checks"] = evaluate_checks(report)
    report["passed"] = all(report["checks"].values())
    return report


def _finish(services: ServiceProcesses, settings: SoakSettings, recorder: Recorder,
            cpu_before: dict[str, float]) -> _Ending:
    """Take the CPU times, the item count and both health statuses, then stop both services."""
    ending = _Ending()
    ending.cpu_s = {name: round(seconds - cpu_before[name], 2) for name, seconds in cpu_seconds(services).items()}
    with IndexClient(services.addrs["index"], timeout_s=settings.rpc_timeout_s) as client:
        try:
            ending.final_count = client.stats()["item_count"]
        except ClientError as error:
            recorder.record_error("GetStats", error.code, error.message)
    for service in SERVICES:
        try:
            ending.health[service] = check_health(services.addrs[service], timeout_s=settings.rpc_timeout_s)
        except ClientError as error:
            ending.health[service] = error.code
    ending.exit_codes = services.terminate()
    return ending


def run_soak(settings: SoakSettings, work_dir: pathlib.Path) -> dict:
    """Start both services in work_dir, load them for settings.duration_s, stop them, and return the report."""
    ledger, recorder = Ledger(), Recorder()
    with ServiceProcesses(work_dir, settings.embed_backend, settings.model_dir) as services:
        dim = preload(services.addrs["index"], settings, ledger, recorder)
        cpu_before = cpu_seconds(services)
        with Sampler(services, recorder, settings.rpc_timeout_s) as sampler:
            started = time.monotonic()
            run_clients(Load(services.addrs["index"], settings, ledger, recorder, started + settings.duration_s, dim))
            load_s = time.monotonic() - started
        ending = _finish(services, settings, recorder, cpu_before)
    return build_report(settings, load_s, ledger, recorder, sampler, ending)


def summarise(report: dict) -> str:
    """Return a few lines for a person: throughput, latencies, RSS growth and the checks."""
    lines = [f"soak: {report['load_s']} s, embed backend {report['settings']['embed_backend']}"]
    for client_type, figures in report["throughput"].items():
        lines.append(f"  {client_type}: {figures}")
    for rpc, figures in report["latency"].items():
        lines.append(f"  {rpc:<28} n={figures['count']:<7} p50 {figures['p50_ms']:>8} ms  p99 {figures['p99_ms']:>8} ms")
    for service, memory in report["memory"]["services"].items():
        lines.append(f"  {service} RSS {memory['first_mib']} -> {memory['last_mib']} MiB, growth after warm-up "
                     f"{memory['growth_after_warmup_mib']} MiB while the count rose by "
                     f"{report['memory']['item_count_rise_after_warmup']}")
    lines.append(f"  items: {report['items']}; cpu seconds: {report['cpu_s']}")
    for error in report["errors"]:
        lines.append(f"  error: {error['rpc']} {error['code']} x{error['count']}: {error['example']}")
    failed = [name for name, passed in report["checks"].items() if not passed]
    lines.append("  checks: all passed" if not failed else f"  checks FAILED: {', '.join(failed)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one soak, write its report, and return 0 when every check passed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=positive_float, default=60.0, help="seconds of load")
    parser.add_argument("--backend", choices=["hash", "onnx"], default="hash", help="embed service backend; hash is cheap, so that the index service is the bottleneck")
    parser.add_argument("--model-dir", type=pathlib.Path, default=pathlib.Path("models/tiny-clip-random"),
                        help="CLIP ONNX model folder, for --backend onnx")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results/soak.json"),
                        help="report file (JSON)")
    parser.add_argument("--work-dir", type=pathlib.Path,
                        help="folder for the services' logs and data, kept afterwards (default: a temporary folder, "
                             "kept only when a check fails)")
    args = parser.parse_args(argv)
    settings = SoakSettings(duration_s=args.duration, embed_backend=args.backend, model_dir=args.model_dir)

    work_dir = args.work_dir or pathlib.Path(tempfile.mkdtemp(prefix="imgsearch-soak-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    report = run_soak(settings, work_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(summarise(report))
    print(f"wrote {args.out}")
    if not report["passed"]:
        print(f"the services' logs are in {work_dir}", file=sys.stderr)
        return 1
    if args.work_dir is None:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
