"""GET /v1/jobs/{id}/events against a real uvicorn server: live delivery in id order, Last-Event-ID resume without
gap or repeat, keep-alive pings, the end event, the per-tenant stream limit, Redis wake-ups."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy.orm import Session, sessionmaker

from core import jobs, notify
from tests.factories import claim, epoch_event, finish, make_spec, record

READ_TIMEOUT_S = 5.0
REDIS_URL = "redis://127.0.0.1:6379/0"


class Stream:
    """An open event stream, read one message at a time (comments, e.g. pings, are messages of their own)."""

    def __init__(self, response: httpx.Response):
        self.response = response
        self._lines = response.iter_lines()

    def next(self) -> dict[str, Any] | None:
        """The next message as {id, event, data (parsed), comment}; None once the server closed the stream."""
        message: dict[str, Any] = {}
        for line in self._lines:
            if not line:
                if message:
                    return message
            elif line.startswith(":"):
                message["comment"] = line[1:].strip()
            else:
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                message[field] = json.loads(value) if field == "data" else value
        return message or None

    def next_event(self) -> dict[str, Any]:
        """The next message that is an event (skipping keep-alive comments)."""
        while True:
            message = self.next()
            assert message is not None, "the stream ended early"
            if "event" in message:
                return message

    def rest(self) -> list[dict[str, Any]]:
        """Every event until the server closes the stream."""
        events = []
        while (message := self.next()) is not None:
            if "event" in message:
                events.append(message)
        return events


@contextmanager
def open_stream(http: httpx.Client, job_id: str, **kwargs: Any) -> Iterator[Stream]:
    with http.stream("GET", f"/v1/jobs/{job_id}/events", **kwargs) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield Stream(response)


@pytest.fixture
def http(make_server: Callable[..., Any]) -> Iterator[httpx.Client]:
    with make_server().client(timeout=READ_TIMEOUT_S) as client:
        yield client


def submit(http: httpx.Client) -> str:
    r = http.post("/v1/jobs", json=make_spec())
    assert r.status_code == 201
    return r.json()["id"]


def ids(events: list[dict[str, Any]]) -> list[int]:
    return [int(e["id"]) for e in events if "id" in e]


def stored_ids(sessions: sessionmaker[Session], job_id: str) -> list[int]:
    with sessions() as s:
        return [e.job_event_id for e in jobs.list_events(s, job_id)]


def test_events_arrive_live_in_order_and_the_stream_ends_after_the_terminal_status(
    http: httpx.Client, sessions: sessionmaker[Session]
):
    job_id = submit(http)
    attempt = claim(sessions, job_id)
    with open_stream(http, job_id) as stream:
        first = [stream.next_event(), stream.next_event()]
        assert [(e["event"], e["data"]["data"]["to"]) for e in first] == [("status", "queued"), ("status", "running")]
        record(sessions, job_id, attempt, [epoch_event(1)])
        started = time.monotonic()
        live = stream.next_event()
        assert time.monotonic() - started < 2.0
        assert live["event"] == "epoch_end" and live["data"]["epoch"] == 1 and live["data"]["attempt"] == attempt
        assert live["data"]["data"]["val/loss"] == 1.5 and set(live["data"]) == {"kind", "step", "epoch", "attempt",
                                                                                 "data", "at"}  # fmt: skip
        early_stop = {"kind": "early_stop", "step": 20, "epoch": 2, "data": {"monitor": "val/loss"}}
        record(sessions, job_id, attempt, [epoch_event(2), early_stop])
        finish(sessions, job_id, attempt, status="early_stopped", stop_reason="early_stop")
        rest = stream.rest()
    assert [e["event"] for e in rest] == ["epoch_end", "early_stop", "status", "end"]
    assert rest[2]["data"]["data"]["to"] == "early_stopped" and rest[3]["data"] == {"status": "early_stopped"}
    received = ids(first + [live] + rest)
    assert received == sorted(set(received)) == stored_ids(sessions, job_id)  # strictly increasing, all of them


def test_reconnecting_with_last_event_id_gets_exactly_the_remaining_events(
    http: httpx.Client, sessions: sessionmaker[Session]
):
    job_id = submit(http)
    attempt = claim(sessions, job_id)
    record(sessions, job_id, attempt, [epoch_event(1), epoch_event(2)])
    with open_stream(http, job_id) as stream:
        before = [stream.next_event() for _ in range(3)]  # two status events and epoch 1
    record(sessions, job_id, attempt, [epoch_event(3)])  # while the client is away
    with open_stream(http, job_id, headers={"Last-Event-ID": before[-1]["id"]}) as stream:
        resumed = [stream.next_event(), stream.next_event()]
        record(sessions, job_id, attempt, [epoch_event(4)])
        resumed.append(stream.next_event())
        finish(sessions, job_id, attempt)
        resumed += stream.rest()
    assert [e["data"]["epoch"] for e in resumed[:3]] == [2, 3, 4]
    assert ids(before) + ids(resumed) == stored_ids(sessions, job_id)  # no gap, no repeat
    assert resumed[-1]["event"] == "end"


def test_a_stream_opened_on_a_finished_job_replays_then_ends(http: httpx.Client, sessions: sessionmaker[Session]):
    job_id = submit(http)
    attempt = claim(sessions, job_id)
    record(sessions, job_id, attempt, [epoch_event(1)])
    finish(sessions, job_id, attempt)
    with open_stream(http, job_id) as stream:
        events = stream.rest()
    assert ids(events) == stored_ids(sessions, job_id)
    assert [e["event"] for e in events] == ["status", "status", "epoch_end", "status", "end"]
    middle = ids(events)[1]
    with open_stream(http, job_id, params={"after": middle}) as stream:  # ?after= for clients without headers
        assert ids(stream.rest()) == [i for i in stored_ids(sessions, job_id) if i > middle]
    with open_stream(http, job_id, params={"after": 0}, headers={"Last-Event-ID": str(middle)}) as stream:
        assert ids(stream.rest())[0] > middle  # the header, sent on automatic reconnects, wins


def test_an_idle_stream_gets_keep_alive_pings(make_server: Callable[..., Any]):
    with make_server(sse_ping_s=0.2).client(timeout=READ_TIMEOUT_S) as http:
        job_id = submit(http)
        with open_stream(http, job_id) as stream:
            assert stream.next_event()["event"] == "status"
            started = time.monotonic()
            message = stream.next()
    assert message is not None and "ping" in message.get("comment", "") and "event" not in message
    assert time.monotonic() - started < 2.0


def test_open_streams_per_tenant_are_limited(make_server: Callable[..., Any]):
    with make_server(sse_max_connections_per_tenant=1).client(timeout=READ_TIMEOUT_S) as http:
        job_id = submit(http)
        with open_stream(http, job_id) as stream:
            stream.next_event()
            refused = http.get(f"/v1/jobs/{job_id}/events")
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_streams"
            assert int(refused.headers["retry-after"]) > 0
        deadline = time.monotonic() + 3  # the slot comes back once the server notices the disconnect
        while (status := _first_status(http, job_id)) == 429 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status == 200


def _first_status(http: httpx.Client, job_id: str) -> int:
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        return response.status_code


def test_bad_last_event_id_is_400(http: httpx.Client):
    job_id = submit(http)
    r = http.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "abc"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_cursor"


def test_redis_wakes_streams_without_waiting_for_a_poll(make_server: Callable[..., Any], sessions):
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError:
        pytest.skip(f"Redis unreachable at {REDIS_URL}")
    from api.hub import WAKE_TIMEOUT_S

    with make_server(redis_url=REDIS_URL).client(timeout=READ_TIMEOUT_S + WAKE_TIMEOUT_S) as http:
        job_id = submit(http)
        attempt = claim(sessions, job_id)
        with open_stream(http, job_id) as stream:
            stream.next_event(), stream.next_event()
            time.sleep(0.3)  # the stream is now waiting on Redis
            started = time.monotonic()
            record(sessions, job_id, attempt, [epoch_event(1)])
            notify.publish(REDIS_URL, job_id)
            assert stream.next_event()["event"] == "epoch_end"
            assert time.monotonic() - started < WAKE_TIMEOUT_S / 2


def test_reconnecting_after_the_end_is_told_to_stop_with_204(http: httpx.Client, sessions: sessionmaker[Session]):
    job_id = submit(http)
    attempt = claim(sessions, job_id)
    finish(sessions, job_id, attempt)
    last = stored_ids(sessions, job_id)[-1]
    r = http.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": str(last)})
    assert r.status_code == 204 and r.content == b""
    with open_stream(http, job_id, headers={"Last-Event-ID": str(last - 1)}) as stream:  # events remain: replay
        assert [e["event"] for e in stream.rest()] == ["status", "end"]


def test_open_streams_per_api_process_are_limited_with_503(make_server: Callable[..., Any]):
    server = make_server(sse_max_connections=1)
    with server.client(timeout=READ_TIMEOUT_S) as http, server.client("other", timeout=READ_TIMEOUT_S) as other:
        job_id, others = submit(http), submit(other)
        with open_stream(http, job_id) as stream:
            stream.next_event()
            refused = other.get(f"/v1/jobs/{others}/events")  # another tenant, under its own cap: the process is full
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "too_many_streams"
            assert int(refused.headers["retry-after"]) > 0


def test_viewers_of_one_job_share_one_reader_and_a_vanished_one_leaves_it(make_server: Callable[..., Any]):
    server = make_server()
    hub = server.app.state.hub
    with server.client(timeout=READ_TIMEOUT_S) as http:
        job_id = submit(http)
        with open_stream(http, job_id) as first, open_stream(http, job_id) as second:
            first.next_event(), second.next_event()
            assert list(hub.feeds) == [job_id] and len(hub.feeds[job_id].subscribers) == 2
        deadline = time.monotonic() + 3  # both clients hung up: the server notices, and the feed stops
        while hub.feeds and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hub.feeds == {} and server.app.state.stream_slots.open["default"] == 0
