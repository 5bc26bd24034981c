"""Request body limits: JSON bodies up to settings.max_body_kb, dataset uploads up to their own larger limit."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than the limit of {limit} bytes")


class BodyLimitMiddleware:
    """413 before reading when Content-Length is over the limit, else as soon as the streamed bytes pass it."""

    def __init__(self, app: ASGIApp, default: int, per_path: dict[str, int]):
        self.app, self.default, self.per_path = app, default, per_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope["path"].rstrip("/"), self.default)
        if _content_length(scope) > limit:
            await error_response(413, "payload_too_large", BodyTooLarge(limit).detail)(scope, receive, send)
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)  # inside the route: answered by the HTTPException handler
            return message

        await self.app(scope, counted_receive, send)


def _content_length(scope: Scope) -> int:
    try:
        return int(Headers(scope=scope).get("content-length", 0))
    except ValueError:
        return 0
