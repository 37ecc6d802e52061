"""Tests of the per-item error and fingerprint conversions of index_service.embed_client."""

import grpc
import pytest

from imgsearch.common.v1 import common_pb2
from imgsearch_common import errors
from imgsearch_common.fingerprints import FINGERPRINT_VERSION, LAYOUT_BYTES, Fingerprint
from index_service.embed_client import fingerprint_of, item_error_to_exception


@pytest.mark.parametrize(
    ("code", "error_type"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidInputError),
        (grpc.StatusCode.NOT_FOUND, errors.NotFoundError),
        (grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyExistsError),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPreconditionError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.TooLargeError),
        (grpc.StatusCode.UNAVAILABLE, errors.UnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceededError),
        (grpc.StatusCode.INTERNAL, errors.UnavailableError),
        (grpc.StatusCode.UNKNOWN, errors.UnavailableError),
    ],
)
def test_item_error_to_exception(code, error_type):
    error = item_error_to_exception(code.value[0], code.name, "image could not be decoded")

    assert type(error) is error_type
    assert code.name in str(error)
    assert "image could not be decoded" in str(error)


def _fingerprint_message(**fields) -> common_pb2.ImageFingerprint:
    defaults = {
        "version": FINGERPRINT_VERSION,
        "pixel_sha256": "ab" * 32,
        "phash": 2**64 - 1,
        "width": 40,
        "height": 30,
        "layout": b"\x07" * LAYOUT_BYTES,
    }
    return common_pb2.ImageFingerprint(**(defaults | fields))


def test_fingerprint_of_converts_every_field():
    fingerprint = fingerprint_of(_fingerprint_message())

    assert fingerprint == Fingerprint(
        version=FINGERPRINT_VERSION,
        pixel_sha256="ab" * 32,
        phash=2**64 - 1,
        width=40,
        height=30,
        layout=b"\x07" * LAYOUT_BYTES,
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"version": FINGERPRINT_VERSION + 1}, f"version {FINGERPRINT_VERSION + 1} is not the supported"),
        ({"version": 0}, "version 0 is not the supported"),
        ({"pixel_sha256": "AB" * 32}, "not 64 lowercase hex digits"),
        ({"pixel_sha256": "ab"}, "not 64 lowercase hex digits"),
        ({"layout": b"\x00" * 10}, f"layout has 10 bytes, expected {LAYOUT_BYTES}"),
    ],
    ids=["newer-version", "no-version", "upper-case-hash", "short-hash", "short-layout"],
)
def test_fingerprint_of_rejects_unusable(fields, message):
    with pytest.raises(ValueError, match=message):
        fingerprint_of(_fingerprint_message(**fields))
