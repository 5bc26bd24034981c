"""Stream caps shared by API processes through a real Redis: a tenant's cap holds across processes, a slot comes
back when its stream ends, and the slots of a process that died expire unless renewed."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis

from api import slots as slots_module
from api.errors import ApiError
from api.slots import StreamSlots

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(autouse=True)
def redis_up() -> None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError:
        pytest.skip(f"Redis unreachable at {REDIS_URL}")


def run(test: Callable[..., Awaitable[Any]], processes: int, per_tenant: int = 2) -> Any:
    async def main() -> Any:
        apis = [StreamSlots(per_tenant, 100, 30, REDIS_URL) for _ in range(processes)]  # one per API process
        try:
            return await test(*apis)
        finally:
            for api in apis:
                await api.close()

    return asyncio.run(main())


async def refused(slots: StreamSlots, tenant: str) -> int:
    with pytest.raises(ApiError) as info:
        await slots.take(tenant)
    return info.value.status


def test_a_tenants_cap_holds_across_api_processes():
    tenant = f"slots-{secrets.token_hex(4)}"

    async def scenario(a: StreamSlots, b: StreamSlots) -> None:
        give_back = await a.take(tenant)
        await b.take(tenant)
        assert await refused(a, tenant) == 429 and await refused(b, tenant) == 429
        await a.take(f"{tenant}-other")  # other tenants are not affected
        await give_back()
        await give_back()  # twice is harmless
        await b.take(tenant)
        assert await refused(a, tenant) == 429

    run(scenario, processes=2)


def test_slots_of_a_process_that_died_expire_and_renewed_ones_do_not(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(slots_module, "SLOT_TTL_S", 1)
    tenant = f"slots-{secrets.token_hex(4)}"

    async def scenario(alive: StreamSlots, dead: StreamSlots, other: StreamSlots) -> None:
        renewing = asyncio.create_task(alive.keep_renewing())
        await alive.take(tenant)
        await dead.take(tenant)  # its process "dies": it never renews nor gives back
        assert await refused(other, tenant) == 429
        await asyncio.sleep(2.5)  # past the time to live: the dead process's slot is gone, the renewed one is not
        await other.take(tenant)
        assert await refused(other, tenant) == 429
        renewing.cancel()

    run(scenario, processes=3)


def test_without_redis_streams_are_counted_in_the_process():
    async def scenario() -> None:
        slots = StreamSlots(1, 100, 30, redis_url="redis://127.0.0.1:1/0")  # unreachable: counts locally
        await slots.take("t")
        assert await refused(slots, "t") == 429
        await slots.close()

    asyncio.run(scenario())
