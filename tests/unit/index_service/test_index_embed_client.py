"""Tests of the per-item error conversion of index_service.embed_client."""

import grpc
import pytest

from imgsearch_common import errors
from index_service.embed_client import item_error_to_exception


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
