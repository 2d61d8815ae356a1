"""Errors the serving runtime raises besides the registry's own."""

from registry.errors import MaskbankError, ModelNotFound


class InvalidRequest(MaskbankError):
    """The request is malformed: wrong shape, datatype, parameter, or non-finite values."""


class ModelUnavailable(MaskbankError):
    """The model exists in the registry but could not be loaded; the message says why."""


class VersionNotLoaded(ModelNotFound):
    """The request names a model version (generation) that is not the one being served."""


class Unsupported(MaskbankError):
    """A part of the protocol this server does not implement (UNIMPLEMENTED, as Triton's UNSUPPORTED)."""


class ResponseTooLarge(MaskbankError):
    """The answer to a request would exceed the largest message the server sends (--max-message-bytes)."""


class Overloaded(MaskbankError):
    """The server cannot take or start the request in time: load, not a fault (logged in summary)."""


class ServerBusy(Overloaded):
    """The server already holds as many inference requests as its bound (--max-queue-size) allows."""


class RequestTimeout(Overloaded):
    """The request waited for the compute pool longer than its `timeout` parameter allows."""


class ShuttingDown(MaskbankError):
    """The server is stopping: a call it can no longer answer in its grace period, or a stream or watch
    it ends (UNAVAILABLE: the client retries, or reconnects to another replica)."""
