"""Domain errors. Each names what went wrong in words a caller can act on; a protocol adapter maps each
class to one status code (sam2serve.grpc_status.STATUS_OF), and anything else becomes INTERNAL without details."""

from __future__ import annotations

INTERNAL_MESSAGE = "internal error; the server logged the details"


def public_message(exc: BaseException) -> str:
    """What a caller may be told about `exc`: our own errors' messages, nothing of anything else."""
    return str(exc) if isinstance(exc, Sam2ServeError) else INTERNAL_MESSAGE


class Sam2ServeError(Exception):
    """Base class: the message is safe to show to the caller."""


class InvalidInput(Sam2ServeError):
    """The request is malformed: a parameter out of range, an unreadable image, a bad data URI."""


class ImageTooLarge(InvalidInput):
    """The image exceeds the byte or pixel limits."""


class ImageFetchError(InvalidInput):
    """image_url could not be fetched: blocked address, bad scheme, HTTP error, timeout, too big."""


class QueueFull(Sam2ServeError):
    """Backpressure: the queue is at capacity; retry later."""


class JobNotFound(Sam2ServeError):
    """No job with this request id (never existed, or its result expired)."""


class JobNotFinished(Sam2ServeError):
    """The job is still queued or running."""


class JobCancelled(Sam2ServeError):
    """The job was cancelled before it finished."""


class JobFailed(Sam2ServeError):
    """The job ran and failed; the message says why."""


class ResultTooLarge(Sam2ServeError):
    """The response would exceed the message size limit; ask for fewer or smaller outputs."""


class Unauthenticated(Sam2ServeError):
    """Missing or wrong API key."""


class QueueUnavailable(Sam2ServeError):
    """The shared queue's store (Redis) cannot be reached; retry later."""


class ShuttingDown(Sam2ServeError):
    """The server is draining and accepts no new work."""
