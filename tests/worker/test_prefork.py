"""The worker's pool replaces a job's process as soon as it has exited. A dying process's sentinel can close a moment
before the kernel lets it be reaped; that window cannot be forced from a test, so a stand-in `maintain_pool` plays
billiard's reap: it finds the process gone only from its n-th call. The real pools run in
tests/integration/test_worker_process.py."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from billiard.common import restart_state
from billiard.exceptions import RestartFreqExceeded
from billiard.pool import CLOSE, RUN
from celery.concurrency import asynpool

from worker import prefork


@dataclass(eq=False)
class Proc:
    pid: int
    exitcode: int | None = None


class Hub:
    """The event loop's timers, run by hand."""

    def __init__(self) -> None:
        self.later: list[tuple[float, Callable[..., None], tuple[Any, ...]]] = []

    def call_later(self, delay: float, callback: Callable[..., None], *args: Any) -> None:
        self.later.append((delay, callback, args))

    def run(self) -> list[float]:
        delays = []
        while self.later:
            delay, callback, args = self.later.pop(0)
            delays.append(delay)
            callback(*args)
        return delays


def evented_pool(monkeypatch: pytest.MonkeyPatch, reapable_from: int) -> tuple[prefork.AsynPool, Proc, list[int]]:
    """Our AsynPool, not started, with one process that exited and that a reap finds gone from the `reapable_from`-th
    try; returns the pool, the process and the list of reap calls."""
    evented = object.__new__(prefork.AsynPool)
    exited, replacement = Proc(101, exitcode=155), Proc(102)
    evented._pool, evented._state = [exited], RUN
    calls: list[int] = []

    def maintain_pool() -> None:
        calls.append(1)
        if len(calls) >= reapable_from and exited in evented._pool:
            evented._pool[:] = [replacement]

    evented.maintain_pool = maintain_pool  # type: ignore[method-assign]
    # Celery's handler of a closed sentinel: it stops watching it, then reaps once.
    monkeypatch.setattr(asynpool.AsynPool, "_event_process_exit", lambda self, hub, proc: self.maintain_pool())
    return evented, exited, calls


def test_a_process_reaped_at_its_sentinel_is_replaced_without_a_retry(monkeypatch, caplog):
    evented, exited, calls = evented_pool(monkeypatch, reapable_from=1)
    hub = Hub()
    with caplog.at_level(logging.INFO, logger="worker.prefork"):
        evented._event_process_exit(hub, exited)
    assert calls == [1] and hub.later == []
    assert "pool process 101 ended (exit code 155); 102 takes the next job" in caplog.text


def test_a_process_not_yet_reapable_at_its_sentinel_is_reaped_by_retries_not_left_to_the_timer(monkeypatch, caplog):
    evented, exited, calls = evented_pool(monkeypatch, reapable_from=4)
    hub = Hub()
    with caplog.at_level(logging.INFO, logger="worker.prefork"):
        evented._event_process_exit(hub, exited)
        delays = hub.run()
    assert len(calls) == 4 and delays == [prefork.REAP_RETRY_S] * 3  # and no retry once it is gone
    assert [p.pid for p in evented._pool] == [102]
    assert "pool process 101 ended" in caplog.text


def test_retries_stop_when_the_pool_closes_or_after_their_limit(monkeypatch):
    evented, exited, calls = evented_pool(monkeypatch, reapable_from=10**6)
    monkeypatch.setattr(prefork, "REAP_TRIES", 5)
    hub = Hub()
    evented._event_process_exit(hub, exited)
    assert len(hub.run()) == 5 and len(calls) == 6  # then the pool's own maintenance timer takes over

    evented._state = CLOSE
    evented._event_process_exit(hub, exited)
    assert hub.later == []


class ThreadedPool:
    """What billiard's supervisor thread touches of its pool; `maintain` plays `_maintain_pool`."""

    def __init__(self, maintain: Callable[[ThreadedPool], None]):
        self._pool: list[Proc] = [Proc(201, exitcode=155)]
        self._processes, self._state = 1, RUN
        self.restart_state = self.steady = restart_state(None, 1)  # billiard's default: no limit
        self.maintain, self.calls, self.closed = maintain, 0, False

    def _maintain_pool(self) -> None:
        self.calls += 1
        self.maintain(self)

    def close(self) -> None:
        self.closed = True

    def join(self) -> None:
        pass


def test_supervisor_replaces_an_exited_process_and_keeps_the_steady_restart_limit(monkeypatch, caplog):
    monkeypatch.setattr(prefork, "MAINTAIN_S", 0.001)

    def maintain(threaded: ThreadedPool) -> None:
        if threaded.calls == 30:  # past the start-up burst
            threaded._pool = [Proc(202)]
        if threaded.calls == 40:
            threaded._state = CLOSE

    threaded = ThreadedPool(maintain)
    with caplog.at_level(logging.INFO, logger="worker.prefork"):
        prefork.Supervisor(threaded).body()
    assert threaded.calls == 40 and threaded.restart_state is threaded.steady and not threaded.closed
    assert caplog.text.count("pool process 201 ended (exit code 155); 202 takes the next job") == 1


def test_supervisor_stops_a_pool_whose_processes_die_at_start(monkeypatch):
    # As billiard's own supervisor: a burst under a strict restart limit, so a broken pool does not restart forever.
    monkeypatch.setattr(prefork, "MAINTAIN_S", 0.001)
    threaded = ThreadedPool(lambda p: p.restart_state.step())  # every pass restarts a process that died at once
    with pytest.raises(RestartFreqExceeded):
        prefork.Supervisor(threaded).body()
    assert threaded.closed and threaded.calls <= 11
