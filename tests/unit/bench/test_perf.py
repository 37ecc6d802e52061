"""Tests of the performance benchmark's pure parts: data, recall, figures, table, README part and the GPU guard."""

import json

import faiss
import numpy as np
import pytest

from bench import gpu_check, perf_data
from bench.perf_figures import Figure, at_least, at_most, reported, table, update_readme, write_summary

_CONTEXT = {"mode": "quick", "machine": "x86_64, 2 CPUs", "dim": 8, "query_count": 3, "k": 2,
            "gpu": {"available": False, "summary": "none."}}


def test_clustered_vectors_are_unit_and_repeatable():
    first = perf_data.clustered(500, 8, seed=3)

    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(first, perf_data.clustered(500, 8, seed=3))
    assert not np.array_equal(first, perf_data.clustered(500, 8, seed=4))


def test_queries_come_from_the_database_clusters():
    database = perf_data.clustered(2000, 32, seed=5)
    queries = perf_data.queries_like(50, 2000, 32, seed=5)
    unrelated = perf_data.queries_like(50, 2000, 32, seed=99)

    best = (queries @ database.T).max(axis=1)
    assert best.mean() > 0.8
    assert (unrelated @ database.T).max(axis=1).mean() < best.mean() - 0.2


def test_exact_neighbours_and_recall():
    database = perf_data.clustered(300, 8, seed=6)
    truth = perf_data.exact_neighbours(database, database[:4], 3)

    assert truth[:, 0].tolist() == [0, 1, 2, 3]
    assert perf_data.recall_at(truth.tolist(), truth) == 1.0
    assert perf_data.recall_at([[row[0], -1, -2] for row in truth.tolist()], truth) == pytest.approx(1 / 3)


def test_figures_say_whether_their_goal_is_met():
    assert at_least("qps ratio", 0.95, 0.9).met is True
    assert at_least("qps ratio", 0.85, 0.9).met is False
    assert at_most("start", 3.5, 3.0, "s").met is False
    assert reported("rate", 12.0, "vectors/s").met is None


def test_summary_holds_every_figure_with_its_goal(tmp_path):
    figures = [at_least("ratio", 1.2, 0.9), reported("rate", 5.0, "vectors/s")]

    write_summary(figures, _CONTEXT, tmp_path / "summary.json")

    written = json.loads((tmp_path / "summary.json").read_text())
    assert [(f["name"], f["goal"], f["met"]) for f in written["figures"]] == [("ratio", ">= 0.9", True),
                                                                              ("rate", None, None)]


def test_table_marks_missed_goals():
    text = table([Figure("ratio", 0.5, "x", ">= 0.9", False, "a note")], _CONTEXT)

    assert "| ratio (a note) | 0.5 x | >= 0.9 | **no** |" in text
    assert "GPU: none." in text


def test_readme_part_is_replaced_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench-perf:start -->\nold\n<!-- bench-perf:end -->\noutro\n")

    update_readme(readme, "new table\n")

    assert readme.read_text() == "intro\n<!-- bench-perf:start -->\nnew table\n<!-- bench-perf:end -->\noutro\n"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="has no <!-- bench-perf:start -->"):
        update_readme(readme, "x")


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="this machine has a GPU that faiss can use")
def test_gpu_check_exits_3_without_a_gpu(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "gpu.json")]) == 3

    assert "no GPU" in capsys.readouterr().err
    assert not (tmp_path / "gpu.json").exists()
