"""Tests of index_service.snapshot: the file format, its atomic write and its checked read."""

import dataclasses
import json

import numpy as np
import pytest

from index_service.snapshot import (
    FILE_NAME,
    MAGIC,
    TEMP_SUFFIX,
    Snapshot,
    SnapshotError,
    SnapshotHeader,
    read_snapshot,
    remove_temp_file,
    write_snapshot,
)

_HEADER = SnapshotHeader(
    model_id="fake-clip",
    dim=16,
    last_row_id=42,
    last_removal_id=3,
    item_count=3,
    created_at="2026-01-01T00:00:00",
    index_layout={"kind": "flat", "encoding": "float32", "nlist": 0, "hnsw_m": 0, "trained_items": 0},
)


def _snapshot() -> Snapshot:
    return Snapshot(
        header=_HEADER,
        vector_row_ids=np.array([3, 7, 42], dtype=np.int64),
        vectors=np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32),
        vector_index=np.arange(5, dtype=np.uint8),
        masked_row_ids=np.array([7], dtype=np.int64),
        phash_row_ids=np.array([3, 7, 42], dtype=np.int64),
        phash_values=np.array([0, 2**63, 2**64 - 1], dtype=np.uint64),
        phash_versions=np.array([1, 1, 2], dtype=np.uint32),
    )


@pytest.fixture
def path(tmp_path):
    return tmp_path / FILE_NAME


def _assert_same(read: Snapshot, written: Snapshot) -> None:
    assert read.header == written.header
    for field in ("vector_row_ids", "vectors", "vector_index", "masked_row_ids", "phash_row_ids", "phash_values",
                  "phash_versions"):
        assert getattr(read, field).dtype == getattr(written, field).dtype
        np.testing.assert_array_equal(getattr(read, field), getattr(written, field))


def test_round_trip(path):
    size = write_snapshot(path, _snapshot())

    assert size == path.stat().st_size
    _assert_same(read_snapshot(path), _snapshot())
    assert not path.with_name(path.name + TEMP_SUFFIX).exists()


def test_round_trip_of_empty_sections(path):
    empty = Snapshot(
        header=dataclasses.replace(_HEADER, item_count=0),
        vector_row_ids=np.empty(0, dtype=np.int64),
        vectors=np.empty((0, 0), dtype=np.float32),
        vector_index=np.empty(0, dtype=np.uint8),
        masked_row_ids=np.empty(0, dtype=np.int64),
        phash_row_ids=np.empty(0, dtype=np.int64),
        phash_values=np.empty(0, dtype=np.uint64),
        phash_versions=np.empty(0, dtype=np.uint32),
    )
    write_snapshot(path, empty)

    _assert_same(read_snapshot(path), empty)


def test_write_replaces_older_snapshot(path):
    write_snapshot(path, _snapshot())
    newer = dataclasses.replace(_snapshot(), header=dataclasses.replace(_HEADER, last_row_id=50))

    write_snapshot(path, newer)

    assert read_snapshot(path).header.last_row_id == 50


def test_missing_file(path):
    with pytest.raises(FileNotFoundError):
        read_snapshot(path)


def test_truncated_file(path):
    write_snapshot(path, _snapshot())
    data = path.read_bytes()

    for length in (len(data) - 1, len(data) // 2, len(MAGIC) + 3):
        path.write_bytes(data[:length])
        with pytest.raises(SnapshotError):
            read_snapshot(path)


def test_flipped_byte_fails_checksum(path):
    write_snapshot(path, _snapshot())
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # inside the vectors section (192 bytes), which the 60 bytes of pHash arrays follow
    path.write_bytes(bytes(data))

    with pytest.raises(SnapshotError, match="section vectors .* CRC-32"):
        read_snapshot(path)


def test_trailing_bytes_rejected(path):
    write_snapshot(path, _snapshot())
    path.write_bytes(path.read_bytes() + b"x")

    with pytest.raises(SnapshotError, match="bytes after its last section"):
        read_snapshot(path)


def test_other_file_rejected(path):
    path.write_bytes(b"PK\x03\x04 a zip file, not a snapshot")

    with pytest.raises(SnapshotError, match="not a snapshot of this format"):
        read_snapshot(path)


def _rewrite_header(path, change) -> None:
    data = path.read_bytes()
    start = len(MAGIC) + 8
    length = int.from_bytes(data[len(MAGIC) : start], "little")
    header = json.loads(data[start : start + length])
    change(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(MAGIC + len(encoded).to_bytes(8, "little") + encoded + data[start + length :])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda header: header.update(dim="16"), "field dim .* not of type int"),
        (lambda header: header.pop("model_id"), "has fields"),
        (lambda header: header.update(extra=1), "has fields"),
        (lambda header: header["sections"].reverse(), "has sections"),
    ],
    ids=["wrong-type", "missing-field", "extra-field", "sections-out-of-order"],
)
def test_bad_header_rejected(path, change, message):
    write_snapshot(path, _snapshot())
    _rewrite_header(path, change)

    with pytest.raises(SnapshotError, match=message):
        read_snapshot(path)


def test_header_that_is_not_json(path):
    path.write_bytes(MAGIC + (5).to_bytes(8, "little") + b"{nope")

    with pytest.raises(SnapshotError, match="not valid JSON"):
        read_snapshot(path)


def test_remove_temp_file(path):
    temp = path.with_name(path.name + TEMP_SUFFIX)
    temp.write_bytes(b"half a snapshot")

    assert remove_temp_file(path)
    assert not temp.exists()
    assert not remove_temp_file(path)


def test_vectors_not_matching_dim(path):
    write_snapshot(path, _snapshot())
    _rewrite_header(path, lambda header: header.update(dim=5))

    with pytest.raises(SnapshotError, match="48 vector components, which is no multiple of its dim 5"):
        read_snapshot(path)
