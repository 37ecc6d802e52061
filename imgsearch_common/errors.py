"""Domain exceptions raised by the cores; the gRPC edge maps each one to a status code."""


class ImgsearchError(Exception):
    """Base class of every error that the services report to callers on purpose."""


class InvalidInputError(ImgsearchError):
    """The caller sent something malformed: bad image bytes, a wrong dim, a bad k."""


class NotFoundError(ImgsearchError):
    """An item_id or other named thing does not exist."""


class AlreadyExistsError(ImgsearchError):
    """An item_id is taken by an item with other content."""


class FailedPreconditionError(ImgsearchError):
    """The system is not in a state that allows the operation, for example a model mismatch."""


class TooLargeError(ImgsearchError):
    """An input exceeds a configured limit (bytes, pixels, k)."""


class UnavailableError(ImgsearchError):
    """A dependency (the embed service, the Inference server) is down or failing."""


class DeadlineExceededError(ImgsearchError):
    """The caller's deadline ran out before the work finished."""
