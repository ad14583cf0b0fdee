"""Domain errors as gRPC status codes, from the one error table (sam2serve.error_table)."""

from __future__ import annotations

import grpc

from .error_table import error_code


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    code, message = error_code(exc)
    return code.grpc, message
