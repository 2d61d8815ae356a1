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


def abort_with_status(method: str, error: Exception, context) -> None:
    """End the call with the status `error` maps to (INTERNAL, with a generic message, for a bug)."""
    if isinstance(error, reg.MaskbankError):
        log.info("%s -> %s: %s", method, status_code(error).name, error)
        context.abort(status_code(error), str(error))
    log.error("%s failed", method, exc_info=error)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; the server log has details")


class ErrorInterceptor(grpc.ServerInterceptor):
    """Wraps every handler (unary and server-streaming responses alike) so that errors leave as
    proper gRPC statuses. A method's wrapped handler is built once and reused (this runs on every call)."""

    def __init__(self):
        self._wrapped: dict[str, tuple] = {}  # method -> (the handler as registered, its wrapped copy)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[method] = (handler, _wrap(method, handler))
        return cached[1]


def _wrap(method: str, handler):
    """`handler` with its behaviour inside abort_with_status."""
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        def unary(request, context):
            try:
                return inner(request, context)
            except Exception as error:
                abort_with_status(method, error, context)

        return handler._replace(unary_unary=unary)
    kind = "stream_stream" if handler.stream_stream is not None else "unary_stream"
    if getattr(handler, kind) is None:
        return handler
    streaming = getattr(handler, kind)

    def stream(request, context):
        try:
            yield from streaming(request, context)
        except Exception as error:
            abort_with_status(method, error, context)

    return handler._replace(**{kind: stream})
