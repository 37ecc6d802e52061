"""Tests of the conversions and the stop check of index_service.servicer."""

import pytest

from imgsearch.common.v1 import common_pb2
from imgsearch.index.v1 import index_service_pb2
from imgsearch_common.errors import DeadlineExceededError, InvalidInputError
from index_service.duplicates import MatchKind, OnDuplicate, PolicyOverrides
from index_service.servicer import _CallEnded, _ingest_item_of, _overrides_of, _stop_check


class _FakeContext:
    """The two ServicerContext methods that the stop check reads."""

    def __init__(self, time_remaining, active=True):
        self._time_remaining = time_remaining
        self.active = active

    def time_remaining(self):
        return self._time_remaining

    def is_active(self):
        return self.active


@pytest.mark.parametrize("time_remaining", [None, 0.5])
def test_stop_check_passes_while_active(time_remaining):
    _stop_check(_FakeContext(time_remaining))()


@pytest.mark.parametrize("time_remaining", [0.0, -1.0])
def test_stop_check_at_deadline(time_remaining):
    with pytest.raises(DeadlineExceededError, match="FindDuplicates timed out before it finished"):
        _stop_check(_FakeContext(time_remaining))()


def test_stop_check_when_caller_gone():
    with pytest.raises(_CallEnded):
        _stop_check(_FakeContext(None, active=False))()


def test_overrides_of_unset_policy():
    assert _overrides_of(index_service_pb2.NearDuplicatePolicy()) == PolicyOverrides()


def test_overrides_of_set_fields_including_zero():
    policy = index_service_pb2.NearDuplicatePolicy(max_phash_distance=0, max_local_difference=0.0, min_score=-1.0)

    assert _overrides_of(policy) == PolicyOverrides(max_phash_distance=0, max_local_difference=0.0, min_score=-1.0)


@pytest.mark.parametrize(
    ("fields", "on_duplicate", "duplicate_match"),
    [
        ({}, OnDuplicate.SKIP, MatchKind.EXACT),
        ({"on_duplicate": index_service_pb2.ON_DUPLICATE_ADD}, OnDuplicate.ADD, MatchKind.EXACT),
        ({"on_duplicate": index_service_pb2.ON_DUPLICATE_REJECT}, OnDuplicate.REJECT, MatchKind.EXACT),
        ({"duplicate_match": index_service_pb2.MATCH_KIND_NEAR}, OnDuplicate.SKIP, MatchKind.NEAR),
        ({"duplicate_match": index_service_pb2.MATCH_KIND_SIMILAR}, OnDuplicate.SKIP, MatchKind.SIMILAR),
    ],
    ids=["defaults", "add", "reject", "near", "similar-left-to-core"],
)
def test_ingest_item_of_duplicate_fields(fields, on_duplicate, duplicate_match):
    item = _ingest_item_of(index_service_pb2.IngestImagesRequest(image=b"x", **fields))

    assert (item.on_duplicate, item.duplicate_match) == (on_duplicate, duplicate_match)


def test_ingest_item_of_unknown_values():
    with pytest.raises(InvalidInputError, match="on_duplicate 9 is not a known OnDuplicate value"):
        _ingest_item_of(index_service_pb2.IngestImagesRequest(on_duplicate=9))
    with pytest.raises(InvalidInputError, match="duplicate_match 9 is not a known MatchKind value"):
        _ingest_item_of(index_service_pb2.IngestImagesRequest(duplicate_match=9))


def test_ingest_item_of_embedding():
    request = index_service_pb2.IngestImagesRequest(
        item_id="vec-1", embedding=common_pb2.Embedding(values=[0.5, -0.5], model_id="clip")
    )

    item = _ingest_item_of(request)

    assert (item.image, item.embedding, item.model_id, item.item_id) == (b"", [0.5, -0.5], "clip", "vec-1")


def test_ingest_item_of_embedding_without_values():
    request = index_service_pb2.IngestImagesRequest(embedding=common_pb2.Embedding(model_id="clip"))

    assert _ingest_item_of(request).embedding == []


def test_ingest_item_of_image_or_nothing():
    assert _ingest_item_of(index_service_pb2.IngestImagesRequest(image=b"png")).embedding is None
    unset = _ingest_item_of(index_service_pb2.IngestImagesRequest(uri="no content"))
    assert (unset.image, unset.embedding) == (b"", None)
