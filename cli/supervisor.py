"""The worker pool of `trickserve up`: keeps worker processes alive, and never lets one outlive the supervisor.

Workers run in sessions of their own, so that Ctrl-C in a terminal reaches the supervisor only and it stops them in
order. Nothing then ends them by itself when the supervisor dies, so two guards do:
- a graceful stop (Ctrl-C, SIGTERM from `docker stop` or systemd) stops the pool before the process exits
  (cli.service runs `stop` before uvicorn re-raises the signal it caught);
- a sudden death (SIGKILL, a crash) kills them through the kernel: each worker asks for SIGKILL when the thread
  that started it ends (Linux PR_SET_PDEATHSIG). Its job's lease then runs out and the job resumes from its last
  checkpoint under the next supervisor, as after any crash.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger("trickserve.supervisor")
RESTART_BACKOFF_S = (1, 2, 5, 10, 30)
PR_SET_PDEATHSIG = 1


class WorkerPool:
    """Keeps worker processes alive: one that dies is restarted with back-off, as a process manager would."""

    def __init__(self, argvs: list[list[str]]):
        self.argvs = argvs
        self.procs: list[subprocess.Popen | None] = [None] * len(argvs)
        self.restarts = [0] * len(argvs)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._spawned = threading.Event()
        self._lock = threading.Lock()
        # Every worker is started from this one thread, which lives until the pool is stopped: the kernel's
        # parent-death signal follows the thread that forked, not the process.
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    def start(self) -> None:
        """Start every worker; returns once they are all started."""
        self._thread.start()
        self._spawned.wait()

    def _spawn(self, i: int) -> None:
        self.procs[i] = subprocess.Popen(
            self.argvs[i], start_new_session=True, preexec_fn=_die_with_parent(os.getpid())
        )

    def _watch(self) -> None:
        try:
            for i in range(len(self.argvs)):
                self._spawn(i)
        finally:
            self._spawned.set()
        while not self._stopping.wait(1.0):
            for i, proc in enumerate(self.procs):
                if proc is not None and proc.poll() is not None and not self._stopping.is_set():
                    delay = RESTART_BACKOFF_S[min(self.restarts[i], len(RESTART_BACKOFF_S) - 1)]
                    log.warning("worker %d exited with %s; restarting in %ss", i, proc.returncode, delay)
                    print(f"trickserve: worker {i} exited ({proc.returncode}); restarting", file=sys.stderr)
                    self.restarts[i] += 1
                    if not self._stopping.wait(delay):
                        self._spawn(i)
        self._stopped.wait()  # keep the workers' parent thread alive until stop() has ended them in order

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to each worker's process group, then SIGKILL after `grace_s`. The pool child training a job ends
        at once with its group, and the job resumes from its last checkpoint after the next start. Safe to call
        twice."""
        with self._lock:
            if self._stopped.is_set():
                return
            self._stopping.set()
            live = [p for p in self.procs if p is not None and p.poll() is None]
            for p in live:
                _signal_group(p, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for p in live:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _signal_group(p, signal.SIGKILL)
                    p.wait()
            self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()


def _die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """What the worker runs before exec: ask for SIGKILL when its parent thread dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def ask() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before the request took effect
            os._exit(1)

    return ask


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
