"""Wake-ups for live event streams: Redis pub/sub when configured, database polling otherwise.

A notification carries no data, only "job X has new events": pub/sub is at-most-once, so the database stays the
source of truth and a stream always re-reads it after a wake-up (or after its poll interval, if one is lost).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

log = logging.getLogger(__name__)
POLL_INTERVAL_S = 0.1  # without Redis, how often a job's feed looks for new rows (one per watched job per API)
CHANNEL_PREFIX = "trickserve:job:"


def channel(job_id: str) -> str:
    return CHANNEL_PREFIX + job_id


@functools.lru_cache(maxsize=4)
def _client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def publish(redis_url: str | None, job_id: str) -> None:
    """Tell streams of `job_id` to look again; a Redis outage only costs latency, never events."""
    if not redis_url:
        return
    try:
        _client(redis_url).publish(channel(job_id), b"1")
    except Exception as exc:  # noqa: BLE001 - the database already holds the events
        log.warning("notify: publish for %s failed: %s", job_id, exc)


class Waiter:
    """Waits until a job's events may have changed: a pub/sub message, or at most `timeout` seconds."""

    def __init__(self, redis_url: str | None, job_id: str):
        self.redis_url, self.job_id = redis_url, job_id
        self._pubsub: Any = None
        self._client: Any = None

    async def wait(self, timeout: float) -> None:
        if not self.redis_url:
            await asyncio.sleep(min(timeout, POLL_INTERVAL_S))
            return
        try:
            if self._pubsub is None:
                await self._subscribe()
            await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - fall back to polling while Redis is away
            log.warning("notify: waiting on %s failed: %s", self.job_id, exc)
            await self.close()
            await asyncio.sleep(min(timeout, POLL_INTERVAL_S))

    async def _subscribe(self) -> None:
        import redis.asyncio as aioredis

        assert self.redis_url is not None
        self._client = aioredis.Redis.from_url(self.redis_url, socket_connect_timeout=2)
        self._pubsub = self._client.pubsub()
        await self._pubsub.subscribe(channel(self.job_id))

    async def close(self) -> None:
        pubsub, client, self._pubsub, self._client = self._pubsub, self._client, None, None
        for thing in (pubsub, client):
            if thing is not None:
                try:
                    await thing.aclose()
                except Exception:  # noqa: BLE001 - closing a broken connection
                    pass
