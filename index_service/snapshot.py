"""The snapshot file of the faiss and pHash indexes: its format, and its atomic write and checked read.

A snapshot is one file, DATA_DIR/index.snapshot:

    MAGIC                                 the format's name and version, ending in a newline
    header length                         8 bytes, unsigned little-endian
    header                                UTF-8 JSON: the SnapshotHeader fields, and per section
                                          its name, byte length and CRC-32
    sections                              their bytes, back to back, in the header's order

The sections are the row ids (int64) and vectors (float32, row after row) of the faiss index,
its faiss serialisation (bytes) and masked row ids (int64), then the row ids (int64), pHashes
(uint64) and fingerprint versions (uint32) of the pHash index, all little-endian. A flat float32
index is written as raw vectors, because they load faster than faiss's own serialisation and take
less time to copy out while adds and removals wait. Any other layout is written serialised, so
that a trained index is not trained again at start (see vector_index.IndexState). The CRC-32s catch a torn or damaged file.
They do not guard against a forged one, since only this service writes into its data folder.

write_snapshot writes a temporary file in the same folder, fsyncs it, renames it over the old
snapshot with os.replace and fsyncs the folder, so after a crash the folder contains the old
snapshot or the new one, never a part of one.
"""

import dataclasses
import json
import os
import zlib
from concurrent import futures
from pathlib import Path

import numpy as np

FILE_NAME = "index.snapshot"
TEMP_SUFFIX = ".tmp"
MAGIC = b"imgsearch-index-snapshot-v3\n"
_LENGTH_BYTES = 8
_SECTIONS = (
    ("vector_row_ids", np.dtype("<i8")),
    ("vectors", np.dtype("<f4")),
    ("vector_index", np.dtype("u1")),
    ("masked_row_ids", np.dtype("<i8")),
    ("phash_row_ids", np.dtype("<i8")),
    ("phash_values", np.dtype("<u8")),
    ("phash_versions", np.dtype("<u4")),
)
# Sections are read and checked in chunks of this many bytes.
_READ_CHUNK_BYTES = 64 * 1024 * 1024
# The header is small; a larger length means the file is not a snapshot.
_MAX_HEADER_BYTES = 1024 * 1024


class SnapshotError(Exception):
    """A snapshot file is unreadable, damaged or of another format."""


@dataclasses.dataclass(frozen=True)
class SnapshotHeader:
    """The coverage of a snapshot: the collection's model and dim, and the state of the store that it reflects.

    last_row_id and last_removal_id are the store's high-water marks when the snapshot was taken:
    it contains every item stored up to last_row_id, minus the items of removals up to
    last_removal_id.
    """

    model_id: str
    dim: int
    last_row_id: int
    last_removal_id: int
    item_count: int
    created_at: str
    # The vector index's Layout, as Layout.to_dict() gives it.
    index_layout: dict


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The header and the contents of a snapshot; vectors has shape (n, header.dim), or (0, 0) when empty."""

    header: SnapshotHeader
    vector_row_ids: np.ndarray
    vectors: np.ndarray
    vector_index: np.ndarray
    masked_row_ids: np.ndarray
    phash_row_ids: np.ndarray
    phash_values: np.ndarray
    phash_versions: np.ndarray


def write_snapshot(path: Path, snapshot: Snapshot) -> int:
    """Write snapshot to path atomically and durably (see the module docstring); return the file size."""
    sections = [np.ascontiguousarray(getattr(snapshot, name), dtype=dtype) for name, dtype in _SECTIONS]
    header = dataclasses.asdict(snapshot.header) | {
        "sections": [
            {"name": name, "bytes": section.nbytes, "crc32": zlib.crc32(section)}
            for (name, _), section in zip(_SECTIONS, sections)
        ]
    }
    header_bytes = json.dumps(header, sort_keys=True).encode("utf-8")

    temp_path = path.with_name(path.name + TEMP_SUFFIX)
    with open(temp_path, "wb") as file:
        file.write(MAGIC)
        file.write(len(header_bytes).to_bytes(_LENGTH_BYTES, "little"))
        file.write(header_bytes)
        for section in sections:
            if section.nbytes:
                file.write(memoryview(section.reshape(-1)).cast("B"))
        file.flush()
        os.fsync(file.fileno())
        size = file.tell()
    os.replace(temp_path, path)
    _fsync_folder(path.parent)
    return size


def read_snapshot(path: Path) -> Snapshot:
    """Read and check the snapshot at path.

    Raises FileNotFoundError when there is none, and SnapshotError naming the problem when the file
    is not a complete, undamaged snapshot of this format.
    """
    with open(path, "rb") as file:
        magic = file.read(len(MAGIC))
        if magic != MAGIC:
            raise SnapshotError(f"{path} does not start with {MAGIC!r}, so it is not a snapshot of this format")
        header = _read_header(file, path)
        arrays = {}
        for (name, dtype), section in zip(_SECTIONS, header.pop("sections")):
            data = _read_checked(file, section["bytes"], section["crc32"], name, path)
            arrays[name] = data.view(dtype).astype(dtype.newbyteorder("="), copy=False)
        if file.read(1):
            raise SnapshotError(f"{path} has bytes after its last section")
    checked = _checked_header(header, path)
    arrays["vectors"] = _vectors_of_dim(arrays["vectors"], checked.dim, path)
    return Snapshot(header=checked, **arrays)


def _read_checked(file, size: int, crc32: int, name: str, path: Path) -> np.ndarray:
    """Read size bytes of section name into a new uint8 array and check their CRC-32; raise SnapshotError if not.

    The CRC of each chunk is computed on another thread while the next chunk is read, since both
    release the GIL, so a large section costs little more than its read.
    """
    data = np.empty(size, dtype=np.uint8)
    crc = 0
    with futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-crc") as checker:
        pending = None
        for start in range(0, size, _READ_CHUNK_BYTES):
            chunk = memoryview(data[start : start + _READ_CHUNK_BYTES])
            if file.readinto(chunk) != len(chunk):
                raise SnapshotError(f"{path} ends inside section {name}: it is truncated")
            crc = pending.result() if pending else crc
            pending = checker.submit(zlib.crc32, chunk, crc)
        crc = pending.result() if pending else crc
    if crc != crc32:
        raise SnapshotError(f"section {name} of {path} fails its CRC-32 check: the file is damaged")
    return data


def remove_temp_file(path: Path) -> bool:
    """Delete the temporary file that a write interrupted by a crash left beside path; return whether there was one."""
    try:
        path.with_name(path.name + TEMP_SUFFIX).unlink()
    except FileNotFoundError:
        return False
    return True


def _read_header(file, path: Path) -> dict:
    length = int.from_bytes(file.read(_LENGTH_BYTES), "little")
    if not 0 < length <= _MAX_HEADER_BYTES:
        raise SnapshotError(f"{path} has a header length of {length} bytes, so it is damaged")
    try:
        header = json.loads(file.read(length).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SnapshotError(f"the header of {path} is not valid JSON: {error}") from error
    names = [section.get("name") for section in header.get("sections", [])]
    if names != [name for name, _ in _SECTIONS]:
        raise SnapshotError(f"{path} has sections {names}, expected {[name for name, _ in _SECTIONS]}")
    return header


def _checked_header(fields: dict, path: Path) -> SnapshotHeader:
    expected = {field.name: field.type for field in dataclasses.fields(SnapshotHeader)}
    if set(fields) != set(expected):
        raise SnapshotError(f"the header of {path} has fields {sorted(fields)}, expected {sorted(expected)}")
    for name, kind in expected.items():
        if type(fields[name]) is not kind:
            raise SnapshotError(f"the header field {name} of {path} is not of type {kind.__name__}")
    return SnapshotHeader(**fields)


def _vectors_of_dim(values: np.ndarray, dim: int, path: Path) -> np.ndarray:
    if len(values) == 0:
        return values.reshape(0, 0)
    if dim <= 0 or len(values) % dim:
        raise SnapshotError(f"{path} has {len(values)} vector components, which is no multiple of its dim {dim}")
    return values.reshape(-1, dim)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in folder durable, as POSIX requires: fsync the folder itself."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
