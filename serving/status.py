"""The one place where maskbank's typed errors become gRPC status codes.

Every RPC handler runs inside `ErrorInterceptor`: a MaskbankError is answered with its mapped
code and its message; running out of memory (host or GPU) with RESOURCE_EXHAUSTED; anything else
is a bug, answered INTERNAL with a generic message while the traceback goes to the log.
"""

from __future__ import annotations

import inspect
import logging
import threading

import grpc
import torch
from google.protobuf.message import DecodeError

from registry import errors as reg

from .errors import (InvalidRequest, ModelUnavailable, Overloaded, RequestTimeout, ResponseTooLarge, ServerBusy,
                     ShuttingDown, Unsupported)
from .logs import FloodLog

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
    (reg.BlobUnreadable, grpc.StatusCode.DATA_LOSS),
    (reg.ManifestError, grpc.StatusCode.DATA_LOSS),
    (reg.InvalidArtifact, grpc.StatusCode.DATA_LOSS),
    (reg.RegistryUnreachable, grpc.StatusCode.UNAVAILABLE),
    (ModelUnavailable, grpc.StatusCode.UNAVAILABLE),
    (ServerBusy, grpc.StatusCode.UNAVAILABLE),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (RequestTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ResponseTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (reg.PublishConflict, grpc.StatusCode.ABORTED),
    (Unsupported, grpc.StatusCode.UNIMPLEMENTED),
    (reg.MaskbankError, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_code(error: Exception) -> grpc.StatusCode:
    for cls, code in STATUS_CODES:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


MAX_MESSAGE_CHARS = 2000  # a status message's length at most: it travels in a header (clients cap them at 16 KiB)


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message`, or its beginning and end when longer than `limit`: it may quote a client's string (a
    4 MB model name), and the end usually says what to do."""
    if len(message) <= limit:
        return message
    head, tail = limit * 2 // 3, limit // 4
    return f"{message[:head]} ... [{len(message) - head - tail} characters left out] ... {message[-tail:]}"


_ANSWER_LOGS: dict[tuple[str, grpc.StatusCode], FloodLog] = {}
_ANSWER_LOGS_LOCK = threading.Lock()


def _answers(method: str, code: grpc.StatusCode) -> FloodLog:
    """The INFO log of one kind of error answer: a client that repeats a bad request in a loop gets a
    line every FLOOD_LOG_SECONDS with the count, not a line per request (each is logged at DEBUG)."""
    with _ANSWER_LOGS_LOCK:
        return _ANSWER_LOGS.setdefault((method, code), FloodLog(log, logging.INFO))


def abort_details(method: str, error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status `error` ends a call to `method` with (INTERNAL, with a generic message, for a
    bug), logged: a MaskbankError in one line, anything else with its traceback. An abort the handler
    itself began (grpc.aio.AbortError) is re-raised: its status is already set."""
    if isinstance(error, grpc.aio.AbortError):
        raise error
    if isinstance(error, reg.MaskbankError):
        message, code = bounded(str(error)), status_code(error)
        log.debug("%s -> %s: %s", method, code.name, message)
        if not isinstance(error, Overloaded):  # those are summarised where they are decided
            _answers(method, code).record("%d %s -> %s answer(s) {since}; the latest: %s", method, code.name, message)
        return code, message
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):  # not a bug: this request did not fit now
        where = "GPU memory" if isinstance(error, torch.OutOfMemoryError) else "memory"
        log.error("%s ran out of %s", method, where, exc_info=error)
        return grpc.StatusCode.RESOURCE_EXHAUSTED, (
            f"the server ran out of {where} for this request; retry, or send fewer rows (operators: a smaller "
            "--cache-bytes or --max-batch-size leaves more room)")
    log.error("%s failed", method, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error in {method}; the server log has details"


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler (coroutines and async generators, and the plain functions and generators
    that grpc.aio runs on its thread pool) so that errors leave as proper gRPC statuses. A method's
    wrapped handler is built once and reused (this runs on every call)."""

    def __init__(self):
        self._wrapped: dict[str, tuple] = {}  # method -> (the handler as registered, its wrapped copy)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[method] = (handler, _wrap(method, handler))
        return cached[1]


def _wrap(method: str, handler):
    """`handler` with its behaviour inside abort_details, in the handler's own kind (async or not), and
    its requests parsed there too: bytes that are no such message (a client built from another .proto)
    are INVALID_ARGUMENT, where gRPC answered UNKNOWN and logged a traceback per call."""
    kind = next((k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
                 if getattr(handler, k) is not None), None)
    if kind is None:
        return handler
    inner = getattr(handler, kind)
    parse = _parser(method, handler.request_deserializer)
    streaming = handler.request_streaming

    async def parsed(requests):
        async for raw in requests:
            yield parse(raw)

    if inspect.iscoroutinefunction(inner):
        async def wrapped(request, context):
            try:
                return await inner(parsed(request) if streaming else parse(request), context)
            except Exception as error:
                await context.abort(*abort_details(method, error))
    elif inspect.isasyncgenfunction(inner):
        async def wrapped(request, context):
            try:
                async for response in inner(parsed(request) if streaming else parse(request), context):
                    yield response
            except Exception as error:
                await context.abort(*abort_details(method, error))
    elif kind.endswith("_stream"):
        def wrapped(request, context):
            try:
                yield from inner(map(parse, request) if streaming else parse(request), context)
            except Exception as error:
                context.abort(*abort_details(method, error))
    else:
        def wrapped(request, context):
            try:
                return inner(map(parse, request) if streaming else parse(request), context)
            except Exception as error:
                context.abort(*abort_details(method, error))
    return handler._replace(**{kind: wrapped, "request_deserializer": None})  # None: gRPC hands over the bytes


def _parser(method: str, deserializer):
    """The request bytes' message by `deserializer` (None: the bytes), InvalidRequest if they are none."""
    if deserializer is None:
        return lambda raw: raw

    def parse(raw: bytes):
        try:
            return deserializer(raw)
        except DecodeError as error:
            raise InvalidRequest(f"the request to {method} is not a valid message of its type ({error}): is the "
                                 "client built from another version of the .proto files?") from None

    return parse
