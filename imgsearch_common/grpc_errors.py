"""The one table that maps domain exceptions to gRPC status codes, and helpers that apply it."""

import functools

import grpc
import structlog

from imgsearch.common.v1 import common_pb2
from imgsearch_common import errors

log = structlog.get_logger(__name__)

_STATUS_BY_ERROR = {
    errors.InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.TooLargeError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.UnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
}

_INTERNAL_MESSAGE = "internal error; the server logged the details"


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """Return the status code and message that a caller sees for an exception."""
    for error_type, code in _STATUS_BY_ERROR.items():
        if isinstance(error, error_type):
            return code, str(error)
    return grpc.StatusCode.INTERNAL, _INTERNAL_MESSAGE


def item_error(error: BaseException) -> common_pb2.ItemError:
    """Convert an exception into the per-item error of a stream response."""
    code, message = status_for(error)
    if code is grpc.StatusCode.INTERNAL:
        log.error("item_failed_unexpectedly", exc_info=error)
    return common_pb2.ItemError(code=code.value[0], code_name=code.name, message=message)


def item_error_from_status(code: grpc.StatusCode, message: str) -> common_pb2.ItemError:
    """Build a per-item error from a status code and message."""
    return common_pb2.ItemError(code=code.value[0], code_name=code.name, message=message)


def abort_on_error(method):
    """Wrap a unary servicer method so that domain errors abort the call with their status.

    Unexpected exceptions become INTERNAL with a generic message, and their traceback is logged.
    """

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as error:  # noqa: BLE001 - _abort_for maps every exception to a status
            _abort_for(error, context, method.__name__)

    return wrapper


def abort_on_stream_error(method):
    """Wrap a response-streaming servicer method as abort_on_error wraps a unary one.

    Responses already sent stay sent; the error then ends the stream with its status.
    """

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            yield from method(self, request, context)
        except Exception as error:  # noqa: BLE001 - _abort_for maps every exception to a status
            _abort_for(error, context, method.__name__)

    return wrapper


def _abort_for(error: Exception, context: grpc.ServicerContext, method_name: str) -> None:
    """Abort the call with the status of a domain error, or with INTERNAL and the traceback logged."""
    if isinstance(error, errors.ImgsearchError):
        code, message = status_for(error)
        context.abort(code, message)
    if context.code() is not None:
        raise error  # context.abort() raises too; keep the status it set.
    log.error("rpc_failed_unexpectedly", method=method_name, exc_info=error)
    context.abort(grpc.StatusCode.INTERNAL, _INTERNAL_MESSAGE)
