"""Tests for the request id helpers of imgsearch_common.rpc_log."""

import structlog

from imgsearch_common.rpc_log import REQUEST_ID_KEY, outgoing_metadata, request_id_of


class _FakeContext:
    """The part of grpc.ServicerContext that request_id_of reads."""

    def __init__(self, metadata):
        self._metadata = metadata

    def invocation_metadata(self):
        return self._metadata


def test_request_id_of_reads_metadata():
    context = _FakeContext([("user-agent", "grpc-python"), (REQUEST_ID_KEY, "abc-123")])

    assert request_id_of(context) == "abc-123"


def test_request_id_of_generates_when_missing():
    first = request_id_of(_FakeContext([("user-agent", "grpc-python")]))
    second = request_id_of(_FakeContext(None))

    assert len(first) == 32
    assert len(second) == 32
    assert first != second


def test_request_id_of_ignores_empty_value():
    request_id = request_id_of(_FakeContext([(REQUEST_ID_KEY, "")]))

    assert request_id != ""


def test_outgoing_metadata_carries_bound_id():
    with structlog.contextvars.bound_contextvars(request_id="ingest-42"):
        metadata = outgoing_metadata()

    assert metadata == ((REQUEST_ID_KEY, "ingest-42"),)


def test_outgoing_metadata_empty_outside_rpc():
    assert outgoing_metadata() == ()


def test_outgoing_metadata_empty_after_context_ends():
    with structlog.contextvars.bound_contextvars(request_id="ingest-43"):
        pass

    assert outgoing_metadata() == ()
