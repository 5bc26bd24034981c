"""The worker pool of `trickserve up`, with real processes and real signals: a dead worker is replaced, `stop` ends
them all, and no worker outlives its supervisor, whether it is stopped with SIGTERM or killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cli.service import available_cores, default_workers
from cli.supervisor import WorkerPool
from tests.factories import wait_for

REPO = Path(__file__).resolve().parents[2]
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    below = children(pid)
    return below + [d for child in below for d in descendants(child)]


def all_gone(pids: list[int]) -> bool:
    return not any(alive(p) for p in pids)


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def pool() -> Iterator[WorkerPool]:
    workers = WorkerPool([SLEEPER, SLEEPER])
    try:
        yield workers
    finally:
        workers.stop(grace_s=1)


def pids(pool: WorkerPool) -> list[int]:
    return [p.pid for p in pool.procs if p is not None]


def test_a_killed_worker_is_replaced_and_stop_ends_every_worker(pool: WorkerPool):
    pool.start()
    first, second = pids(pool)
    assert alive(first) and alive(second)
    os.kill(first, signal.SIGKILL)
    replaced = wait_for(lambda: pids(pool)[0] != first and pids(pool)[0], timeout=15, what="a new worker 0")
    assert alive(replaced) and pids(pool)[1] == second  # the other worker was left alone
    pool.stop(grace_s=5)
    assert all_gone([replaced, second])


def ignores_sigterm(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    ignored = int(status.split("SigIgn:")[1].split()[0], 16)
    return bool(ignored & (1 << (signal.SIGTERM - 1)))


def test_stop_kills_a_worker_that_ignores_sigterm():
    stubborn = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "time.sleep(600)"]  # fmt: skip
    pool = WorkerPool([stubborn])
    pool.start()
    try:
        worker = pids(pool)[0]
        wait_for(lambda: ignores_sigterm(worker), timeout=15, what="the worker to ignore SIGTERM")
        pool.stop(grace_s=0.5)
        assert all_gone([worker])
    finally:
        pool.stop(grace_s=0.5)


SUPERVISOR = textwrap.dedent(
    """
    import json, sys, time
    from cli.supervisor import WorkerPool

    pool = WorkerPool([json.loads(sys.argv[1])] * 2)
    pool.start()
    print(json.dumps([p.pid for p in pool.procs]), flush=True)
    time.sleep(600)
    """
)


def test_workers_die_with_a_supervisor_killed_by_sigkill():
    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, json.dumps(SLEEPER)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    workers: list[int] = []
    try:
        workers = json.loads(supervisor.stdout.readline())
        assert len(workers) == 2 and not all_gone(workers)
        supervisor.kill()
        supervisor.wait(timeout=10)
        wait_for(lambda: all_gone(workers), timeout=10, what="the workers to die with their supervisor")
    finally:
        supervisor.kill()
        kill_all(workers)


# ------------------------------------------------------------------------------------------ trickserve up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_trickserve_up_takes_its_workers_with_it(sig: signal.Signals, tmp_path: Path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRICKSERVE_") and k != "OMP_NUM_THREADS"}
    env["TRICKSERVE_HOME"] = str(tmp_path / "home")
    log = (tmp_path / "up.log").open("w")
    up = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "up", "--port", str(port)], cwd=REPO, env=env, stdout=log, stderr=log
    )
    workers: list[int] = []
    try:
        wait_for(lambda: healthy(f"http://127.0.0.1:{port}") or up.poll() is not None, timeout=60, what="/healthz")
        assert up.poll() is None, (tmp_path / "up.log").read_text()
        workers = children(up.pid)
        assert len(workers) == default_workers()  # --workers defaults to one per core, at most 4
        for pid in workers:  # each worker's torch threads get its share of the cores, not all of them
            environ = dict(e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in e)
            assert environ["OMP_NUM_THREADS"] == str(max(1, available_cores() // len(workers)))
        # Each Celery worker forks its pool process once it is ready: wait for them, so that they are tested too.
        wait_for(lambda: all(children(w) for w in workers), timeout=60, what="the Celery pool processes")
        workers = descendants(up.pid)
        up.send_signal(sig)
        assert up.wait(timeout=30) == -sig
        wait_for(lambda: all_gone(workers), timeout=10, what="the workers to end with `trickserve up`")
        if sig == signal.SIGTERM:  # stopped in order, not merely killed by the kernel when `up` ended
            assert "Warm shutdown" in (tmp_path / "up.log").read_text()
    finally:
        up.kill()
        up.wait()
        kill_all(workers)
        log.close()
