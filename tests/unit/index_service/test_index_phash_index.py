"""Tests of index_service.phash_index against a brute-force scan in Python."""

import numpy as np
import pytest

from imgsearch_common.fingerprints import phash_distance
from index_service.phash_index import PhashIndex

_COUNT = 3000


def _random_phashes(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**64 - 1, size=count, dtype=np.uint64, endpoint=True)


@pytest.fixture(scope="module")
def phashes():
    # Some hashes close to the first one, so that small distances occur.
    values = _random_phashes(_COUNT, seed=1)
    for position, bits in enumerate((0b1, 0b11, 0b1111, 1 << 63), start=1):
        values[position] = values[0] ^ np.uint64(bits)
    return values


@pytest.fixture(scope="module")
def row_ids():
    return np.arange(_COUNT, dtype=np.int64) * 3 + 5


@pytest.fixture(scope="module")
def versions():
    values = np.ones(_COUNT, dtype=np.uint32)
    values[6::7] = 2
    return values


@pytest.fixture(scope="module")
def index(row_ids, phashes, versions):
    built = PhashIndex()
    for start in range(0, _COUNT, 700):  # several adds, past the initial capacity
        built.add(row_ids[start : start + 700], phashes[start : start + 700], versions[start : start + 700])
    return built


def _brute_force(query, version, max_distance, row_ids, phashes, versions, floor=0):
    return [
        (int(row_id), phash_distance(int(query), int(phash)))
        for row_id, phash, stored_version in zip(row_ids, phashes, versions)
        if stored_version == version and row_id > floor and phash_distance(int(query), int(phash)) <= max_distance
    ]


def test_len_counts_added(index):
    assert len(index) == _COUNT
    assert len(PhashIndex()) == 0


@pytest.mark.parametrize("max_distance", [0, 4, 22, 64])
def test_within_matches_brute_force(index, row_ids, phashes, versions, max_distance):
    for query in (phashes[0], phashes[100], np.uint64(2**64 - 1)):
        found_row_ids, distances = index.within(int(query), 1, max_distance)

        expected = _brute_force(query, 1, max_distance, row_ids, phashes, versions)
        assert list(zip(found_row_ids.tolist(), distances.tolist())) == expected


def test_within_finds_close_hashes(index, row_ids, phashes):
    found_row_ids, distances = index.within(int(phashes[0]), 1, 4)

    assert found_row_ids[:5].tolist() == row_ids[:5].tolist()
    assert distances[:5].tolist() == [0, 1, 2, 4, 1]


def test_within_keeps_only_version(index, versions):
    found_row_ids, _ = index.within(0, 2, 64)

    assert len(found_row_ids) == int(np.sum(versions == 2))


def test_pairs_within_matches_brute_force(index, row_ids, phashes, versions):
    queries = phashes[:300]
    floors = row_ids[:300]

    positions, found_row_ids, distances = index.pairs_within(queries, 1, 22, floors)

    expected = [
        (position, row_id, distance)
        for position, (query, floor) in enumerate(zip(queries, floors))
        for row_id, distance in _brute_force(query, 1, 22, row_ids, phashes, versions, floor=floor)
    ]
    assert list(zip(positions.tolist(), found_row_ids.tolist(), distances.tolist())) == expected
    assert len(expected) > 0


def test_pairs_within_of_empty_index():
    positions, row_ids, distances = PhashIndex().pairs_within(np.array([5], dtype=np.uint64), 1, 64, np.zeros(1))

    assert (len(positions), len(row_ids), len(distances)) == (0, 0, 0)


def test_lookup_by_row_id(index, row_ids, phashes, versions):
    requested = np.array([row_ids[10], 4, row_ids[-1], row_ids[-1] + 1, row_ids[7]], dtype=np.int64)

    found, found_phashes, found_versions = index.lookup(requested)

    assert found.tolist() == [True, False, True, False, True]
    assert found_phashes.tolist() == [int(phashes[10]), 0, int(phashes[-1]), 0, int(phashes[7])]
    assert found_versions.tolist() == [int(versions[10]), 0, int(versions[-1]), 0, int(versions[7])]


def test_lookup_in_empty_index():
    found, phashes, versions = PhashIndex().lookup(np.array([1, 2]))

    assert found.tolist() == [False, False]
    assert phashes.tolist() == [0, 0]
    assert versions.tolist() == [0, 0]


def test_add_rejects_row_ids_out_of_order():
    index = PhashIndex()
    index.add(np.array([5, 6]), np.array([1, 2], dtype=np.uint64), np.array([1, 1]))

    with pytest.raises(ValueError, match="row ids must increase past 6"):
        index.add(np.array([6]), np.array([3], dtype=np.uint64), np.array([1]))
    with pytest.raises(ValueError, match="row ids must increase"):
        index.add(np.array([9, 8]), np.array([3, 4], dtype=np.uint64), np.array([1, 1]))
    assert len(index) == 2


def test_add_rejects_arrays_of_other_lengths():
    with pytest.raises(ValueError, match="got 2 row ids, 1 pHashes and 2 versions"):
        PhashIndex().add(np.array([1, 2]), np.array([1], dtype=np.uint64), np.array([1, 1]))


def test_add_of_nothing():
    index = PhashIndex()

    index.add(np.array([], dtype=np.int64), np.array([], dtype=np.uint64), np.array([], dtype=np.uint32))

    assert len(index) == 0


def _small_index() -> PhashIndex:
    index = PhashIndex()
    index.add(np.array([2, 4, 6, 8]), np.array([0b1, 0b11, 0b111, 0b1111], dtype=np.uint64), np.array([1, 1, 2, 1]))
    return index


def test_remove_leaves_others_searchable():
    index = _small_index()

    assert index.remove(np.array([4, 9])) == 1
    assert index.remove(np.array([4])) == 0

    assert len(index) == 3
    assert index.row_ids().tolist() == [2, 6, 8]
    found_row_ids, distances = index.within(0, 1, 64)
    assert found_row_ids.tolist() == [2, 8]
    assert distances.tolist() == [1, 4]
    found, phashes, _ = index.lookup(np.array([4, 8]))
    assert found.tolist() == [False, True]
    assert phashes.tolist() == [0, 0b1111]


def test_add_after_remove_keeps_order_rule():
    index = _small_index()
    index.remove(np.array([8]))

    with pytest.raises(ValueError, match="increase past 6"):
        index.add(np.array([5]), np.array([0], dtype=np.uint64), np.array([1]))
    index.add(np.array([7]), np.array([0], dtype=np.uint64), np.array([1]))

    assert index.row_ids().tolist() == [2, 4, 6, 7]


def test_arrays_and_load_round_trip():
    index = _small_index()

    loaded = PhashIndex()
    loaded.load(*index.arrays())

    assert [array.tolist() for array in loaded.arrays()] == [array.tolist() for array in index.arrays()]
    assert loaded.within(0, 1, 2)[0].tolist() == [2, 4]


def test_load_rejects_bad_arrays():
    with pytest.raises(ValueError, match="strictly increase"):
        PhashIndex().load(np.array([3, 3]), np.array([1, 2], dtype=np.uint64), np.array([1, 1]))
    with pytest.raises(ValueError, match="got 2 row ids, 1 pHashes"):
        PhashIndex().load(np.array([1, 2]), np.array([1], dtype=np.uint64), np.array([1, 1]))


def test_load_of_nothing_empties_index():
    index = _small_index()

    index.load(np.array([], dtype=np.int64), np.array([], dtype=np.uint64), np.array([], dtype=np.uint32))

    assert len(index) == 0
    assert index.within(0, 1, 64)[0].tolist() == []
