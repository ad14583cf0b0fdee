"""Domain errors. Each names what went wrong in words a caller can act on; the transport maps each class
to one row of sam2serve.error_table (gRPC status, HTTP status, fal's error type), and anything else becomes an
internal error without details."""

from __future__ import annotations

INTERNAL_MESSAGE = "internal error; the server logged the details"


def public_message(exc: BaseException) -> str:
    """What a caller may be told about `exc`: our own errors' messages, nothing of anything else."""
    return str(exc) if isinstance(exc, Sam2ServeError) else INTERNAL_MESSAGE


class Sam2ServeError(Exception):
    """Base class: the message is safe to show to the caller."""


class InvalidInput(Sam2ServeError):
    """The request is malformed: a parameter out of range, an unreadable image, a bad data URI."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field  # the request field at fault, when one is (fal's 422 bodies name it)


class ImageTooLarge(InvalidInput):
    """The image exceeds the byte or pixel limits."""


class ImageFetchError(InvalidInput):
    """image_url could not be fetched: blocked address, bad scheme, HTTP error, timeout, too big."""


class Overloaded(Sam2ServeError):
    """Backpressure: the server is at one of its capacity bounds (queue, image budget, open streams); retry
    later."""


class QueueFull(Overloaded):
    """Backpressure: the queue is at capacity; retry later."""


class JobNotFound(Sam2ServeError):
    """No job with this request id (never existed, or its result expired)."""


class EmbeddingNotFound(Sam2ServeError):
    """An image_id or mask_input_id this replica does not hold (never seen here, or evicted): resend the image."""


class JobNotFinished(Sam2ServeError):
    """The job is still queued or running."""


class JobCancelled(Sam2ServeError):
    """The job was cancelled before it finished."""


class JobFailed(Sam2ServeError):
    """The job ran and failed; the message says why."""


class JobTimedOut(Sam2ServeError):
    """The job ran past the server's time limit per job and was stopped."""


class ResultTooLarge(Sam2ServeError):
    """The response would exceed the message size limit; ask for fewer or smaller outputs."""


class Unauthenticated(Sam2ServeError):
    """Missing or wrong API key."""


class QueueUnavailable(Sam2ServeError):
    """The shared queue's store (Redis) cannot be reached; retry later."""


class ShuttingDown(Sam2ServeError):
    """The server is draining and accepts no new work."""


class StartupError(Exception):
    """The server cannot start as configured (a port in use, an unreachable store); the message says what to
    change. Not a caller's error: it never reaches a protocol."""
