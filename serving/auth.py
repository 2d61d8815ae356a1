"""Bearer-token authorisation of the admin calls (loading and unloading models).

`ADMIN_METHODS` is the one list of calls that change what the server serves; every other call
(inference, metadata, health, statistics, reflection) needs no token. A call to an admin method
must carry the gRPC metadata `authorization: Bearer TOKEN` with the token the server was started
with (`--admin-token` or `MASKBANK_ADMIN_TOKEN`), compared in constant time. A server started
without a token refuses every admin call: safe by default, since anyone who can reach the port
could otherwise unload the models. Refusals are UNAUTHENTICATED, with a message that says which
header to send, and are logged with the caller's address.
"""

from __future__ import annotations

import hmac
import logging

import grpc

from ._proto import pb
from .logs import FloodLog

log = logging.getLogger("maskbank.serving.auth")

_INFERENCE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
ADMIN_METHODS: frozenset[str] = frozenset(
    f"/{_INFERENCE}/{rpc}" for rpc in ("RepositoryModelLoad", "RepositoryModelUnload")
)
HEADER = "authorization"


class AdminAuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets an admin call through only with the right bearer token; other calls pass untouched."""

    def __init__(self, token: str | None):
        self._token = token.encode() if token else None
        self._refusals = FloodLog(log)  # a client retrying without its token must not flood the log

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method not in ADMIN_METHODS:
            return await continuation(handler_call_details)
        refusal = self.refusal(method, handler_call_details.invocation_metadata or ())
        if refusal is None:
            return await continuation(handler_call_details)

        async def refuse(request, context):
            self._refusals.record("refused %d admin call(s) {since}; the latest: %s from %s: %s", method, context.peer(),
                                  refusal, extra={"method": method, "peer": context.peer()})
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)

        return grpc.unary_unary_rpc_method_handler(refuse)

    def refusal(self, method: str, metadata) -> str | None:
        """Why a call to admin `method` with `metadata` is refused, or None when it may proceed."""
        rpc = method.rsplit("/", 1)[-1]
        if self._token is None:
            return (f"{rpc} is an admin call and this server was started without an admin token, so admin calls "
                    "are refused; restart it with --admin-token (or MASKBANK_ADMIN_TOKEN) and send the metadata "
                    f"header '{HEADER}: Bearer <token>'")
        values = [value for key, value in metadata if key.lower() == HEADER]
        if not values:
            return (f"{rpc} is an admin call: send the metadata header '{HEADER}: Bearer <token>' with the "
                    "server's admin token (--admin-token or MASKBANK_ADMIN_TOKEN)")
        value = values[0] if isinstance(values[0], str) else values[0].decode("utf-8", "replace")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return f"the '{HEADER}' header of an admin call must be 'Bearer <token>'"
        if not hmac.compare_digest(token.strip().encode(), self._token):
            return f"the admin token in the '{HEADER}' header is not the one this server was started with"
        return None
