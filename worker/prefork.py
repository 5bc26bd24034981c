"""The worker's process pool: Celery's prefork pool, which replaces a job's process as soon as it has exited.

Every job runs in a fresh pool process (`worker_max_tasks_per_child=1`, worker/celery_app.py): the process exits
after its job and the pool forks a replacement, which takes the next job. Stock Celery 5.7 and billiard 4.3 notice
that exit late, and the next job waits:
- With Redis (an evented broker, `AsynPool`), the pool watches each process's sentinel pipe and reaps the process
  when the pipe closes. The kernel closes a dying process's files a moment before the parent can reap it, so the
  reap can find nothing; the pipe is no longer watched, and the replacement waits for the pool's 5 s maintenance
  timer (seen as gaps of up to 5 s between jobs, more often on a busy machine). `AsynPool` here tries the reap again
  every few milliseconds until the process is gone.
- With the filesystem broker (embedded mode, not evented, billiard's threaded pool), a supervisor thread reaps and
  replaces processes every 0.8 s; `Supervisor` here does it every MAINTAIN_S.
Both log the replacement, naming the process that ended and its exit code.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from billiard import pool as billiard
from billiard.common import restart_state
from billiard.exceptions import RestartFreqExceeded
from celery.concurrency import asynpool, prefork

log = logging.getLogger(__name__)
MAINTAIN_S = 0.05  # how often the threaded pool looks for an exited process (billiard: 0.8 s)
REAP_RETRY_S = 0.005  # after a sentinel closed, how soon the evented pool tries to reap the process again
REAP_TRIES = 1000  # then (5 s later) the pool's own maintenance timer takes over


def _replaced(proc: Any, pool: list[Any]) -> None:
    log.info("pool process %s ended (exit code %s); %s takes the next job", proc.pid, proc.exitcode,
             ", ".join(str(p.pid) for p in pool) or "no process")  # fmt: skip


class AsynPool(asynpool.AsynPool):
    """Celery's pool for evented brokers, which keeps trying to reap a process whose sentinel closed until it can."""

    def _event_process_exit(self, hub: Any, proc: Any) -> None:
        super()._event_process_exit(hub, proc)  # stops watching the sentinel, reaps and replaces if it can
        self._reap_until_gone(hub, proc, REAP_TRIES)

    def _reap_until_gone(self, hub: Any, proc: Any, tries: int) -> None:
        if proc not in self._pool:
            _replaced(proc, self._pool)
        elif tries > 0 and self._state == billiard.RUN:
            hub.call_later(REAP_RETRY_S, self._reap_again, hub, proc, tries - 1)

    def _reap_again(self, hub: Any, proc: Any, tries: int) -> None:
        self.maintain_pool()
        self._reap_until_gone(hub, proc, tries)


class Supervisor(billiard.Supervisor):
    """billiard's supervisor thread of the threaded pool, with its 0.8 s sleep shortened to MAINTAIN_S."""

    def body(self) -> None:
        pool = self.pool
        try:
            # As billiard does: a burst at start, under a strict restart limit, so that a pool whose processes die
            # at once stops the worker instead of restarting them forever.
            steady, pool.restart_state = pool.restart_state, restart_state(10 * pool._processes, 1)
            for _ in range(int(1 / MAINTAIN_S)):
                if self._state != billiard.RUN or pool._state != billiard.RUN:
                    break
                self._maintain()
            pool.restart_state = steady
            while self._state == billiard.RUN and pool._state == billiard.RUN:
                self._maintain()
        except RestartFreqExceeded:
            pool.close()
            pool.join()
            raise

    def _maintain(self) -> None:
        before = list(self.pool._pool)
        self.pool._maintain_pool()
        for proc in before:
            if proc not in self.pool._pool:
                _replaced(proc, self.pool._pool)
        time.sleep(MAINTAIN_S)


class BlockingPool(billiard.Pool):
    """billiard's threaded pool (Celery's `BlockingPool`), with the faster supervisor."""

    Supervisor = Supervisor


class TaskPool(prefork.TaskPool):
    """Celery's prefork pool (`worker_pool`), with the pools above."""

    Pool = AsynPool
    BlockingPool = BlockingPool
