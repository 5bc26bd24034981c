"""Server-Sent Events of a job's event log: replay after a cursor, follow live, end after the terminal status."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from api.errors import ApiError
from api.hub import Subscriber, encode, replay

log = logging.getLogger(__name__)
MAX_CURSOR_DIGITS = 18


CURSOR_PATTERN = f"^[0-9]{{0,{MAX_CURSOR_DIGITS}}}$"  # what the OpenAPI document promises; event_cursor keeps it


def event_cursor(value: str | None) -> int:
    """The job_event id after which to continue (Last-Event-ID or `after`); 0 when absent; 400 when malformed."""
    if value is None or value == "":
        return 0
    if not value.isascii() or not value.isdigit() or len(value) > MAX_CURSOR_DIGITS:
        raise ApiError(400, "invalid_cursor", f"a cursor is an event id (a non-negative integer), not {value[:40]!r}")
    return int(value)


class JobEventResponse(EventSourceResponse):
    """An event stream that calls `close` however it ends, even when its generator never started (it gives the
    stream's slot back and leaves the job's feed).

    A client that stops reading is dropped after settings.write_timeout_s: by the kernel (TCP_USER_TIMEOUT, see
    api.server) once its receive window has stayed shut that long, or by `send_timeout` once our send buffers are
    full too. The first comes much sooner: a receive window holds tens of KiB, our send buffers megabytes. A
    viewer that reads, but slower than events come, is dropped by the hub once its queue is full."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        *,
        close: Callable[[], Awaitable[None]],
        send_timeout_s: float,
        **kwargs: Any,
    ):
        super().__init__(content, send_timeout=send_timeout_s, **kwargs)
        self.close = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.close()


async def job_events(
    sessions: sessionmaker[Session], job_id: str, subscriber: Subscriber, *, after: int
) -> AsyncIterator[bytes]:
    """Every event of the job with an id above `after`, in id order, then live ones; `end` after the terminal
    status. The viewer has joined the job's feed already: it replays its gap up to where it joined from the
    database, then takes the feed's frames, skipping those it has replayed."""
    try:
        if subscriber.backlog is not None:
            if subscriber.backlog:
                yield subscriber.backlog
            after = max(after, subscriber.joined_at)
        while after < subscriber.joined_at:
            events = await run_in_threadpool(replay, sessions, job_id, after, subscriber.joined_at)
            if not events:
                break
            for event in events:
                yield encode(event)
                after = event.job_event_id
        while True:
            batches = [await subscriber.queue.get()]
            while not subscriber.queue.empty():  # a viewer that fell behind catches up in one write
                batches.append(subscriber.queue.get_nowait())
            if subscriber.dropped:
                log.info("event stream of %s: the viewer fell a whole queue behind; disconnected", job_id)
                return
            chunk = []
            for batch in batches:
                chunk.append(batch.after(after))  # skips what the replay sent already
                after = max([after, *batch.ids])
            if any(chunk):
                yield b"".join(chunk)
            if batches[-1].end:
                return
    except PoolTimeout:  # the stream has begun, so no 503: end it, and the client resumes with Last-Event-ID
        log.warning("event stream of %s: no database connection free for its replay; ended", job_id)
