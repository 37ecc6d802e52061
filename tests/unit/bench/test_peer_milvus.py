"""Tests of the milvus-lite peer's data checks, recall and timing helpers, without milvus-lite."""

import argparse
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from bench.peer import make_clustered_data
from bench.peer.milvus_peer import (
    DatasetError,
    check_unit_vectors,
    insert_chunk_rows,
    ivf_nlist,
    load_dataset,
    main,
    measure_batch,
    measure_sequential,
    parse_args,
    plan_indexes,
    recall_at_k,
)

_ROOT = pathlib.Path(__file__).resolve().parents[3]


def _unit_rows(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _write_folder(folder: pathlib.Path, base: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "base.npy", base)
    np.save(folder / "queries.npy", queries)
    np.save(folder / "truth.npy", truth)
    return folder


def _valid_arrays(rows: int = 50, queries: int = 6, dim: int = 8, k: int = 10):
    rng = np.random.default_rng(3)
    base = _unit_rows(rng, rows, dim)
    query_vectors = _unit_rows(rng, queries, dim)
    truth = np.argsort(-(query_vectors @ base.T), axis=1)[:, :k].astype(np.int64)
    return base, query_vectors, truth


def _with_first_row(truth: np.ndarray, row: int) -> np.ndarray:
    changed = truth.copy()
    changed[0, 0] = row
    return changed


class _BruteForceSearch:
    """A stand-in for a milvus-lite search: exact top-k by inner product, recording each call's query count."""

    def __init__(self, base: np.ndarray, k: int):
        self.base = base
        self.k = k
        self.call_sizes: list[int] = []

    def __call__(self, queries: np.ndarray) -> list[list[int]]:
        self.call_sizes.append(len(queries))
        scores = queries @ self.base.T
        return np.argsort(-scores, axis=1)[:, :self.k].tolist()


def test_recall_perfect_results_is_one():
    truth = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)

    assert recall_at_k([[3, 2, 1], [6, 5, 4]], truth, k=3) == 1.0


def test_recall_counts_overlap_per_query():
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=np.int64)

    # 2 of 4 right for the first query, 1 of 4 for the second.
    assert recall_at_k([[1, 2, 90, 91], [8, 92, 93, 94]], truth, k=4) == pytest.approx(3 / 8)


def test_recall_missing_results_count_as_misses():
    truth = np.array([[1, 2, 3, 4]], dtype=np.int64)

    assert recall_at_k([[1, 2]], truth, k=4) == 0.5
    assert recall_at_k([[]], truth, k=4) == 0.0


def test_recall_uses_only_first_k():
    truth = np.array([[1, 2, 9, 9]], dtype=np.int64)

    # 3 is a true neighbour only beyond k, and the returned 1 beyond k does not count.
    assert recall_at_k([[3, 2, 1]], np.array([[1, 2, 3]], dtype=np.int64), k=2) == 0.5
    assert recall_at_k([[2, 7, 1]], truth, k=2) == 0.5


def test_recall_duplicate_ids_count_once():
    truth = np.array([[1, 2]], dtype=np.int64)

    assert recall_at_k([[1, 1]], truth, k=2) == 0.5


def test_recall_rejects_query_count_mismatch():
    truth = np.zeros((2, 10), dtype=np.int64)

    with pytest.raises(ValueError, match="results for 1 queries but truth has 2"):
        recall_at_k([[0] * 10], truth, k=10)


def test_recall_rejects_k_beyond_truth():
    truth = np.zeros((1, 5), dtype=np.int64)

    with pytest.raises(ValueError, match="fewer than k=10"):
        recall_at_k([[0] * 10], truth, k=10)


def test_recall_rejects_non_positive_k():
    with pytest.raises(ValueError, match="k must be positive"):
        recall_at_k([[0]], np.zeros((1, 1), dtype=np.int64), k=0)


def test_load_dataset_reads_valid_folder(tmp_path):
    base, queries, truth = _valid_arrays()
    _write_folder(tmp_path, base, queries, truth)

    dataset = load_dataset(tmp_path, k=10)

    np.testing.assert_array_equal(dataset.base, base)
    np.testing.assert_array_equal(dataset.queries, queries)
    np.testing.assert_array_equal(dataset.truth, truth)


@pytest.mark.parametrize("missing", ["base.npy", "queries.npy", "truth.npy"])
def test_load_dataset_missing_file(tmp_path, missing):
    _write_folder(tmp_path, *_valid_arrays())
    (tmp_path / missing).unlink()

    with pytest.raises(DatasetError, match=f"{missing} is missing"):
        load_dataset(tmp_path, k=10)


def test_load_dataset_rejects_pickled_array(tmp_path):
    base, queries, truth = _valid_arrays()
    _write_folder(tmp_path, base, queries, truth)
    np.save(tmp_path / "truth.npy", np.array([{"row": 1}], dtype=object), allow_pickle=True)

    with pytest.raises(DatasetError, match="truth.npy is not a plain .npy array"):
        load_dataset(tmp_path, k=10)


@pytest.mark.parametrize(
    ("base", "message"),
    [
        (np.ones(8, dtype=np.float32), r"2-D float32 array \(rows, dim\), got shape \(8,\)"),
        (np.eye(4, dtype=np.float64), "got shape .* dtype float64"),
        (np.zeros((0, 8), dtype=np.float32), "is empty"),
    ],
    ids=["one-dimensional", "float64", "empty"],
)
def test_load_dataset_rejects_bad_base_shape_or_type(tmp_path, base, message):
    _, queries, truth = _valid_arrays()
    _write_folder(tmp_path, base, queries, truth)

    with pytest.raises(DatasetError, match=f"base.npy .*{message}"):
        load_dataset(tmp_path, k=10)


def test_load_dataset_rejects_unnormalised_base(tmp_path):
    base, queries, truth = _valid_arrays()
    base[7] *= 2.0
    _write_folder(tmp_path, base, queries, truth)

    with pytest.raises(DatasetError, match="base.npy row 7 has L2 norm 2.0000, and 1 of 50 rows") as raised:
        load_dataset(tmp_path, k=10)
    assert "L2-normalise the vectors" in str(raised.value)


def test_load_dataset_rejects_unnormalised_queries(tmp_path):
    base, queries, truth = _valid_arrays()
    queries *= 0.5
    _write_folder(tmp_path, base, queries, truth)

    with pytest.raises(DatasetError, match="queries.npy row 0 has L2 norm 0.5000, and 6 of 6 rows"):
        load_dataset(tmp_path, k=10)


def test_load_dataset_rejects_nan(tmp_path):
    base, queries, truth = _valid_arrays()
    base[3, 2] = np.nan
    _write_folder(tmp_path, base, queries, truth)

    with pytest.raises(DatasetError, match="base.npy contains NaN or infinite values"):
        load_dataset(tmp_path, k=10)


def test_load_dataset_rejects_dim_mismatch(tmp_path):
    base, _, truth = _valid_arrays()
    queries = _unit_rows(np.random.default_rng(4), 6, 4)
    _write_folder(tmp_path, base, queries, truth)

    with pytest.raises(DatasetError, match="queries.npy has dim 4 but base.npy has dim 8"):
        load_dataset(tmp_path, k=10)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda truth: truth.astype(np.int32), r"2-D int64 array \(queries, k\), got shape \(6, 10\) dtype int32"),
        (lambda truth: truth[:, 0], r"2-D int64 array \(queries, k\), got shape \(6,\)"),
        (lambda truth: truth[:5], "truth.npy has 5 rows but queries.npy has 6"),
        (lambda truth: truth[:, :9], "truth.npy has 9 neighbours per query, fewer than k=10"),
        (lambda truth: _with_first_row(truth, 50), r"outside \[0, 50\): min \d+, max 50"),
        (lambda truth: _with_first_row(truth, -1), r"outside \[0, 50\): min -1, max \d+"),
    ],
    ids=["int32", "one-dimensional", "row-count", "too-few-neighbours", "row-past-end", "negative-row"],
)
def test_load_dataset_rejects_bad_truth(tmp_path, change, message):
    base, queries, truth = _valid_arrays(rows=50)
    _write_folder(tmp_path, base, queries, change(truth))

    with pytest.raises(DatasetError, match=message):
        load_dataset(tmp_path, k=10)


def test_check_unit_vectors_accepts_float_rounding():
    vectors = np.full((2, 4), 0.5, dtype=np.float32)
    vectors[1] *= 1.0004

    check_unit_vectors("base.npy", vectors)


def test_ivf_nlist_is_four_sqrt_n_within_bounds():
    assert ivf_nlist(100_000) == 1265
    assert ivf_nlist(20_000) == 566
    assert ivf_nlist(4) == 4
    assert ivf_nlist(1) == 1


def _sweep_options(**changes) -> argparse.Namespace:
    options = {"nprobe": [4, 16, 64], "ef": [16, 64, 256], "hnsw_m": [16], "ef_construction": 128}
    return argparse.Namespace(**{**options, **changes})


def test_plan_indexes_keeps_kind_order():
    plans = plan_indexes(["hnsw", "flat", "ivf_flat"], n=20_000, k=10, options=_sweep_options())

    assert [plan.kind for plan in plans] == ["hnsw", "flat", "ivf_flat"]
    assert plans[0].build_params == {"M": 16, "efConstruction": 128}
    assert plans[0].search_params == [{"ef": 16}, {"ef": 64}, {"ef": 256}]
    assert plans[1].search_params == [{}]
    assert plans[2].build_params == {"nlist": 566}
    assert plans[2].search_params == [{"nprobe": 4}, {"nprobe": 16}, {"nprobe": 64}]


def test_plan_indexes_caps_nprobe_at_nlist():
    plans = plan_indexes(["ivf_flat"], n=100, k=10, options=_sweep_options(nprobe=[4, 64, 128]))

    assert plans[0].build_params == {"nlist": 40}
    assert plans[0].search_params == [{"nprobe": 4}, {"nprobe": 40}]


def test_plan_indexes_raises_ef_to_k():
    plans = plan_indexes(["hnsw"], n=1_000, k=20, options=_sweep_options(ef=[8, 16, 64]))

    assert plans[0].search_params == [{"ef": 20}, {"ef": 64}]


def test_plan_indexes_builds_one_hnsw_per_m():
    plans = plan_indexes(["hnsw"], n=1_000, k=10, options=_sweep_options(hnsw_m=[16, 32]))

    assert [plan.build_params["M"] for plan in plans] == [16, 32]


def test_plan_indexes_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown index kind 'diskann'"):
        plan_indexes(["diskann"], n=1_000, k=10, options=_sweep_options())


def test_measure_sequential_one_query_per_call():
    base, queries, truth = _valid_arrays(queries=30)
    search = _BruteForceSearch(base, k=10)

    qps, found = measure_sequential(search, queries, warmup=5)

    assert search.call_sizes == [1] * 35
    assert qps > 0
    assert recall_at_k(found, truth, k=10) == 1.0


def test_measure_batch_calls_of_batch_size():
    base, queries, truth = _valid_arrays(queries=25)
    search = _BruteForceSearch(base, k=10)

    qps, found = measure_batch(search, queries, batch_size=10)

    assert search.call_sizes == [10, 10, 5]
    assert qps > 0
    assert recall_at_k(found, truth, k=10) == 1.0


def test_measure_batch_rejects_non_positive_batch():
    base, queries, _ = _valid_arrays()

    with pytest.raises(ValueError, match="batch_size must be positive"):
        measure_batch(_BruteForceSearch(base, k=10), queries, batch_size=0)


def test_insert_chunk_rows_bounds_message_size():
    assert insert_chunk_rows(512) == 8192
    assert insert_chunk_rows(1 << 30) == 1


def test_parse_args_defaults(tmp_path):
    args = parse_args(["--data", str(tmp_path), "--out", str(tmp_path / "out.json")])

    assert args.k == 10
    assert args.index == ["flat", "ivf_flat", "hnsw"]
    assert args.batch_size == 100
    assert args.sequential_queries is None
    assert args.hnsw_m == [32]
    assert args.ef_construction == 40


@pytest.mark.parametrize(
    "extra", [["--k", "0"], ["--index", "diskann"], ["--nprobe", "-1"]], ids=["zero-k", "unknown-index", "negative"]
)
def test_parse_args_rejects_bad_values(tmp_path, extra, capsys):
    with pytest.raises(SystemExit) as raised:
        parse_args(["--data", str(tmp_path), "--out", str(tmp_path / "out.json"), *extra])

    assert raised.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_main_bad_data_exits_two_without_milvus(tmp_path, capsys):
    base, queries, truth = _valid_arrays()
    _write_folder(tmp_path, base * 3, queries, truth)
    out = tmp_path / "out.json"

    assert main(["--data", str(tmp_path), "--out", str(out)]) == 2
    assert "base.npy row 0 has L2 norm 3.0000" in capsys.readouterr().err
    assert not out.exists()


def test_module_imports_without_pymilvus():
    # A fresh interpreter, because another test may already have imported pymilvus here.
    code = (
        "import sys, bench.peer.milvus_peer\n"
        "loaded = sorted({'pymilvus', 'milvus_lite'} & set(sys.modules))\n"
        "sys.exit(f'imported {loaded}' if loaded else 0)"
    )
    completed = subprocess.run([sys.executable, "-c", code], cwd=_ROOT, capture_output=True, text=True, timeout=60)

    assert completed.returncode == 0, completed.stderr


def test_clustered_data_passes_load_dataset(tmp_path):
    arguments = ["--out", str(tmp_path), "--n", "300", "--queries", "7", "--dim", "16", "--clusters", "5", "--k", "12"]
    make_clustered_data.main(arguments)

    dataset = load_dataset(tmp_path, k=12)

    assert dataset.base.shape == (300, 16)
    assert dataset.queries.shape == (7, 16)
    assert dataset.truth.shape == (7, 12)


def test_exact_top_k_matches_argsort_across_chunks(monkeypatch):
    base, queries, _ = _valid_arrays(rows=103, queries=9, dim=8)
    # Chunks of 10 rows make the running top-k merge 11 times.
    monkeypatch.setattr(make_clustered_data, "_TRUTH_CHUNK_ROWS", 10)

    truth = make_clustered_data.exact_top_k(base, queries, k=15)

    expected = np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :15]
    np.testing.assert_array_equal(truth, expected)
    assert truth.dtype == np.int64
