"""Request body limits: JSON bodies up to settings.max_body_kb, dataset uploads up to their own larger limit, and
no body may stall for longer than settings.request_body_timeout_s between two of its parts."""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than the limit of {limit} bytes")


class BodyTimeout(HTTPException):
    def __init__(self, timeout_s: float):
        super().__init__(408, f"the request body stopped arriving: nothing came for {timeout_s:g} s")


class BodyLimitMiddleware:
    """413 before reading when Content-Length is over the limit, else as soon as the streamed bytes pass it; 408 when
    the next part of a body does not come within `timeout_s`. Both are raised inside the route, where the body is
    read (an upload removes its temporary file), and answered by the HTTPException handler."""

    def __init__(self, app: ASGIApp, default: int, per_path: dict[str, int], timeout_s: float):
        self.app, self.default, self.per_path, self.timeout_s = app, default, per_path, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope["path"].rstrip("/"), self.default)
        if _content_length(scope) > limit:
            await error_response(413, "payload_too_large", BodyTooLarge(limit).detail)(scope, receive, send)
            return
        received, ended = 0, False

        async def limited_receive() -> Message:
            nonlocal received, ended
            if ended:  # what is left to receive is the disconnect, whenever it comes (an event stream waits for it)
                return await receive()
            try:
                async with asyncio.timeout(self.timeout_s):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(self.timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
                ended = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int:
    try:
        return int(Headers(scope=scope).get("content-length", 0))
    except ValueError:
        return 0
