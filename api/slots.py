"""Caps on open event streams: per tenant (across API processes through Redis when there is one) and per process.

A stream takes a slot before it starts and gives it back however it ends. In Redis a tenant's slots are a sorted
set of (process, stream) members scored by when they expire: each process renews its own, so the slots of a
process that died without giving them back expire on their own after SLOT_TTL_S."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from api.errors import ApiError, too_many

log = logging.getLogger(__name__)
GiveBack = Callable[[], Awaitable[None]]
SLOT_TTL_S = 60  # a slot not renewed this long belonged to a process that is gone
KEY_PREFIX = "trickserve:streams:"
BUSY_RETRY_AFTER_S = 5  # Retry-After when this process holds as many streams as it may

# KEYS[1]: the tenant's set; ARGV: limit, member, ttl. Drops expired slots, then takes one if fewer than `limit`
# are held. The time is Redis's own, so that the clocks of the API machines do not matter.
_TAKE = """
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])))
return 1
"""
# KEYS: the tenants' sets; ARGV: ttl, then one member per key. Pushes the expiry of this process's slots on.
_RENEW = """
local time = redis.call('TIME')
local expires = tonumber(time[1]) + tonumber(time[2]) / 1e6 + tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', expires, ARGV[i + 1])
  redis.call('EXPIRE', key, math.ceil(tonumber(ARGV[1])))
end
return 0
"""


class StreamSlots:
    """Open event streams of this process, per tenant and in all; with `redis_url`, per tenant across processes."""

    def __init__(self, per_tenant: int, per_process: int, retry_after_s: int, redis_url: str | None = None):
        self.per_tenant, self.per_process, self.retry_after_s = per_tenant, per_process, retry_after_s
        self.open: Counter[str] = Counter()  # per tenant, in this process
        self.held: dict[str, str] = {}  # Redis member -> tenant, for renewal
        self.redis: Any = None
        if redis_url:
            import redis.asyncio as aioredis

            self.redis = aioredis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.process = secrets.token_hex(6)
        self._warned = False

    async def take(self, tenant_id: str) -> GiveBack:
        """Take a slot (429 when the tenant has none left, 503 when this process has none); returns the function
        that gives it back, safe to call twice."""
        if sum(self.open.values()) >= self.per_process:
            message = f"this API process serves its maximum of {self.per_process} event streams; try again later"
            raise ApiError(503, "too_many_streams", message, headers={"Retry-After": str(BUSY_RETRY_AFTER_S)})
        member = f"{self.process}:{secrets.token_hex(6)}"
        shared = await self._take_shared(tenant_id, member)
        if shared is False or (shared is None and self.open[tenant_id] >= self.per_tenant):
            message = f"at most {self.per_tenant} open event streams per tenant"
            raise too_many("too_many_streams", message, self.retry_after_s)
        self.open[tenant_id] += 1
        if shared:
            self.held[member] = tenant_id
        given_back = False

        async def give_back() -> None:
            nonlocal given_back
            if not given_back:
                given_back = True
                self.open[tenant_id] -= 1
                if self.held.pop(member, None) is not None:
                    await self._redis_call("zrem", KEY_PREFIX + tenant_id, member)

        return give_back

    async def _take_shared(self, tenant_id: str, member: str) -> bool | None:
        """True/False: Redis gave the slot or refused it; None: no Redis (or it is away), count in this process."""
        if self.redis is None:
            return None
        taken = await self._redis_call("eval", _TAKE, 1, KEY_PREFIX + tenant_id, self.per_tenant, member, SLOT_TTL_S)
        return None if taken is None else bool(taken)

    async def keep_renewing(self) -> None:
        """Renew this process's slots in Redis every third of their time to live, until cancelled."""
        while self.redis is not None:
            await asyncio.sleep(SLOT_TTL_S / 3)
            held = list(self.held.items())
            if held:
                keys = [KEY_PREFIX + tenant for _, tenant in held]
                await self._redis_call("eval", _RENEW, len(keys), *keys, SLOT_TTL_S, *(m for m, _ in held))

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

    async def _redis_call(self, name: str, *args: Any) -> Any:
        """The call's answer, or None when Redis is away: streams are then counted per process (logged once)."""
        try:
            result = await getattr(self.redis, name)(*args)
        except Exception as exc:  # noqa: BLE001 - a Redis outage must not take the streams down with it
            if not self._warned:
                log.warning("stream slots: Redis unavailable, counting streams per API process: %s", exc)
            self._warned = True
            return None
        self._warned = False
        return result
