"""Server-Sent Events of a job's event log: replay after a cursor, follow live, end after the terminal status."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from api.errors import ApiError, too_many
from core import jobs
from core.models import Job, JobEvent
from core.notify import Waiter

BATCH = 500  # events read per query; a long backlog is replayed in several reads
WAKE_TIMEOUT_S = 5.0  # with Redis: look at the database anyway this often, in case a pub/sub message was lost
MAX_CURSOR_DIGITS = 18


CURSOR_PATTERN = f"^[0-9]{{0,{MAX_CURSOR_DIGITS}}}$"  # what the OpenAPI document promises; event_cursor keeps it


def event_cursor(value: str | None) -> int:
    """The job_event id after which to continue (Last-Event-ID or `after`); 0 when absent; 400 when malformed."""
    if value is None or value == "":
        return 0
    if not value.isascii() or not value.isdigit() or len(value) > MAX_CURSOR_DIGITS:
        raise ApiError(400, "invalid_cursor", f"a cursor is an event id (a non-negative integer), not {value[:40]!r}")
    return int(value)


class StreamSlots:
    """Open event streams per tenant in this process, capped: a slot is taken before a stream starts."""

    def __init__(self, limit: int, retry_after_s: int = 30):
        self.limit, self.retry_after_s = limit, retry_after_s
        self.open: Counter[str] = Counter()

    def take(self, tenant_id: str) -> Callable[[], None]:
        """Take a slot (429 when none is left); returns the function that gives it back, safe to call twice."""
        if self.open[tenant_id] >= self.limit:
            message = f"at most {self.limit} open event streams per tenant"
            raise too_many("too_many_streams", message, self.retry_after_s)
        self.open[tenant_id] += 1
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            if not given_back:
                given_back = True
                self.open[tenant_id] -= 1

        return give_back


class JobEventResponse(EventSourceResponse):
    """An event stream that gives its slot back however it ends (even when its generator never started).

    A client that stops reading is dropped after settings.write_timeout_s: by the kernel (TCP_USER_TIMEOUT, see
    api.server) once its receive window has stayed shut that long, or by `send_timeout` once our send buffers are
    full too. The first comes much sooner: a receive window holds tens of KiB, our send buffers megabytes."""

    def __init__(
        self,
        content: AsyncIterator[ServerSentEvent],
        *,
        give_back: Callable[[], None],
        send_timeout_s: float,
        **kwargs: Any,
    ):
        super().__init__(content, send_timeout=send_timeout_s, **kwargs)
        self.give_back = give_back

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.give_back()


async def job_events(
    sessions: sessionmaker[Session], job_id: str, *, after: int, redis_url: str | None
) -> AsyncIterator[ServerSentEvent]:
    """Every event of the job with an id above `after`, in id order, then live ones; `end` after the terminal
    status. Each read uses its own short session: none is held while waiting."""
    waiter = Waiter(redis_url, job_id)
    try:
        await waiter.wait(0)  # subscribe before the first read, so that no wake-up falls between the two
        while True:
            events, end = await run_in_threadpool(_read, sessions, job_id, after)
            for event in events:
                yield _message(event)
                after = event.job_event_id
            if end is not None:
                yield ServerSentEvent(json.dumps({"status": end}), event="end")
                return
            if len(events) < BATCH:
                await waiter.wait(WAKE_TIMEOUT_S)
    finally:
        await waiter.close()


def _read(sessions: sessionmaker[Session], job_id: str, after: int) -> tuple[list[JobEvent], str | None]:
    """The next events, and the final status when they are the last ones there will ever be."""
    with sessions() as session:
        # The status first: a terminal one was committed with its own event, so the read below sees every event
        # the job will ever have (no attempt may write after the end).
        status = session.scalar(select(Job.status).where(Job.job_id == job_id))
        events = jobs.list_events(session, job_id, after=after, limit=BATCH)
    if status is None:
        return events, "deleted"
    done = status.is_terminal and len(events) < BATCH
    return events, (str(status) if done else None)


def _message(event: JobEvent) -> ServerSentEvent:
    data = {
        "kind": event.kind,
        "step": event.step,
        "epoch": event.epoch,
        "attempt": event.attempt,
        "data": event.data,
        "at": event.created_at.isoformat(),
    }
    return ServerSentEvent(json.dumps(data, separators=(",", ":")), id=str(event.job_event_id), event=event.kind)
