"""Code around every call of a grpc.aio server, written once for the four
handler kinds (unary or stream request, unary or stream response).

A server interceptor hands `wrap_handler` the method's handler and a function
that starts one call's hooks (`CallHooks`: enter, failed, done); the wrapped
handler runs them around the method. Used by dyadlab.rpc (metrics) and
dyadlab.security (authentication, authorization, audit). Library code: it
imports no service.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any, Protocol

import grpc


class CallHooks(Protocol):
    """What an interceptor does around one call."""

    async def enter(self) -> None:
        """Before the method runs; may end the call (context.abort)."""

    def failed(self, exc: BaseException) -> None:
        """The call ends with `exc` (an abort from enter() included); it is re-raised."""

    def done(self) -> None:
        """Last, however the call ended."""


#: (the request, None where the request is a stream; the call's context) -> its hooks
BeginCall = Callable[[Any, Any], CallHooks]

KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
_MAKE = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def kind_of(handler: grpc.RpcMethodHandler) -> str:
    """The kind of behaviour the handler has (the first it sets; else stream_stream)."""
    return next((k for k in KINDS[:-1] if getattr(handler, k)), KINDS[-1])


def wrap_handler(handler: grpc.RpcMethodHandler, begin: BeginCall) -> grpc.RpcMethodHandler:
    """The same handler with `begin(request, context)`'s hooks run around each call."""
    kind = kind_of(handler)
    inner = getattr(handler, kind)
    unary_request = kind.startswith("unary_")
    behaviour: Callable[[Any, Any], Any]  # a coroutine function or an async generator function
    if kind.endswith("_unary"):

        async def behaviour(request, context):
            async with _hooked(begin(request if unary_request else None, context)):
                return await inner(request, context)
    else:

        async def behaviour(request, context):
            async with _hooked(begin(request if unary_request else None, context)):
                async for item in _iterate(inner(request, context)):
                    yield item

    return _MAKE[kind](behaviour, handler.request_deserializer, handler.response_serializer)


@contextlib.asynccontextmanager
async def _hooked(call: CallHooks):
    try:
        await call.enter()
        yield
    except BaseException as e:
        call.failed(e)
        raise
    finally:
        call.done()


async def _iterate(result):
    """A unary-stream / stream-stream behaviour: an async generator, or a coroutine
    that writes with context.write."""
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    elif inspect.isawaitable(result):
        await result
