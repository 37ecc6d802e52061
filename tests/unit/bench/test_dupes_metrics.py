"""Tests of the duplicate benchmark's pairwise precision and recall."""

import pytest

from bench.dupes_metrics import Member, score_groups


def _collection():
    return {
        "a": Member("A", "original"),
        "a-png": Member("A", "png"),
        "a-jpeg": Member("A", "jpeg-50"),
        "a-moved": Member("A", "object-moved"),
        "a-flip": Member("A", "flip-horizontal"),
        "b": Member("B", "original"),
        "b-png": Member("B", "png"),
    }


def test_perfect_groups_score_one():
    result = score_groups(_collection(), [["a", "a-png"], ["b", "b-png"]], [["a", "a-png", "a-jpeg"]])

    assert result["exact"]["precision"] == 1.0
    assert result["exact"]["recall"] == 1.0
    assert result["near"]["precision"] == 1.0
    assert result["near"]["recall"] == 1.0
    assert result["by_kind"]["object-moved"]["labelled_near_or_exact"] == 0.0


def test_distractor_in_near_group_costs_precision():
    result = score_groups(_collection(), [["a", "a-png"], ["b", "b-png"]], [["a", "a-png", "a-jpeg", "a-moved"]])

    # Adding a-moved creates 3 wrong pairs beside the 3 right ones.
    assert result["near"]["precision"] == pytest.approx(4 / 7)
    assert result["by_kind"]["object-moved"]["labelled_near_or_exact"] == 1.0


def test_missing_exact_copy_costs_recall():
    result = score_groups(_collection(), [["a", "a-png"]], [])

    assert result["exact"]["recall"] == pytest.approx(1 / 2)
    assert result["by_kind"]["png"]["labelled_exact"] == pytest.approx(1 / 2)


def test_flips_count_neither_way():
    result = score_groups(_collection(), [["a", "a-png"], ["b", "b-png"]], [["a", "a-png", "a-jpeg", "a-flip"]])

    assert result["near"]["precision"] == 1.0
    assert result["by_kind"]["flip-horizontal"]["labelled_near_or_exact"] == 1.0
    assert result["by_kind"]["flip-horizontal"]["expected"] == "reported separately"


def test_exact_pairs_count_as_near():
    result = score_groups(_collection(), [["a", "a-png"], ["b", "b-png"]], [])

    assert result["near"]["precision"] == 1.0
    assert result["near"]["recall"] == pytest.approx(2 / 4)
