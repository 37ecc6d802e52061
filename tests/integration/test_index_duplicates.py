"""Duplicate labels, ingest modes and FindDuplicates of the index service over gRPC, with a fake embed service."""

import math
import time

import grpc
import pytest

from imgsearch.common.v1 import common_pb2
from imgsearch.index.v1 import index_service_pb2
from index_service import audit
from index_service.config import IndexConfig
from tests.unit.index_service.index_fakes import (
    lossless_copy,
    near_copy,
    scene_jpeg,
    thumbnail_vector,
    write_old_store,
)
from tests.unit.index_service.index_servers import FakeEmbedService, serve_fake_embed, start_index_service

pytestmark = pytest.mark.integration

_DIM = 16
_MODEL_ID = "fake-clip"
_MAX_MESSAGE_BYTES = 1024 * 1024
_SLOW_MEASURE_S = 0.05
# Makes all 66 pairs of the synthetic set near-duplicate candidates, so the audit measures each.
_EVERY_PAIR_A_CANDIDATE = index_service_pb2.NearDuplicatePolicy(max_phash_distance=64, min_score=-1.0)

ADDED = index_service_pb2.INGEST_STATUS_ADDED
ALREADY_PRESENT = index_service_pb2.INGEST_STATUS_ALREADY_PRESENT
FAILED = index_service_pb2.INGEST_STATUS_FAILED
EXACT = index_service_pb2.MATCH_KIND_EXACT
NEAR = index_service_pb2.MATCH_KIND_NEAR
SIMILAR = index_service_pb2.MATCH_KIND_SIMILAR
UNSPECIFIED = index_service_pb2.MATCH_KIND_UNSPECIFIED
ADD = index_service_pb2.ON_DUPLICATE_ADD
REJECT = index_service_pb2.ON_DUPLICATE_REJECT


@pytest.fixture
def embed_service():
    handle = serve_fake_embed(FakeEmbedService(dim=_DIM, model_id=_MODEL_ID), _MAX_MESSAGE_BYTES)
    yield handle
    handle.stop()


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "index"


@pytest.fixture
def index_config_for(embed_service):
    """Return a function that builds the config of an index service over data_dir, on 127.0.0.1:0."""

    def config_for(data_dir):
        return IndexConfig(
            listen="127.0.0.1:0",
            embed_addr=embed_service.address,
            data_dir=data_dir,
            embed_timeout_s=5.0,
            max_k=50,
            ingest_batch_size=4,
            max_message_bytes=_MAX_MESSAGE_BYTES,
            max_image_bytes=200_000,
            max_image_pixels=1_000_000,
            max_workers=4,
            device="cpu",
            grace_s=0.0,
        )

    return config_for


@pytest.fixture
def index(index_config_for, data_dir):
    handle = start_index_service(index_config_for(data_dir))
    yield handle
    handle.stop()


def _request(image, item_id="", **fields):
    return index_service_pb2.IngestImagesRequest(image=image, item_id=item_id, uri=f"mem://{item_id}", **fields)


def _store_synthetic_set(index):
    """Store 6 originals, exact copies of 0 and 1, near copies of 2 and 3, and 2 unrelated scenes."""
    requests = [_request(scene_jpeg(seed), f"original-{seed}") for seed in range(6)]
    requests += [
        _request(lossless_copy(scene_jpeg(0)), "exact-0", on_duplicate=ADD),
        _request(lossless_copy(scene_jpeg(1)), "exact-1", on_duplicate=ADD),
        _request(near_copy(scene_jpeg(2)), "near-2"),
        _request(near_copy(scene_jpeg(3)), "near-3"),
        _request(scene_jpeg(20), "unrelated-20"),
        _request(scene_jpeg(21), "unrelated-21"),
    ]
    responses = index.ingest(requests)
    assert [response.status for response in responses] == [ADDED] * 12
    return responses


def _groups(responses):
    return [
        (response.group.kind, [member.item_id for member in response.group.members])
        for response in responses
        if response.WhichOneof("event") == "group"
    ]


def _assert_rpc_fails(call, code, message_part):
    with pytest.raises(grpc.RpcError) as raised:
        call()
    assert raised.value.code() is code
    assert message_part in raised.value.details()


# Search


def test_search_labels_matches(index):
    index.ingest([_request(scene_jpeg(seed), f"scene-{seed}") for seed in (1, 2, 3)])

    exact = index.search(image=lossless_copy(scene_jpeg(1)), k=3).neighbours
    near = index.search(image=near_copy(scene_jpeg(1)), k=3).neighbours

    assert exact[0].item_id == "scene-1"
    assert [n.match for n in exact] == [EXACT, SIMILAR, SIMILAR]
    assert (exact[0].phash_distance, exact[0].local_difference) == (0, 0.0)
    assert exact[0].HasField("local_difference")
    assert near[0].item_id == "scene-1"
    assert [n.match for n in near] == [NEAR, SIMILAR, SIMILAR]
    assert near[0].phash_distance <= 6
    assert 0.0 < near[0].local_difference <= 0.43
    assert all(n.HasField("phash_distance") for n in near)


def test_search_by_embedding_is_unspecified(index):
    index.ingest([_request(scene_jpeg(seed), f"scene-{seed}") for seed in (1, 2)])
    embedding = common_pb2.Embedding(values=thumbnail_vector(scene_jpeg(1), _DIM).tolist())

    neighbours = index.search(embedding=embedding, k=2).neighbours

    assert [n.match for n in neighbours] == [UNSPECIFIED, UNSPECIFIED]
    assert not any(n.HasField("phash_distance") or n.HasField("local_difference") for n in neighbours)


def test_search_by_item_id_labels_copies(index):
    index.ingest([_request(scene_jpeg(1), "scene-1"), _request(near_copy(scene_jpeg(1)), "copy")])

    neighbours = index.search(item_id="scene-1", k=2).neighbours

    assert [(n.item_id, n.match) for n in neighbours] == [("scene-1", EXACT), ("copy", NEAR)]


def test_search_policy_override(index):
    index.ingest([_request(scene_jpeg(1), "scene-1")])
    strict = index_service_pb2.NearDuplicatePolicy(max_local_difference=0.01)

    [neighbour] = index.search(image=near_copy(scene_jpeg(1)), k=1, near_duplicate_policy=strict).neighbours

    assert neighbour.match == SIMILAR


@pytest.mark.parametrize(
    ("policy", "message_part"),
    [
        ({"max_phash_distance": 65}, "max_phash_distance must be between 0 and 64, got 65"),
        ({"max_local_difference": -0.5}, "max_local_difference must be a number of at least 0"),
        ({"max_local_difference": math.nan}, "max_local_difference must be a number of at least 0"),
        ({"min_score": 1.5}, "min_score must be a number between -1 and 1"),
        ({"min_score": -2.0}, "min_score must be a number between -1 and 1"),
    ],
    ids=["phash", "local-negative", "local-nan", "score-above", "score-below"],
)
def test_search_rejects_bad_policy(index, policy, message_part):
    index.ingest([_request(scene_jpeg(1), "scene-1")])
    request_policy = index_service_pb2.NearDuplicatePolicy(**policy)

    _assert_rpc_fails(
        lambda: index.search(item_id="scene-1", near_duplicate_policy=request_policy),
        grpc.StatusCode.INVALID_ARGUMENT,
        message_part,
    )


# IngestImages


def test_ingest_duplicate_modes(index):
    index.ingest([_request(scene_jpeg(1), "scene-1"), _request(scene_jpeg(2), "scene-2")])

    responses = index.ingest(
        [
            _request(lossless_copy(scene_jpeg(1), "a"), "skipped"),
            _request(lossless_copy(scene_jpeg(1), "b"), "rejected", on_duplicate=REJECT),
            _request(lossless_copy(scene_jpeg(1), "c"), "added", on_duplicate=ADD),
            _request(near_copy(scene_jpeg(2)), "near-skipped", duplicate_match=NEAR),
            _request(near_copy(scene_jpeg(1)), "near-exact-scope"),
        ]
    )

    assert [r.status for r in responses] == [ALREADY_PRESENT, FAILED, ADDED, ALREADY_PRESENT, ADDED]
    assert [r.item_id for r in responses] == ["scene-1", "", "added", "scene-2", "near-exact-scope"]
    assert [r.duplicate_of_item_id for r in responses] == ["scene-1", "scene-1", "scene-1", "scene-2", ""]
    assert [r.duplicate_match for r in responses] == [EXACT, EXACT, EXACT, NEAR, UNSPECIFIED]
    assert responses[1].error.code_name == "ALREADY_EXISTS"
    assert "'scene-1' (match exact)" in responses[1].error.message
    assert [r.uri for r in responses] == [
        "mem://skipped", "mem://rejected", "mem://added", "mem://near-skipped", "mem://near-exact-scope",
    ]
    assert index.stats().item_count == 4


def test_ingest_rejects_bad_duplicate_fields(index):
    responses = index.ingest(
        [
            _request(scene_jpeg(1), "bad-on-duplicate", on_duplicate=7),
            _request(scene_jpeg(2), "similar-scope", duplicate_match=SIMILAR),
            _request(scene_jpeg(3), "unknown-scope", duplicate_match=9),
            _request(scene_jpeg(4), "good"),
        ]
    )

    assert [r.status for r in responses] == [FAILED, FAILED, FAILED, ADDED]
    assert [r.error.code_name for r in responses] == ["INVALID_ARGUMENT"] * 3 + [""]
    assert "on_duplicate 7 is not a known OnDuplicate value" in responses[0].error.message
    assert "duplicate_match must be EXACT or NEAR, got SIMILAR" in responses[1].error.message
    assert "duplicate_match 9 is not a known MatchKind value" in responses[2].error.message
    assert [r.uri for r in responses] == ["mem://bad-on-duplicate", "mem://similar-scope", "mem://unknown-scope", "mem://good"]


def test_ingest_from_embed_service_without_fingerprints(index, embed_service):
    embed_service.servicer.with_fingerprints = False
    index.ingest([_request(scene_jpeg(1), "scene-1")])

    [response] = index.ingest([_request(lossless_copy(scene_jpeg(1)), "copy", on_duplicate=REJECT)])
    neighbours = index.search(image=scene_jpeg(1), k=2).neighbours

    assert response.status == ADDED
    assert response.duplicate_of_item_id == ""
    assert [n.match for n in neighbours] == [UNSPECIFIED, UNSPECIFIED]


# FindDuplicates


def test_find_duplicates_groups_and_summary(index):
    _store_synthetic_set(index)

    responses = index.find_duplicates()

    assert responses[0].WhichOneof("event") == "progress"
    assert (responses[0].progress.items_done, responses[0].progress.item_count) == (12, 12)
    assert _groups(responses) == [
        (EXACT, ["original-0", "exact-0"]),
        (EXACT, ["original-1", "exact-1"]),
        (NEAR, ["original-2", "near-2"]),
        (NEAR, ["original-3", "near-3"]),
    ]
    summary = responses[-1].summary
    assert responses[-1].WhichOneof("event") == "summary"
    assert summary.item_count == 12
    assert dict(summary.group_counts) == {"MATCH_KIND_EXACT": 2, "MATCH_KIND_NEAR": 2}
    assert summary.grouped_item_count == 8


@pytest.fixture
def slow_local_differences(monkeypatch):
    """Make each local difference of the audit take _SLOW_MEASURE_S, with a stop check before each one.

    Returns the monotonic times at which the measurements began.
    """
    begun = []
    measure = audit.local_differences

    def slow_measure(first_layouts, second_layouts):
        begun.append(time.monotonic())
        time.sleep(_SLOW_MEASURE_S)
        return measure(first_layouts, second_layouts)

    monkeypatch.setattr(audit, "_MEASURE_CHUNK", 1)
    monkeypatch.setattr(audit, "local_differences", slow_measure)
    return begun


def test_find_duplicates_members(index):
    _store_synthetic_set(index)

    groups = [r.group for r in index.find_duplicates(kinds=[NEAR]) if r.WhichOneof("event") == "group"]

    first, copy = groups[0].members
    assert (first.item_id, first.uri, first.score, first.phash_distance, first.local_difference) == (
        "original-2", "mem://original-2", pytest.approx(1.0), 0, 0.0,
    )
    assert (first.width, first.height) == (128, 96)
    assert (copy.item_id, copy.width, copy.height) == ("near-2", 64, 48)
    assert copy.score > 0.99
    assert copy.phash_distance <= 6
    assert 0.0 < copy.local_difference <= 0.43


def test_find_duplicates_similar(index, embed_service):
    _store_synthetic_set(index)

    responses = index.find_duplicates(kinds=[SIMILAR], min_similar_score=-1.0, k=1)

    # With any score similar enough, each item links to its nearest neighbour unless the two are
    # exact or near copies, so the groups cover some items but never just such a pair.
    groups = _groups(responses)
    copies = [{"original-0", "exact-0"}, {"original-1", "exact-1"}, {"original-2", "near-2"}, {"original-3", "near-3"}]
    assert groups
    assert all(kind == SIMILAR and len(members) >= 2 for kind, members in groups)
    assert all(set(members) not in copies for _, members in groups)
    assert dict(responses[-1].summary.group_counts) == {"MATCH_KIND_SIMILAR": len(groups)}
    assert responses[-1].summary.grouped_item_count == sum(len(members) for _, members in groups)


@pytest.mark.parametrize(
    ("fields", "message_part"),
    [
        ({"kinds": [UNSPECIFIED]}, "kinds must list"),
        ({"kinds": [7]}, "kinds 7 is not a known MatchKind value"),
        ({"k": 51}, "k is 51, outside 0 to 50"),
        ({"min_similar_score": 1.5}, "min_similar_score must be a number between -1 and 1"),
        ({"near_duplicate_policy": {"max_phash_distance": 70}}, "max_phash_distance must be between 0 and 64"),
        ({"near_duplicate_policy": {"max_local_difference": -1}}, "max_local_difference must be a number"),
        ({"near_duplicate_policy": {"min_score": math.nan}}, "min_score must be a number between -1 and 1"),
    ],
    ids=["unspecified-kind", "unknown-kind", "k", "similar-score", "phash", "local", "score"],
)
def test_find_duplicates_rejects_bad_request(index, fields, message_part):
    _assert_rpc_fails(lambda: index.find_duplicates(**fields), grpc.StatusCode.INVALID_ARGUMENT, message_part)


def test_find_duplicates_stops_at_deadline(index, slow_local_differences):
    _store_synthetic_set(index)
    started = time.monotonic()

    _assert_rpc_fails(
        lambda: index.find_duplicates(timeout=0.5, near_duplicate_policy=_EVERY_PAIR_A_CANDIDATE),
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "Deadline",
    )
    time.sleep(1.0)  # an audit that went on would measure about 20 more pairs meanwhile

    assert len(slow_local_differences) >= 1
    assert max(slow_local_differences) - started < 0.5 + _SLOW_MEASURE_S + 0.6


def test_find_duplicates_stops_when_cancelled(index, slow_local_differences):
    _store_synthetic_set(index)
    request = index_service_pb2.FindDuplicatesRequest(near_duplicate_policy=_EVERY_PAIR_A_CANDIDATE)

    responses = index.stub.FindDuplicates(request, timeout=30)
    time.sleep(0.3)
    responses.cancel()
    cancelled = time.monotonic()
    time.sleep(1.0)

    assert len(slow_local_differences) >= 1
    assert max(slow_local_differences) - cancelled < _SLOW_MEASURE_S + 0.3


# Migration


def test_old_store_is_migrated(embed_service, data_dir, index_config_for):
    old_vectors = [thumbnail_vector(scene_jpeg(1), _DIM), thumbnail_vector(scene_jpeg(2), _DIM)]
    write_old_store(data_dir, old_vectors, model_id=_MODEL_ID)
    index = start_index_service(index_config_for(data_dir))
    try:
        stats = index.stats()
        by_image = index.search(image=scene_jpeg(1), k=3).neighbours
        [skipped_copy] = index.ingest([_request(lossless_copy(scene_jpeg(1)), "copy-of-old")])
        [new] = index.ingest([_request(scene_jpeg(3), "new")])
        [new_copy] = index.ingest([_request(lossless_copy(scene_jpeg(3)), "copy-of-new")])
        duplicates = index.find_duplicates(kinds=[EXACT, NEAR])
    finally:
        index.stop()

    assert (stats.item_count, stats.dim, stats.model_id) == (2, _DIM, _MODEL_ID)
    assert by_image[0].item_id == "old-0"
    assert [n.match for n in by_image] == [UNSPECIFIED, UNSPECIFIED]
    assert (skipped_copy.status, skipped_copy.duplicate_of_item_id) == (ADDED, "")
    assert new.status == ADDED
    assert (new_copy.status, new_copy.item_id, new_copy.duplicate_match) == (ALREADY_PRESENT, "new", EXACT)
    assert _groups(duplicates) == []
    assert duplicates[-1].summary.item_count == 4


def test_restart_rebuilds_phash_index(index_config_for, data_dir):
    first = start_index_service(index_config_for(data_dir))
    try:
        first.ingest([_request(scene_jpeg(seed), f"scene-{seed}") for seed in (1, 2, 3)])
    finally:
        first.stop()

    second = start_index_service(index_config_for(data_dir))
    try:
        [skipped] = second.ingest([_request(near_copy(scene_jpeg(2)), "copy", duplicate_match=NEAR)])
        [added] = second.ingest([_request(near_copy(scene_jpeg(2)), "copy", duplicate_match=NEAR, on_duplicate=ADD)])
        groups = _groups(second.find_duplicates())
    finally:
        second.stop()

    assert (skipped.status, skipped.duplicate_of_item_id, skipped.duplicate_match) == (ALREADY_PRESENT, "scene-2", NEAR)
    assert (added.status, added.duplicate_of_item_id) == (ADDED, "scene-2")
    assert groups == [(NEAR, ["scene-2", "copy"])]
