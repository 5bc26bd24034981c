"""The event hub on a real database: one feed per watched job shared by its viewers, joining without gap or
repeat (from memory or from the database), a slow viewer dropped without holding up the others, a vanished one
stopping the feed, and a resumed job's superseded events forgotten."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from api import hub as hub_module
from api.hub import EventHub, Subscriber
from api.streaming import job_events
from core import jobs, tenants
from core.config import Settings
from core.models import utcnow
from tests.factories import claim, epoch_event, finish, make_job_spec, record

Sessions = sessionmaker[Session]


@pytest.fixture(autouse=True)
def fast_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("core.notify.POLL_INTERVAL_S", 0.02)


def new_job(sessions: Sessions) -> str:
    with sessions() as s:
        tenants.create_tenant(session=s, tenant_id="default")
        job = jobs.create_job(session=s, tenant_id="default", spec=make_job_spec(), advice=[])
    return job.job_id


def stored_ids(sessions: Sessions, job_id: str) -> list[int]:
    with sessions() as s:
        return [e.job_event_id for e in jobs.list_events(s, job_id)]


def run(test: Callable[[EventHub], Awaitable[Any]], sessions: Sessions, viewer_queue: int = 100) -> Any:
    async def main() -> Any:
        hub = EventHub(sessions, redis_url=None, viewer_queue=viewer_queue)
        try:
            return await asyncio.wait_for(test(hub), 20)
        finally:
            await hub.close()

    return asyncio.run(main())


async def read_all(sessions: Sessions, job_id: str, subscriber: Subscriber, after: int) -> list[int]:
    """The event ids a viewer's stream sends, to its end."""
    received = []
    async for chunk in job_events(sessions, job_id, subscriber, after=after):
        received += [int(line[4:]) for line in chunk.decode().split("\r\n") if line.startswith("id: ")]
    return received


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


async def in_thread(function: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(function, *args)


def test_viewers_of_one_job_share_one_feed_and_each_sees_every_event_once_in_order(
    settings: Settings, sessions: Sessions
):
    job_id = new_job(sessions)
    attempt = claim(sessions, job_id)

    async def scenario(hub: EventHub) -> list[list[int]]:
        first = await hub.subscribe(job_id, 0)
        reading = [asyncio.create_task(read_all(sessions, job_id, first, 0))]
        await in_thread(record, sessions, job_id, attempt, [epoch_event(1)])
        await until(lambda: hub.feeds[job_id].position == stored_ids(sessions, job_id)[-1])
        late = await hub.subscribe(job_id, 0)  # joins mid-run: its gap comes from the feed's memory
        assert late.backlog is not None and len(hub.feeds) == 1 and len(hub.feeds[job_id].subscribers) == 2
        reading.append(asyncio.create_task(read_all(sessions, job_id, late, 0)))
        await in_thread(record, sessions, job_id, attempt, [epoch_event(2), epoch_event(3)])
        await in_thread(finish, sessions, job_id, attempt)
        return list(await asyncio.gather(*reading))

    first, late = run(scenario, sessions)
    assert first == late == stored_ids(sessions, job_id)


def test_a_viewer_behind_the_feeds_memory_replays_its_gap_from_the_database(
    settings: Settings, sessions: Sessions, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(hub_module, "RECENT", 3)
    job_id = new_job(sessions)
    attempt = claim(sessions, job_id)
    record(sessions, job_id, attempt, [epoch_event(e) for e in range(1, 8)])
    stored = stored_ids(sessions, job_id)

    async def scenario(hub: EventHub) -> tuple[list[int], list[int]]:
        behind = await hub.subscribe(job_id, stored[1])  # its cursor lies before the 3 events kept in memory
        recent = await hub.subscribe(job_id, stored[-2])
        assert behind.backlog is None and recent.backlog is not None
        reading = [read_all(sessions, job_id, s, after) for s, after in ((behind, stored[1]), (recent, stored[-2]))]
        tasks = [asyncio.create_task(r) for r in reading]
        await in_thread(record, sessions, job_id, attempt, [epoch_event(8)])
        await in_thread(finish, sessions, job_id, attempt)
        return tuple(await asyncio.gather(*tasks))  # type: ignore[return-value]

    behind, recent = run(scenario, sessions)
    everything = stored_ids(sessions, job_id)
    assert behind == everything[2:] and recent == everything[len(stored) - 1 :]


def test_a_slow_viewer_is_dropped_when_its_queue_fills_and_the_others_get_everything(
    settings: Settings, sessions: Sessions
):
    job_id = new_job(sessions)
    attempt = claim(sessions, job_id)

    async def scenario(hub: EventHub) -> tuple[Subscriber, list[int], list[int]]:
        slow = await hub.subscribe(job_id, 0)  # never reads
        fast = await hub.subscribe(job_id, 0)
        reading = asyncio.create_task(read_all(sessions, job_id, fast, 0))
        for epoch in range(1, 6):  # five batches, each read by the feed before the next is written
            await in_thread(record, sessions, job_id, attempt, [epoch_event(epoch)])
            await until(lambda: hub.feeds[job_id].position == stored_ids(sessions, job_id)[-1])
        await in_thread(finish, sessions, job_id, attempt)
        # Its stream sends what it had when it joined, then ends without `end`: its client resumes from its cursor.
        slow_received = await read_all(sessions, job_id, slow, 0)
        return slow, slow_received, await reading

    slow, slow_received, received = run(scenario, sessions, viewer_queue=2)
    assert slow.dropped and slow_received == stored_ids(sessions, job_id)[:2]  # queued, running
    assert received == stored_ids(sessions, job_id)


def test_the_last_viewer_leaving_stops_the_feed(settings: Settings, sessions: Sessions):
    job_id = new_job(sessions)

    async def scenario(hub: EventHub) -> None:
        viewers = [await hub.subscribe(job_id, 0) for _ in range(2)]
        feed = hub.feeds[job_id]
        hub.unsubscribe(job_id, viewers[0])
        assert hub.feeds.get(job_id) is feed
        hub.unsubscribe(job_id, viewers[1])  # a vanished client: its stream's close leaves the feed
        assert job_id not in hub.feeds
        await asyncio.sleep(0)
        assert feed.task is not None and (feed.task.cancelled() or feed.task.done())

    run(scenario, sessions)


def test_a_new_attempt_makes_the_feed_forget_the_events_it_supersedes(settings: Settings, sessions: Sessions):
    job_id = new_job(sessions)
    first = claim(sessions, job_id)
    record(sessions, job_id, first, [epoch_event(1), epoch_event(2)])  # no checkpoint: a retry starts again

    async def scenario(hub: EventHub) -> list[int]:
        watcher = await hub.subscribe(job_id, 0)
        watching = asyncio.create_task(read_all(sessions, job_id, watcher, 0))
        with sessions() as s:
            assert jobs.requeue_expired(session=s, now=utcnow() + timedelta(hours=1)) == [job_id]  # lease lost
        second = await in_thread(claim, sessions, job_id)
        await in_thread(record, sessions, job_id, second, [epoch_event(1)])
        await until(lambda: hub.feeds[job_id].position == stored_ids(sessions, job_id)[-1])
        late = await hub.subscribe(job_id, 0)  # replays what the database holds now: no superseded epoch
        assert late.backlog is None
        reading = asyncio.create_task(read_all(sessions, job_id, late, 0))
        await in_thread(finish, sessions, job_id, second)
        await watching
        return await reading

    assert run(scenario, sessions) == stored_ids(sessions, job_id)
