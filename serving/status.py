"""The one place where maskbank's typed errors become gRPC status codes.

Every RPC handler runs inside `ErrorInterceptor`: a MaskbankError is answered with its mapped
code and its message; anything else is a bug, answered INTERNAL with a generic message while the
traceback goes to the log.
"""

from __future__ import annotations

import logging

import grpc

from registry import errors as reg

from .errors import InvalidRequest, ModelUnavailable

log = logging.getLogger("maskbank.serving")

# Most specific first: the first class an error is an instance of decides its code.
STATUS_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (reg.InvalidName, grpc.StatusCode.INVALID_ARGUMENT),
    (reg.UnknownName, grpc.StatusCode.INVALID_ARGUMENT),
    (reg.ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (reg.TaskNotFound, grpc.StatusCode.NOT_FOUND),
    (reg.BlobCorrupt, grpc.StatusCode.DATA_LOSS),
    (reg.BlobNotFound, grpc.StatusCode.DATA_LOSS),
    (reg.ManifestError, grpc.StatusCode.DATA_LOSS),
    (reg.InvalidArtifact, grpc.StatusCode.DATA_LOSS),
    (ModelUnavailable, grpc.StatusCode.UNAVAILABLE),
    (reg.PublishConflict, grpc.StatusCode.ABORTED),
    (reg.MaskbankError, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_code(error: Exception) -> grpc.StatusCode:
    for cls, code in STATUS_CODES:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


class ErrorInterceptor(grpc.ServerInterceptor):
    """Wraps every unary-unary handler so that errors leave as proper gRPC statuses."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method
        inner = handler.unary_unary

        def guarded(request, context):
            try:
                return inner(request, context)
            except reg.MaskbankError as error:
                log.info("%s -> %s: %s", method, status_code(error).name, error)
                context.abort(status_code(error), str(error))
            except Exception:
                log.exception("%s failed", method)
                context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; the server log has details")

        return handler._replace(unary_unary=guarded)
