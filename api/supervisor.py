"""Process management for `trickserve up|api|worker|migrate`: the API in this process, workers as children."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger("trickserve.supervisor")
RESTART_BACKOFF_S = (1, 2, 5, 10, 30)


def worker_argv(queues: str, concurrency: int, name: str) -> list[str]:
    """The command line of one Celery worker process consuming `queues`."""
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", queues,
            "-c", str(concurrency), "-n", f"{name}@%h", "--loglevel", "INFO"]


def cmd_migrate(args: argparse.Namespace) -> int:
    from core.db import init_db

    init_db()
    print("database schema is up to date")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    argv = worker_argv(args.queues, args.concurrency, f"worker-{os.getpid()}")
    os.execv(argv[0], argv)
    return 0  # not reached


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run("api.main:create_app", factory=True, host=args.host, port=args.port, log_level="info")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """Embedded default: migrate, start supervised workers, serve the API until Ctrl-C, then stop the workers."""
    import uvicorn

    from core.config import get_settings
    from core.db import init_db

    settings = get_settings()
    os.environ["TRICKSERVE_HOME"] = str(settings.home)  # children resolve the same folder whatever their cwd
    settings.ensure_dirs()
    init_db()
    _announce_key(settings)
    pool = WorkerPool([worker_argv("cpu,gpu", 1, f"worker{i}") for i in range(args.workers)])
    pool.start()
    print(f"trickserve: API on http://{args.host}:{args.port} (docs at /docs), {args.workers} worker(s), "
          f"data in {settings.home}", flush=True)
    try:
        uvicorn.run("api.main:create_app", factory=True, host=args.host, port=args.port, log_level="warning")
    finally:
        pool.stop()
    return 0


def _announce_key(settings) -> None:
    """Print the embedded tenant's API key when one was created (authentication is set up by api.auth)."""
    try:
        from api.auth import ensure_embedded_key
    except ImportError:
        return
    key, created = ensure_embedded_key(settings)
    if created:
        print(f"trickserve: created API key for tenant 'default' (saved to {settings.home / 'api-key'}):\n{key}")


class WorkerPool:
    """Keeps worker processes alive: one that dies is restarted with back-off, as a process manager would."""

    def __init__(self, argvs: list[list[str]]):
        self.argvs = argvs
        self.procs: list[subprocess.Popen | None] = [None] * len(argvs)
        self.restarts = [0] * len(argvs)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    def start(self) -> None:
        for i in range(len(self.argvs)):
            self._spawn(i)
        self._thread.start()

    def _spawn(self, i: int) -> None:
        # A session of its own: Ctrl-C reaches the supervisor only, which then stops workers in order.
        self.procs[i] = subprocess.Popen(self.argvs[i], start_new_session=True)

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            for i, proc in enumerate(self.procs):
                if proc is not None and proc.poll() is not None and not self._stopping.is_set():
                    delay = RESTART_BACKOFF_S[min(self.restarts[i], len(RESTART_BACKOFF_S) - 1)]
                    log.warning("worker %d exited with %s; restarting in %ss", i, proc.returncode, delay)
                    print(f"trickserve: worker {i} exited ({proc.returncode}); restarting", file=sys.stderr)
                    self.restarts[i] += 1
                    if not self._stopping.wait(delay):
                        self._spawn(i)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM (Celery's warm shutdown), then SIGKILL after `grace_s`; an interrupted job resumes later."""
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


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
