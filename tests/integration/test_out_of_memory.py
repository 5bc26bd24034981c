"""A job whose pool process the kernel's OOM killer ends, for real: the worker runs in a memory cgroup of its own
with a limit the job's data go past. The job fails as out_of_memory on its first attempt, and is not retried."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.factories import make_spec
from worker.oom import MemoryCgroup

pytestmark = pytest.mark.integration
LIMIT = 1536 * 2**20  # the worker process (Celery and PyTorch) fits; the job's 2 GB of data do not
HUGE_DATA = {
    "dataset": "builtin:synthetic",
    "normalize": "none",
    "synthetic": {"n_samples": 500_000, "n_features": 1000},
}


def _unavailable(message: str) -> None:
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(message)
    pytest.skip(message)


@contextmanager
def memory_cgroup(limit_bytes: int) -> Iterator[Path]:
    """A memory cgroup below this process's own, limited to `limit_bytes` without swap; removed afterwards (its
    processes must have ended)."""
    own = MemoryCgroup.of()
    if own is None or own.version != 1:
        _unavailable("needs a cgroup v1 memory controller (v2 forbids a child cgroup beside this process)")
    folder = own.folder / f"trickserve-test-{secrets.token_hex(4)}"
    try:
        folder.mkdir()
        (folder / "memory.limit_in_bytes").write_text(str(limit_bytes))
    except OSError as exc:
        _unavailable(f"cannot create a memory cgroup (root needed): {exc}")
    try:
        yield folder
    finally:
        for _ in range(50):  # a killed process leaves its cgroup a moment after it is reaped
            try:
                folder.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def test_a_job_killed_by_the_oom_killer_fails_as_out_of_memory_without_a_retry(embedded, start_worker, monkeypatch):
    # A lease longer than the worker takes to notice its dead pool process, so that the reaper does not retry first.
    monkeypatch.setenv("TRICKSERVE_LEASE_S", "10")
    with memory_cgroup(LIMIT) as cgroup:
        worker = start_worker(cgroup=cgroup)
        try:
            job = embedded.enqueue_new(make_spec(data=HUGE_DATA))
            done = embedded.wait_terminal(job.job_id, worker, timeout=60)
            assert MemoryCgroup(cgroup, 1).oom_kills() == 1, worker.log()
            assert worker.proc.poll() is None  # the worker's main process lives on
        finally:
            worker.kill()
    assert (done.status, done.failure_class, done.attempt) == ("failed", "out_of_memory", 1), worker.log()
    assert done.failure_message.startswith("out of memory: the kernel killed the process running the job")
    assert "1536 MiB" in done.failure_message
    assert embedded.statuses(job.job_id) == ["queued", "running", "failed"]
