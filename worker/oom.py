"""A pool process killed by the kernel's OOM killer fails its job as `out_of_memory` instead of losing its worker.

A SIGKILL alone proves nothing (an operator's kill -9 must leave the job to the reaper, which retries it from its
checkpoint), so the worker's main process reads the kernel's count of OOM kills in its memory cgroup (cgroup v2
`memory.events`, v1 `memory.oom_control`; the pool process inherits the cgroup) when a job's message arrives and
again when the process running it is found dead by SIGKILL: a count that went up means the kernel killed it.

Limits: Linux only, with the memory controller mounted where /proc/self/mountinfo says (containers do); elsewhere
every dead pool process is a lost worker, as before. A kill elsewhere in the same cgroup while the job runs is
blamed on it; with one pool process per worker (the default) that process is the cgroup's largest by far. A
system-wide OOM kill counts too on kernels that charge it to the victim's cgroup (4.19 and later).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import signals

from core import jobs
from core.models import FailureClass
from core.notify import publish
from worker.celery_app import RUN_TASK, WorkerApp

log = logging.getLogger(__name__)
KEEP_RECEIVED = 64  # counts kept for messages whose outcome the main process never hears of (they succeeded)
UNLIMITED = 2**62  # cgroup v1 reports no limit as a huge number


@dataclass(frozen=True)
class MemoryCgroup:
    """The memory cgroup folder of a process, and which version's files it has."""

    folder: Path
    version: int

    @classmethod
    def of(cls, proc: Path = Path("/proc/self")) -> MemoryCgroup | None:
        """The memory cgroup of the process whose /proc folder is `proc`; None where none can be read."""
        try:
            memberships = (proc / "cgroup").read_text().splitlines()
            mounts = (proc / "mountinfo").read_text().splitlines()
        except OSError:
            return None
        for version, controllers in ((1, "memory"), (2, "")):
            path = next((p for _, c, p in _split(memberships) if controllers in c.split(",")), None)
            mount = _mount(mounts, version)
            if path is None or mount is None:
                continue
            root, point = mount
            relative = Path(path).relative_to(root) if Path(path).is_relative_to(root) else Path()
            cgroup = cls(point / relative, version)
            if cgroup.oom_kills() is not None:
                return cgroup
        return None

    def oom_kills(self) -> int | None:
        """How many processes of this cgroup (and those below it) the OOM killer has ended."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            fields = dict(line.split() for line in (self.folder / name).read_text().splitlines() if " " in line)
        except OSError:
            return None
        return int(fields["oom_kill"]) if "oom_kill" in fields else None

    def limit_bytes(self) -> int | None:
        """The memory limit of this cgroup; None when there is none."""
        name = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
        try:
            text = (self.folder / name).read_text().strip()
        except OSError:
            return None
        return None if text == "max" or int(text) >= UNLIMITED else int(text)


def _split(lines: list[str]) -> list[tuple[str, str, str]]:
    return [(parts[0], parts[1], parts[2]) for line in lines if len(parts := line.split(":", 2)) == 3]


def _mount(mounts: list[str], version: int) -> tuple[Path, Path] | None:
    """The (root, mount point) of the cgroup filesystem holding the memory controller, from /proc/self/mountinfo."""
    for line in mounts:
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        if (version == 2 and tail[0] == "cgroup2") or (
            version == 1 and tail[0] == "cgroup" and "memory" in tail[2].split(",")
        ):
            return Path(fields[3]), Path(fields[4])
    return None


def died_of_sigkill(exc: BaseException) -> bool:
    """Whether billiard reported the pool process dead by SIGKILL, as the OOM killer ends it."""
    return isinstance(exc, WorkerLostError) and "signal 9 " in f"{exc} "


def fail_out_of_memory(app: WorkerApp, job_id: str, hostname: str, cgroup: MemoryCgroup) -> bool:
    """Fail the attempt that a process of this worker (`hostname`) held: the kernel killed it for memory."""
    limit = cgroup.limit_bytes()
    where = f"the worker's limit of {limit / 2**20:.0f} MiB" if limit else "the machine's memory"
    message = f"out of memory: the kernel killed the process running the job when it reached {where}"
    with app.db.session() as session:
        failed = jobs.fail_held_attempt(
            session=session, job_id=job_id, held_by=f"{hostname}/", failure_class=FailureClass.out_of_memory,
            message=message,
        )  # fmt: skip
    if failed:
        log.error("job %s: %s", job_id, message)
        publish(app.settings.redis_url, job_id)
    return failed


def watch(app: WorkerApp) -> None:
    """In a worker's main process: fail the job of a pool process that the OOM killer ended (worker/main.py)."""
    cgroup = MemoryCgroup.of()
    if cgroup is None:
        log.info("no memory cgroup to read: a pool process killed for memory counts as a lost worker")
        return
    received: OrderedDict[str, int] = OrderedDict()

    @signals.task_received.connect(weak=False)
    def _count_before(request: Any, **_: Any) -> None:
        kills = cgroup.oom_kills()
        if request.name == RUN_TASK and kills is not None:
            received[request.id] = kills
            while len(received) > KEEP_RECEIVED:
                received.popitem(last=False)

    @signals.task_failure.connect(weak=False)
    def _count_after(sender: Any, task_id: str, exception: BaseException, args: Any, **_: Any) -> None:
        before, after = received.pop(task_id, None), cgroup.oom_kills()
        hostname = getattr(sender.request, "hostname", None)
        if before is None or after is None or not died_of_sigkill(exception) or not hostname or after <= before:
            return
        try:
            fail_out_of_memory(app, args[0], hostname, cgroup)
        except Exception:  # noqa: BLE001 - the lease runs out and the reaper retries it as a lost worker
            log.exception("job %s: its process was killed for memory, and that could not be recorded", args[0])
