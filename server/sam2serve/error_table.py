"""The one table from domain errors to what each protocol says: the gRPC status, the HTTP status and fal's
error type of the HTTP API, and the reason counted in sam2serve_rejected_requests_total when the error refuses
a request before any work. Exceptions outside the table are internal errors: their details stay in the log."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from . import errors


@dataclass(frozen=True)
class ErrorCode:
    grpc: grpc.StatusCode
    http: int
    fal_type: str  # fal's machine-readable error type (its `detail[].type` or `error_type`)
    rejected: str = ""  # the rejection reason label; "" when the error is not a refusal


S = grpc.StatusCode
TABLE: dict[type[errors.Sam2ServeError], ErrorCode] = {
    errors.InvalidInput: ErrorCode(S.INVALID_ARGUMENT, 422, "value_error", "invalid_argument"),
    errors.ImageTooLarge: ErrorCode(S.INVALID_ARGUMENT, 422, "image_too_large", "invalid_argument"),
    errors.ImageFetchError: ErrorCode(S.INVALID_ARGUMENT, 422, "file_download_error", "invalid_argument"),
    errors.QueueFull: ErrorCode(S.RESOURCE_EXHAUSTED, 429, "queue_full", "queue_full"),
    errors.Overloaded: ErrorCode(S.RESOURCE_EXHAUSTED, 429, "overloaded", "overloaded"),
    errors.ResultTooLarge: ErrorCode(S.RESOURCE_EXHAUSTED, 413, "result_too_large", "result_too_large"),
    errors.JobNotFound: ErrorCode(S.NOT_FOUND, 404, "not_found"),
    errors.EmbeddingNotFound: ErrorCode(S.NOT_FOUND, 404, "embedding_not_found"),
    errors.JobNotFinished: ErrorCode(S.FAILED_PRECONDITION, 400, "request_not_finished"),
    # 499 is what gRPC-to-HTTP gateways answer for CANCELLED, and fal's type for a cancelled request.
    errors.JobCancelled: ErrorCode(S.CANCELLED, 499, "client_cancelled"),
    errors.JobFailed: ErrorCode(S.INTERNAL, 500, "internal_error"),
    errors.JobTimedOut: ErrorCode(S.DEADLINE_EXCEEDED, 504, "job_timeout"),
    errors.Unauthenticated: ErrorCode(S.UNAUTHENTICATED, 401, "unauthorized", "unauthenticated"),
    errors.ShuttingDown: ErrorCode(S.UNAVAILABLE, 503, "shutting_down", "shutting_down"),
    errors.QueueUnavailable: ErrorCode(S.UNAVAILABLE, 503, "queue_unavailable"),
}
INTERNAL = ErrorCode(S.INTERNAL, 500, "internal_error")
INTERNAL_MESSAGE = errors.INTERNAL_MESSAGE


def error_code(exc: BaseException) -> tuple[ErrorCode, str]:
    """The table's row for `exc` (its closest listed class) and the message safe to show the caller."""
    for cls in type(exc).__mro__:
        if cls in TABLE:
            return TABLE[cls], str(exc)
    return INTERNAL, INTERNAL_MESSAGE
