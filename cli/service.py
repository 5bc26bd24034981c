"""Service commands: `up` (the embedded default: API plus supervised workers), `api`, `worker` and `migrate`.

These are the entry points of the service's processes: each reads the settings once and passes them down."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess

from core.config import Settings

MAX_DEFAULT_WORKERS = 4  # each job's training uses several cores itself: more workers by default would crowd them


def register(sub: argparse._SubParsersAction) -> None:
    """Add `up`, `api`, `worker` and `migrate` to the `trickserve` parser."""
    p = sub.add_parser("up", help="run the API and workers on the embedded default (SQLite + filesystem broker)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help=f"worker processes, one job each at a time (default: one per CPU core this process may use, at most "
        f"{MAX_DEFAULT_WORKERS}: %(default)s here)",
    )
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("api", help="run the HTTP API only")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--workers", type=int, default=1, help="API processes sharing the port (one per core is a good start)"
    )
    p.add_argument(
        "--graceful-shutdown-s",
        type=int,
        default=None,
        help="on SIGTERM, close connections still open (event streams) after this long; default: wait",
    )
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("worker", help="run one Celery worker process")
    p.add_argument("--queues", default="cpu,gpu", help="comma-separated queues to consume")
    p.add_argument("--concurrency", type=int, default=1)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("migrate", help="upgrade the database schema to the latest version")
    p.set_defaults(func=cmd_migrate)


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity, where the system has one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def default_workers() -> int:
    """One worker per CPU core this process may run on, at most MAX_DEFAULT_WORKERS and at least one."""
    return max(1, min(MAX_DEFAULT_WORKERS, available_cores()))


def share_cores(workers: int) -> None:
    """Give each of `workers` workers on this machine its share of the cores for torch's threads, unless
    OMP_NUM_THREADS says otherwise. Each one's torch would otherwise start a thread per core, and N workers on N
    cores would run N x N threads that wait for each other: a study's trials ran 5-10 times slower so."""
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, available_cores() // workers)))


def worker_argv(queues: str, concurrency: int, name: str) -> list[str]:
    """The command line of one Celery worker process consuming `queues`."""
    return [sys.executable, "-m", "celery", "-A", "worker.main", "worker", "-Q", queues,
            "-c", str(concurrency), "-n", f"{name}@%h", "--loglevel", "INFO"]  # fmt: skip


def cmd_migrate(args: argparse.Namespace) -> int:
    from core.db import init_db

    init_db(Settings().database_url)
    print("database schema is up to date")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    argv = worker_argv(args.queues, args.concurrency, f"worker-{os.getpid()}")
    os.execv(argv[0], argv)
    return 0  # not reached


def cmd_api(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise SystemExit("trickserve: --workers must be at least 1")
    serve(
        Settings(),
        args.host,
        args.port,
        log_level="info",
        graceful_shutdown_s=args.graceful_shutdown_s,
        processes=args.workers,
    )
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """Embedded default: migrate, start supervised workers, serve the API until Ctrl-C or SIGTERM, then stop the
    workers. Workers never outlive this process (see cli.supervisor)."""
    from cli.keys import ensure_embedded_key
    from cli.supervisor import WorkerPool
    from core.db import init_db

    settings = Settings()
    os.environ["TRICKSERVE_HOME"] = str(settings.home)  # children resolve the same folder whatever their cwd
    settings.ensure_dirs()
    init_db(settings.database_url)
    key, created = ensure_embedded_key(settings)
    if created:
        print(f"trickserve: created API key for tenant 'default' (saved to {settings.home / 'api-key'}):\n{key}")
    share_cores(args.workers)  # the workers inherit it
    pool = WorkerPool([worker_argv("cpu,gpu", 1, f"worker{i}") for i in range(args.workers)])
    pool.start()
    print(
        f"trickserve: API on http://{args.host}:{args.port} (docs at /docs), {args.workers} worker(s), "
        f"data in {settings.home}",
        flush=True,
    )
    try:
        serve(settings, args.host, args.port, log_level="warning", before_exit=pool.stop)
    finally:
        pool.stop()  # a crash of the server; after a signal the pool is already stopped
    return 0


def serve(
    settings: Settings,
    host: str,
    port: int,
    *,
    log_level: str,
    graceful_shutdown_s: int | None = None,
    before_exit: Callable[[], None] | None = None,
    processes: int = 1,
) -> None:
    """Serve the API on host:port until a signal, publishing jobs through the worker's Celery app. With several
    `processes`, a supervisor starts that many API processes on the one socket (uvicorn's --workers) and restarts
    any that dies; each reads the settings from the environment, as this one did."""
    from api.server import listening_socket

    options = {"host": host, "port": port, "log_level": log_level, "timeout_graceful_shutdown": graceful_shutdown_s}
    if processes > 1:
        config = uvicorn.Config("cli.service:app_from_environment", factory=True, workers=processes, **options)
    else:
        config = uvicorn.Config(app_from_settings(settings), **options)
    try:
        sock = listening_socket(host, port, write_timeout_s=settings.write_timeout_s)
    except OSError as exc:
        raise SystemExit(f"trickserve: cannot listen on {host}:{port}: {exc}") from None
    # uvicorn says where it listens only when it made the socket itself.
    logging.getLogger("uvicorn.error").info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)", host, port)
    if processes > 1:
        Multiprocess(config, sockets=[sock]).run()
    else:
        _Server(config, before_exit).run(sockets=[sock])


def app_from_settings(settings: Settings) -> Any:
    """The API app, publishing jobs through the worker's Celery app."""
    from api.main import create_app
    from worker.celery_app import publisher

    return create_app(settings, send=publisher(settings))


def app_from_environment() -> Any:
    """The app factory each process of `trickserve api --workers N` calls."""
    return app_from_settings(Settings())


class _Server(uvicorn.Server):
    """uvicorn's server, with a hook that runs after its shutdown and before it re-raises the signal it caught.
    That re-raise ends the process at once (SIGTERM's default action), so no `finally` of the caller would run."""

    def __init__(self, config: uvicorn.Config, before_exit: Callable[[], None] | None):
        super().__init__(config)
        self.before_exit = before_exit

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                if self.before_exit is not None:
                    self.before_exit()
