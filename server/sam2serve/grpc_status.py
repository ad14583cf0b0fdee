"""The one table from domain errors to gRPC status codes. Unknown exceptions are INTERNAL, detail-free."""

from __future__ import annotations

import grpc

from . import errors

STATUS_OF: dict[type[errors.Sam2ServeError], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ImageTooLarge: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ImageFetchError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.ResultTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.JobNotFound: grpc.StatusCode.NOT_FOUND,
    errors.JobNotFinished: grpc.StatusCode.FAILED_PRECONDITION,
    errors.JobCancelled: grpc.StatusCode.CANCELLED,
    errors.JobFailed: grpc.StatusCode.INTERNAL,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    errors.QueueUnavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls], str(exc)
    return grpc.StatusCode.INTERNAL, errors.INTERNAL_MESSAGE
