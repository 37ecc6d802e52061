"""The soak run, shortened: both services as child processes under mixed load, with each check asserted.

IMGSEARCH_SOAK_S sets the seconds of load (default 10), and `make soak` runs the full 60 s.
"""

import os

import pytest

from bench.soak import run_soak
from bench.soak_load import SEARCH_KINDS, SoakSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    settings = SoakSettings(duration_s=float(os.environ.get("IMGSEARCH_SOAK_S", "10")))
    return run_soak(settings, tmp_path_factory.mktemp("soak"))


def test_soak_every_client_type_made_progress(report):
    throughput = report["throughput"]
    assert throughput["searcher"]["searches"] > 0
    assert throughput["ingester"]["images_added"] > 0
    assert throughput["remover"]["items_removed"] > 0
    for kind in SEARCH_KINDS:
        assert report["latency"][f"Search ({kind})"]["count"] > 0


def test_soak_has_no_unexpected_errors(report):
    assert report["errors"] == []


def test_soak_never_returns_removed_items(report):
    assert report["removed_items_returned"]["count"] == 0, report["removed_items_returned"]["examples"]
    # The check means something only when searches named items whose removal was already acknowledged.
    assert report["removed_items_returned"]["queries_of_removed_items"] > 0


def test_soak_finds_stored_images_first(report):
    assert report["stored_images_missed"]["count"] == 0, report["stored_images_missed"]["examples"]


def test_soak_keeps_metadata(report):
    assert report["metadata_mismatches"]["count"] == 0, report["metadata_mismatches"]["examples"]


def test_soak_count_is_adds_less_removals(report):
    items = report["items"]
    assert items["acknowledged_removals"] > 0
    assert items["final_count"] == items["acknowledged_adds"] - items["acknowledged_removals"]


def test_soak_rss_growth_bounded(report):
    memory = report["memory"]
    for service, figures in memory["services"].items():
        assert figures["growth_after_warmup_mib"] is not None, service
        assert figures["growth_after_warmup_mib"] < memory["max_growth_mib"], (service, memory["series"])


def test_soak_services_serving_throughout(report):
    assert report["not_serving"] == []
    assert report["health_at_end"] == {"embed": "SERVING", "index": "SERVING"}


def test_soak_services_exit_cleanly_on_sigterm(report):
    assert report["exit_codes"] == {"embed": 0, "index": 0}


def test_soak_report_has_latency_percentiles(report):
    for rpc in ("Search", "IngestImages", "RemoveItems", "GetStats"):
        figures = report["latency"][rpc]
        assert figures["count"] > 0
        assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"]
