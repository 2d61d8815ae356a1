"""Errors the serving runtime raises besides the registry's own."""

from registry.errors import MaskbankError, ModelNotFound


class InvalidRequest(MaskbankError):
    """The request is malformed: wrong shape, datatype, parameter, or non-finite values."""


class ModelUnavailable(MaskbankError):
    """The model exists in the registry but could not be loaded; the message says why."""


class VersionNotLoaded(ModelNotFound):
    """The request names a model version (generation) that is not the one being served."""


class ServerBusy(MaskbankError):
    """The server already holds as many inference requests as its bound (--max-queue-size) allows."""


class RequestTimeout(MaskbankError):
    """The request waited longer than its `timeout` parameter allowed before its computation could start."""
