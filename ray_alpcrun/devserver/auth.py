"""API-key check on every RPC of every service, as a grpc.aio server interceptor.

Missing ``api_key`` metadata -> UNAUTHENTICATED, wrong key -> PERMISSION_DENIED.
The refusal is a handler of the same kind as the real one, so streaming callers
(which may wait for response headers before sending) get the status at once.
The key's value is never logged or echoed.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from ray_alpcrun.transport import MD_API_KEY

if TYPE_CHECKING:  # generic only in grpc-stubs
    Handler = grpc.RpcMethodHandler[object, object]


def _refusal(handler: Handler, code: grpc.StatusCode, details: str) -> Handler:
    async def refuse(_request: object, context: grpc.aio.ServicerContext[object, object]) -> None:
        await context.abort(code, details)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses calls without the right ``api_key`` metadata (constant-time compare)."""

    def __init__(self, api_key: str) -> None:
        self._key = api_key.encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:  # grpc-stubs omit None (unknown method), which gRPC accepts
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED
            return None
        sent: str | bytes | None = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == MD_API_KEY:
                sent = value
                break
        if sent is None:
            return _refusal(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                f"missing API key: send it in the '{MD_API_KEY}' metadata",
            )
        given = sent.encode() if isinstance(sent, str) else sent
        if not hmac.compare_digest(given, self._key):
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED, "invalid API key")
        return handler
