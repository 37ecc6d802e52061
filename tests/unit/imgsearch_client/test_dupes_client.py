"""Tests of IndexClient.find_duplicates against a fake IndexService on 127.0.0.1."""

import grpc
import pytest

from imgsearch.index.v1 import index_service_pb2 as pb
from imgsearch_client.client import (
    ClientError,
    DuplicateCriteria,
    DuplicateGroup,
    DuplicateMember,
    DuplicatesProgress,
    DuplicatesSummary,
    IndexClient,
)
from tests.unit.imgsearch_client.dupes_fakes import FakeIndexService, canned_stream, member, running, write_photos


@pytest.fixture
def paths(tmp_path):
    return write_photos(tmp_path / "photos")


def test_events_arrive_as_dataclasses_in_order(paths):
    with running(FakeIndexService(canned_stream(paths))) as addr, IndexClient(addr) as client:
        events = list(client.find_duplicates())

    assert events[0] == DuplicatesProgress(items_done=0, item_count=9)
    assert events[1] == DuplicatesProgress(items_done=9, item_count=9)
    assert [event.kind for event in events[2:5]] == ["exact", "near", "similar"]
    near = events[3]
    assert isinstance(near, DuplicateGroup)
    assert near.members[0] == DuplicateMember(
        item_id="b1", uri=str(paths["b1"]), score=1.0, phash_distance=0, local_difference=0.0, width=320, height=200
    )
    assert near.members[1].score == pytest.approx(0.987654)
    assert near.members[1].phash_distance == 3
    assert near.members[1].local_difference == pytest.approx(0.4321)
    assert events[5] == DuplicatesSummary(
        item_count=9, group_counts={"exact": 1, "near": 1, "similar": 1}, grouped_item_count=6
    )


def test_default_criteria_send_empty_request():
    fake = FakeIndexService([])
    with running(fake) as addr, IndexClient(addr) as client:
        list(client.find_duplicates())

    request = fake.requests[0]
    assert list(request.kinds) == []
    assert request.k == 0
    assert not request.HasField("min_similar_score")
    assert not request.HasField("near_duplicate_policy")


def test_criteria_fill_every_request_field():
    fake = FakeIndexService([])
    criteria = DuplicateCriteria(
        kinds=("near", "similar"), k=25, min_similar_score=0.9, max_phash_distance=12,
        max_local_difference=1.5, min_score=-1.0,
    )
    with running(fake) as addr, IndexClient(addr) as client:
        list(client.find_duplicates(criteria))

    request = fake.requests[0]
    assert list(request.kinds) == [pb.MATCH_KIND_NEAR, pb.MATCH_KIND_SIMILAR]
    assert request.k == 25
    assert request.min_similar_score == pytest.approx(0.9)
    policy = request.near_duplicate_policy
    assert policy.max_phash_distance == 12
    assert policy.max_local_difference == pytest.approx(1.5)
    assert policy.min_score == pytest.approx(-1.0)


def test_zero_thresholds_are_sent_not_dropped():
    fake = FakeIndexService([])
    with running(fake) as addr, IndexClient(addr) as client:
        list(client.find_duplicates(DuplicateCriteria(max_phash_distance=0, max_local_difference=0.0,
                                                      min_similar_score=0.0)))

    request = fake.requests[0]
    assert request.HasField("min_similar_score")
    assert request.near_duplicate_policy.HasField("max_phash_distance")
    assert request.near_duplicate_policy.HasField("max_local_difference")
    assert not request.near_duplicate_policy.HasField("min_score")


@pytest.mark.parametrize(
    ("criteria", "message"),
    [
        (DuplicateCriteria(kinds=("exact", "blurry")), "unknown duplicate kind 'blurry'"),
        (DuplicateCriteria(k=-1), "k must be from 0 to"),
        (DuplicateCriteria(max_phash_distance=-2), "max_phash_distance must be from 0 to"),
    ],
)
def test_bad_criteria_raise_value_error_before_sending(criteria, message):
    fake = FakeIndexService([])
    with running(fake) as addr, IndexClient(addr) as client, pytest.raises(ValueError, match=message):
        list(client.find_duplicates(criteria))

    assert fake.requests == []


def test_server_error_becomes_client_error_with_status():
    fake = FakeIndexService([])
    fake.abort_after = 0
    with running(fake) as addr, IndexClient(addr) as client, pytest.raises(ClientError) as raised:
        list(client.find_duplicates(DuplicateCriteria(max_phash_distance=64)))

    assert raised.value.code == "INVALID_ARGUMENT"
    assert raised.value.message == "max_phash_distance must be at most 64"


def test_error_mid_stream_keeps_events_already_yielded(paths):
    fake = FakeIndexService(canned_stream(paths))
    fake.abort_after = 3
    fake.abort_code = grpc.StatusCode.UNAVAILABLE
    fake.abort_message = "embed service is down"
    received = []
    with running(fake) as addr, IndexClient(addr) as client, pytest.raises(ClientError) as raised:
        for event in client.find_duplicates():
            received.append(event)

    assert raised.value.code == "UNAVAILABLE"
    assert len(received) == 3
    assert received[2].kind == "exact"


def test_deadline_exceeded_when_stream_is_slow(paths):
    fake = FakeIndexService(canned_stream(paths))
    fake.delay_s = 0.5
    with running(fake) as addr, IndexClient(addr) as client, pytest.raises(ClientError) as raised:
        list(client.find_duplicates(timeout_s=0.3))

    assert raised.value.code == "DEADLINE_EXCEEDED"


def test_closed_port_is_unavailable():
    with IndexClient("127.0.0.1:1") as client, pytest.raises(ClientError) as raised:
        list(client.find_duplicates(timeout_s=5))

    assert raised.value.code == "UNAVAILABLE"


def test_unknown_kind_number_stays_visible():
    group = pb.DuplicateGroup(kind=7, members=[member("x", "")])
    with running(FakeIndexService([pb.FindDuplicatesResponse(group=group)])) as addr, IndexClient(addr) as client:
        events = list(client.find_duplicates())

    assert len(events) == 1
    assert events[0].kind == "unknown (7)"
    assert events[0].members[0].item_id == "x"


def test_message_without_event_is_skipped():
    summary = pb.FindDuplicatesSummary(item_count=3)
    responses = [pb.FindDuplicatesResponse(), pb.FindDuplicatesResponse(summary=summary)]
    with running(FakeIndexService(responses)) as addr, IndexClient(addr) as client:
        events = list(client.find_duplicates())

    assert events == [DuplicatesSummary(item_count=3, group_counts={}, grouped_item_count=0)]
