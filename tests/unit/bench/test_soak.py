"""Tests of the soak run's checks, ledger and /proc readers, without services."""

import copy
import io
import os
import time

import numpy as np
import pytest
from PIL import Image

from bench.soak import check_searches, evaluate_checks, percentiles_ms, rss_growth_mib, stored_images_missed
from bench.soak_load import Ledger, SearchRecord, SoakSettings, StoredImage, new_items, noise_png
from bench.soak_services import read_cpu_seconds, read_rss_bytes


def _ledger_with_removal(live: str = "live", removed: str = "gone") -> tuple[Ledger, float, float]:
    """Return a ledger holding live and removed, and the times when the removal was sent and acknowledged."""
    ledger = Ledger()
    ledger.record_added(removed, StoredImage(b"", f"mem://{removed}", {}))
    # removed is the only live item, so it is the one taken.
    assert ledger.take_for_removal(np.random.default_rng(0), 1, remove_fraction=1.0) == [removed]
    ledger.record_added(live, StoredImage(b"", f"mem://{live}", {}))
    sent_at = ledger.removal(removed).sent_at
    acknowledged_at = sent_at + 1.0
    ledger.record_removed([removed], acknowledged_at)
    return ledger, sent_at, acknowledged_at


def test_search_after_removal_returning_item_is_flagged():
    ledger, _, acknowledged_at = _ledger_with_removal()
    search = SearchRecord("embedding", "", acknowledged_at + 0.1, acknowledged_at + 0.2, ("live", "gone"))

    findings = check_searches([search], ledger)

    assert findings.removed_returned == [{"item_id": "gone", "query": "embedding", "found_as": "neighbour"}]
    assert findings.unexpected_errors == []


def test_search_started_before_acknowledgement_may_return_item():
    ledger, _, acknowledged_at = _ledger_with_removal()
    search = SearchRecord("embedding", "", acknowledged_at - 0.1, acknowledged_at + 0.2, ("gone",))

    findings = check_searches([search], ledger)

    assert findings.removed_returned == []


def test_removed_item_id_query_success_flagged():
    ledger, _, acknowledged_at = _ledger_with_removal()
    search = SearchRecord("item_id", "gone", acknowledged_at + 0.1, acknowledged_at + 0.2, ("live",))

    findings = check_searches([search], ledger)

    assert findings.removed_returned == [{"item_id": "gone", "query": "item_id", "found_as": "query"}]
    assert findings.removed_queries == 1


def test_not_found_for_item_being_removed_is_expected():
    ledger, sent_at, _ = _ledger_with_removal()
    search = SearchRecord("item_id", "gone", sent_at - 0.5, sent_at + 0.1, error_code="NOT_FOUND")

    findings = check_searches([search], ledger)

    assert findings.unexpected_errors == []
    assert findings.removed_returned == []


def test_not_found_before_removal_sent_is_unexpected():
    ledger, sent_at, _ = _ledger_with_removal()
    search = SearchRecord("item_id", "gone", sent_at - 0.5, sent_at - 0.1, error_code="NOT_FOUND", error_message="x")

    findings = check_searches([search], ledger)

    assert findings.unexpected_errors == [{"rpc": "Search (item_id)", "code": "NOT_FOUND", "message": "x"}]


def test_not_found_for_live_item_is_unexpected():
    ledger, _, acknowledged_at = _ledger_with_removal()
    search = SearchRecord("item_id", "live", acknowledged_at, acknowledged_at + 0.1, error_code="NOT_FOUND")

    findings = check_searches([search], ledger)

    assert [error["code"] for error in findings.unexpected_errors] == ["NOT_FOUND"]


def test_unavailable_search_is_unexpected():
    ledger, _, acknowledged_at = _ledger_with_removal()
    search = SearchRecord("image", "gone", acknowledged_at + 0.1, acknowledged_at + 0.2, error_code="UNAVAILABLE")

    findings = check_searches([search], ledger)

    assert [error["code"] for error in findings.unexpected_errors] == ["UNAVAILABLE"]


def test_stored_image_not_first_missed():
    ledger, _, acknowledged_at = _ledger_with_removal()
    searches = [
        SearchRecord("image", "live", acknowledged_at, acknowledged_at + 0.1, ("other", "live")),
        SearchRecord("image", "live", acknowledged_at, acknowledged_at + 0.1, ()),
        SearchRecord("image", "live", acknowledged_at, acknowledged_at + 0.1, ("live", "other")),
    ]

    missed = stored_images_missed(searches, ledger)

    assert missed == [{"item_id": "live", "first": ("other",)}, {"item_id": "live", "first": ()}]


def test_image_of_item_being_removed_skipped():
    ledger, sent_at, _ = _ledger_with_removal()
    search = SearchRecord("image", "gone", sent_at - 0.5, sent_at + 0.1, ("other",))

    assert stored_images_missed([search], ledger) == []


def test_ledger_removes_at_most_remove_fraction():
    ledger = Ledger()
    for number in range(8):
        ledger.record_added(f"item{number}", StoredImage(b"", "", {}))
    rng = np.random.default_rng(1)

    taken_item_ids = []
    for _ in range(10):
        taken_item_ids += ledger.take_for_removal(rng, 1, remove_fraction=0.25)

    assert len(taken_item_ids) == 2
    assert len(set(taken_item_ids)) == 2
    assert ledger.counts() == (8, 0)


def test_ledger_never_picks_item_sent_for_removal():
    ledger = Ledger()
    ledger.record_added("a", StoredImage(b"", "", {}))
    ledger.record_added("b", StoredImage(b"", "", {}))
    rng = np.random.default_rng(2)
    taken_item_ids = ledger.take_for_removal(rng, 1, remove_fraction=1.0)

    picks = {ledger.pick(rng, removed=False)[0] for _ in range(20)}

    assert picks.isdisjoint(taken_item_ids)
    assert ledger.pick(rng, removed=True) is None


def test_rss_growth_skips_warmup_and_exited_samples():
    growth = rss_growth_mib([0.0, 1.0, 2.0, 3.0, 4.0], [50.0, 100.0, None, 130.0, 120.0], warmup_s=1.0)

    assert growth == 30.0


def test_rss_growth_without_late_samples_is_none():
    assert rss_growth_mib([0.0, 1.0], [50.0, 60.0], warmup_s=5.0) is None


def test_percentiles_in_milliseconds():
    figures = percentiles_ms([0.001 * n for n in range(1, 101)])

    assert figures["count"] == 100
    assert figures["p50_ms"] == pytest.approx(50.5)
    assert figures["p99_ms"] == pytest.approx(99.01)
    assert figures["max_ms"] == pytest.approx(100.0)


def _passing_report() -> dict:
    return {
        "items": {"final_count": 10, "expected_count": 10},
        "memory": {"max_growth_mib": 100.0, "services": {"embed": {"growth_after_warmup_mib": 1.0},
                                                         "index": {"growth_after_warmup_mib": 5.0}}},
        "errors": [],
        "removed_items_returned": {"count": 0},
        "stored_images_missed": {"count": 0},
        "metadata_mismatches": {"count": 0},
        "not_serving": [],
        "health_at_end": {"embed": "SERVING", "index": "SERVING"},
        "exit_codes": {"embed": 0, "index": 0},
    }


def test_checks_pass_on_clean_report():
    checks = evaluate_checks(_passing_report())

    assert all(checks.values()), checks


@pytest.mark.parametrize(
    ("check", "path", "value"),
    [
        ("no_unexpected_errors", ("errors",), [{"rpc": "Search (image)", "code": "UNAVAILABLE"}]),
        ("removed_items_never_returned", ("removed_items_returned", "count"), 1),
        ("stored_images_found_first", ("stored_images_missed", "count"), 1),
        ("metadata_intact", ("metadata_mismatches", "count"), 1),
        ("count_matches", ("items", "final_count"), 11),
        ("count_matches", ("items", "final_count"), None),
        ("rss_bounded", ("memory", "services", "index", "growth_after_warmup_mib"), 100.0),
        ("rss_bounded", ("memory", "services", "embed", "growth_after_warmup_mib"), None),
        ("serving_throughout", ("not_serving",), [{"t_s": 3.0, "service": "index", "status": "UNAVAILABLE"}]),
        ("serving_at_end", ("health_at_end", "embed"), "NOT_SERVING"),
        ("clean_exit", ("exit_codes", "index"), None),
        ("clean_exit", ("exit_codes", "embed"), 1),
    ],
)
def test_check_fails_on_bad_figure(check, path, value):
    report = copy.deepcopy(_passing_report())
    parent = report
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value

    checks = evaluate_checks(report)

    assert checks[check] is False
    assert [name for name, passed in checks.items() if not passed] == [check]


def test_settings_reject_warmup_past_duration():
    with pytest.raises(ValueError, match="warmup_s"):
        SoakSettings(duration_s=5.0, warmup_s=5.0)


def test_settings_reject_unknown_backend():
    with pytest.raises(ValueError, match="embed_backend"):
        SoakSettings(embed_backend="inference")


def test_default_warmup_is_quarter_of_short_run():
    assert SoakSettings(duration_s=10.0).effective_warmup_s == 2.5
    assert SoakSettings(duration_s=60.0).effective_warmup_s == 10.0


def test_new_items_are_distinct_small_pngs_with_metadata():
    items = new_items(np.random.default_rng(3), "ingester1", 40, 5, choose_ids=True)

    assert len({item.image for item in items}) == 5
    assert [item.item_id for item in items] == [f"ingester1-{n:06d}" for n in range(40, 45)]
    assert items[0].metadata == {"client": "ingester1", "sequence": "40", "source": "soak"}
    assert items[0].uri == "mem://ingester1-000040.png"


def test_server_assigned_items_have_no_item_id():
    items = new_items(np.random.default_rng(3), "ingester0", 0, 2, choose_ids=False)

    assert [item.item_id for item in items] == ["", ""]


def test_noise_png_side_within_bounds():
    with Image.open(io.BytesIO(noise_png(np.random.default_rng(4)))) as image:
        assert image.format == "PNG"
        assert 24 <= image.width == image.height <= 48


def test_read_rss_of_this_process():
    assert read_rss_bytes(os.getpid()) > 1024 * 1024


def test_read_cpu_seconds_grows_with_work():
    before = read_cpu_seconds(os.getpid())
    finish = time.process_time() + 0.1
    while time.process_time() < finish:
        pass

    assert read_cpu_seconds(os.getpid()) > before
