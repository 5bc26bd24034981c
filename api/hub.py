"""One reader per watched job in each API process, not one per viewer: a job's feed follows its events (woken by
Redis pub/sub, or by polling) and hands each one, encoded once, to the bounded queues of the job's viewers.

A viewer joins in two steps, so that it sees every event once, in order: it subscribes first (from then on the feed
queues every event after its current position for it), then replays from the database what lies between its own
cursor and that position (see api.streaming.job_events)."""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from sse_starlette import ServerSentEvent
from starlette.concurrency import run_in_threadpool

from core import jobs
from core.models import Job, JobEvent
from core.notify import Waiter

log = logging.getLogger(__name__)
BATCH = 500  # events read per query; a long backlog is read in several
WAKE_TIMEOUT_S = 5.0  # with Redis: look at the database anyway this often, in case a pub/sub message was lost
RECENT = 1000  # events a feed keeps in memory for viewers that join or resume
RETRY_S = 1.0  # after a failed read (database away or busy), the feed tries again this much later


@dataclass(frozen=True)
class Batch:
    """Events the feed read together, each encoded once, as every viewer of the job is handed them."""

    ids: list[int]
    frames: list[bytes]
    data: bytes  # the frames joined
    attempt: int = 0  # the latest attempt among the events
    end: bool = False  # the `end` frame (which has no id): nothing follows

    @classmethod
    def of(cls, events: list[JobEvent]) -> Batch:
        frames = [encode(event) for event in events]
        attempt = max(event.attempt for event in events)
        return cls([event.job_event_id for event in events], frames, b"".join(frames), attempt)

    def after(self, cursor: int) -> bytes:
        """The frames of the events after `cursor` (a viewer may have replayed some of them already)."""
        if not self.ids or cursor < self.ids[0]:
            return self.data
        return b"".join(frame for event_id, frame in zip(self.ids, self.frames, strict=True) if event_id > cursor)


@dataclass(eq=False)
class Subscriber:
    """A viewer's place in a feed: the feed's position when it joined, and the frames queued for it since."""

    queue: asyncio.Queue[Batch]
    joined_at: int = 0  # the last event id the feed had handed out when this viewer joined
    backlog: bytes | None = None  # its gap up to joined_at, from the feed's memory; None: read from the database
    dropped: bool = False  # fell a whole queue behind: its stream ends, and its client resumes from its last id


@dataclass(eq=False)
class JobFeed:
    """The live events of one job for every viewer of it in this process."""

    job_id: str
    subscribers: set[Subscriber] = field(default_factory=set)
    position: int = 0  # id of the last event handed out
    # The latest events, encoded: every event with recent_from < id <= position, as the database holds them. A
    # viewer whose cursor is in this window replays from here, not from the database.
    recent_from: int = 0
    recent_ids: list[int] = field(default_factory=list)
    recent_frames: list[bytes] = field(default_factory=list)
    attempt: int = 0  # of the latest event
    end: Batch | None = None  # once the job is over: nothing follows it
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None  # why it could not start
    task: asyncio.Task[None] | None = None

    def hand_out(self, batch: Batch) -> None:
        if batch.end:
            self.end = batch
        else:
            self.remember(batch)
        for subscriber in list(self.subscribers):
            self._put(subscriber, batch)

    def remember(self, batch: Batch) -> None:
        """Keep the batch among the recent events and move the position to its last one."""
        if batch.attempt > self.attempt:  # a new attempt supersedes events of earlier ones in the database
            self.recent_from, self.recent_ids, self.recent_frames = self.position, [], []
        self.attempt = max(self.attempt, batch.attempt)
        self.recent_ids += batch.ids
        self.recent_frames += batch.frames
        if len(self.recent_ids) > RECENT:
            self.recent_from = self.recent_ids[-RECENT - 1]
            del self.recent_ids[:-RECENT], self.recent_frames[:-RECENT]
        self.position = batch.ids[-1]

    def since(self, cursor: int) -> bytes | None:
        """The frames of the events after `cursor`, from memory; None when the window no longer reaches back there."""
        if cursor < self.recent_from:
            return None
        return b"".join(self.recent_frames[bisect.bisect_right(self.recent_ids, cursor) :])

    def _put(self, subscriber: Subscriber, batch: Batch) -> None:
        try:
            subscriber.queue.put_nowait(batch)
        except asyncio.QueueFull:
            subscriber.dropped = True  # its stream sees the flag at its next frame and ends
            self.subscribers.discard(subscriber)


class EventHub:
    """The feeds of this process, started by a job's first viewer and stopped when its last one leaves."""

    def __init__(self, sessions: sessionmaker[Session], *, redis_url: str | None, viewer_queue: int):
        self.sessions, self.redis_url, self.viewer_queue = sessions, redis_url, viewer_queue
        self.feeds: dict[str, JobFeed] = {}

    async def subscribe(self, job_id: str, after: int) -> Subscriber:
        """Join the job's feed (starting it if this is its first viewer) as a viewer that has seen the events up to
        `after`; raises what kept the feed from starting (the database away or its pool exhausted)."""
        feed = self.feeds.get(job_id)
        if feed is None:
            feed = self.feeds[job_id] = JobFeed(job_id)
            feed.task = asyncio.create_task(self._follow(feed), name=f"feed {job_id}")
        try:
            await feed.ready.wait()
        except asyncio.CancelledError:  # the viewer left while the feed was starting: stop it if it was the only one
            if not feed.subscribers and feed.task is not None:
                feed.task.cancel()
                self._forget(feed)
            raise
        if feed.error is not None:
            raise feed.error
        subscriber = Subscriber(asyncio.Queue(self.viewer_queue), feed.position, feed.since(after))
        if feed.end is not None:
            subscriber.queue.put_nowait(feed.end)
        else:
            feed.subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, job_id: str, subscriber: Subscriber) -> None:
        """Leave the feed; the last viewer to leave stops it."""
        feed = self.feeds.get(job_id)
        if feed is None:
            return
        feed.subscribers.discard(subscriber)
        if not feed.subscribers and feed.ready.is_set() and feed.task is not None:
            feed.task.cancel()
            self._forget(feed)

    async def close(self) -> None:
        for feed in list(self.feeds.values()):
            if feed.task is not None:
                feed.task.cancel()
        self.feeds.clear()

    async def _follow(self, feed: JobFeed) -> None:
        waiter = Waiter(self.redis_url, feed.job_id)
        try:
            await waiter.wait(0)  # subscribed before the first read, so that no wake-up falls between the two
            try:
                recent, before = await self._read(_recent, feed.job_id)
                if recent:
                    batch = Batch.of(recent)
                    feed.attempt = batch.attempt  # the database holds no superseded event
                    feed.remember(batch)
                feed.recent_from = before
            except Exception as exc:  # noqa: BLE001 - the viewer that started the feed answers it (503)
                feed.error = exc
                return
            finally:
                feed.ready.set()
            await self._relay(feed, waiter)
        finally:
            await waiter.close()
            self._forget(feed)

    async def _relay(self, feed: JobFeed, waiter: Waiter) -> None:
        """Hand out the job's events as they come, then `end` after its terminal status."""
        while True:
            try:
                events, status = await self._read(_next, feed.job_id, feed.position)
            except Exception as exc:  # noqa: BLE001 - keep the viewers; the database may come back
                log.warning("event feed of %s: read failed, retrying in %.0f s: %s", feed.job_id, RETRY_S, exc)
                await asyncio.sleep(RETRY_S)
                continue
            if events:
                feed.hand_out(Batch.of(events))
            if status is not None:
                feed.hand_out(Batch([], [], end_frame(status), end=True))
                return
            if len(events) < BATCH:
                await waiter.wait(WAKE_TIMEOUT_S)

    async def _read(self, read: Callable[..., Any], *args: Any) -> Any:
        return await run_in_threadpool(read, self.sessions, *args)

    def _forget(self, feed: JobFeed) -> None:
        if self.feeds.get(feed.job_id) is feed:
            del self.feeds[feed.job_id]


def _recent(sessions: sessionmaker[Session], job_id: str) -> tuple[list[JobEvent], int]:
    """The job's last RECENT events, oldest first, and the id before the first of them (0: they are all)."""
    with sessions() as session:
        query = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.job_event_id.desc())
        events = list(session.scalars(query.limit(RECENT + 1)))
    before = events.pop().job_event_id if len(events) > RECENT else 0
    return events[::-1], before


def _next(sessions: sessionmaker[Session], job_id: str, after: int) -> tuple[list[JobEvent], str | None]:
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


def replay(sessions: sessionmaker[Session], job_id: str, after: int, until: int) -> list[JobEvent]:
    """Up to BATCH events with `after` < id <= `until`, oldest first: a viewer's gap before it joins the feed."""
    with sessions() as session:
        query = (
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.job_event_id > after, JobEvent.job_event_id <= until)
            .order_by(JobEvent.job_event_id)
            .limit(BATCH)
        )
        return list(session.scalars(query))


def encode(event: JobEvent) -> bytes:
    """The event as one SSE frame: `id: <event id>`, `event: <kind>`, `data: {kind, step, epoch, attempt, data, at}`."""
    data = {
        "kind": event.kind,
        "step": event.step,
        "epoch": event.epoch,
        "attempt": event.attempt,
        "data": event.data,
        "at": event.created_at.isoformat(),
    }
    message = ServerSentEvent(json.dumps(data, separators=(",", ":")), id=str(event.job_event_id), event=event.kind)
    return message.encode()


def end_frame(status: str) -> bytes:
    return ServerSentEvent(json.dumps({"status": status}), event="end").encode()
