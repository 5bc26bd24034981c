"""The engine callback that stores a running attempt's events in the database and its checkpoints in the artifact
store, with the database's pointer to them; fenced."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy.exc import OperationalError

from core import jobs
from core.artifacts import StorageError, Store, artifact_key, retrying
from core.db import Database
from core.engine.callbacks import Callback, Event, RunContext
from core.engine.events import EventKind
from core.notify import publish
from core.storage import is_disk_full
from worker.logs import Throttled

log = logging.getLogger(__name__)
FLUSH_INTERVAL_S = 0.5  # progress events wait at most this long; anything else is stored at once
CHECKPOINT_SLOTS = 2  # the checkpoint the database points at, and the one being recorded


class Fenced(Exception):
    """This attempt no longer holds the job (its lease was lost; another attempt may run): stop, write nothing."""


class DatabaseFull(Exception):
    """The database refuses writes because its disk is full: the attempt stops rather than train on unrecorded."""


class DBReporter(Callback):
    """Buffers engine events and stores them in batches through core.jobs.record_events (fenced by attempt), then
    wakes up live streams. Raising Fenced from a hook stops the training loop at once, before it writes more."""

    def __init__(
        self,
        *,
        job_id: str,
        attempt: int,
        redis_url: str | None,
        db: Database,
        store: Store,
        storage_retry_s: float = 30.0,
        flush_interval_s: float = FLUSH_INTERVAL_S,
    ):
        self.job_id, self.attempt, self.redis_url, self.db = job_id, attempt, redis_url, db
        self.store, self.storage_retry_s = store, storage_retry_s
        self.flush_interval_s = flush_interval_s
        self.fenced = threading.Event()  # set by a failed write, or by the heartbeat thread when the lease is lost
        self.checkpoint_key: str | None = None  # the stored snapshot the database points at, once this attempt has one
        self._full: BaseException | None = None  # a write the database refused for lack of space (heartbeat thread)
        self._warnings = Throttled(log)
        self._buffer: list[Event] = []
        self._last_flush = time.monotonic()
        self._slot = 0  # the snapshot slot the next checkpoint goes to; the database points at another one
        self.pruned: Any = None  # the study's pruner's decision (core.pruning.Decision) once it says stop

    def on_event(self, ctx: RunContext, event: Event) -> None:
        self.add(event)
        if self.pruned is not None:
            ctx.stop("pruned")  # at the end of the epoch just reported: the engine checkpoints and finishes

    def add(self, event: Event) -> None:
        """Buffer an event; store the buffer now unless it is progress that arrived soon after the last batch."""
        self.check()
        self._buffer.append(event)
        if event.kind != EventKind.progress or time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def on_step_end(self, ctx: RunContext) -> None:
        self.check()

    def on_checkpoint(self, ctx: RunContext, path: str) -> None:
        """Store a snapshot of the checkpoint just written, then point the job at it. The engine rewrites one file
        in place, so a process killed after the next rewrite but before its pointer is stored would leave the
        database naming a step that file no longer holds (the retry would skip that stretch of metrics); the
        pointer names a snapshot instead, which stays as it is until a later pointer has replaced it. The pointer
        moves only once the snapshot is stored whole: while the store is away, the job keeps its last one."""
        self.check()
        snapshot = snapshot_file(Path(path), self._slot)
        key = artifact_key(self.job_id, self.attempt, snapshot.name)
        try:
            retrying(
                lambda: self.store.put_file(key, snapshot),
                within_s=self.storage_retry_s,
                what=f"job {self.job_id}: checkpoint at step {ctx.step}",
            )
        except StorageError as exc:
            kept = "no checkpoint yet" if self.checkpoint_key is None else "the job keeps its last one"
            message = f"checkpoint at step {ctx.step} not stored ({kept}): {exc}"
            log.warning("job %s: %s", self.job_id, message)
            self.add(Event(EventKind.warning, ctx.step, ctx.epoch, {"message": message}))
            return
        try:
            with self.db.session() as session:
                ok = jobs.set_checkpoint(
                    session=session,
                    job_id=self.job_id,
                    attempt=self.attempt,
                    key=key,
                    step=ctx.step,
                    size_bytes=snapshot.stat().st_size,
                )
        except OperationalError as exc:  # the database is away: the next checkpoint moves the pointer
            self._away(exc, "job %s: checkpoint pointer not stored: %s", self.job_id, exc)
            return
        if not ok:
            self.fence()
        self.checkpoint_key = key
        self._slot = (self._slot + 1) % CHECKPOINT_SLOTS

    def on_train_end(self, ctx: RunContext) -> None:
        self.flush()

    def flush(self) -> None:
        """Store the buffered events; they stay buffered (for the next flush) while the database is away."""
        if not self._buffer:
            return
        decisions: list[Any] = []
        try:
            with self.db.session() as session:
                ok = jobs.record_events(
                    session=session, job_id=self.job_id, attempt=self.attempt, events=self._buffer, prune=decisions
                )
        except OperationalError as exc:
            self._away(exc, "job %s: %d events kept for the next flush: %s", self.job_id, len(self._buffer), exc)
            return
        self._warnings.reset()
        self._last_flush = time.monotonic()
        if not ok:
            self.fence()
        self._buffer.clear()
        if decisions:
            self.pruned = decisions[0]
        publish(self.redis_url, self.job_id)

    def check(self) -> None:
        """Raise Fenced once the attempt has lost the job, DatabaseFull once the database has no space to record it."""
        if self.fenced.is_set():
            raise Fenced(f"job {self.job_id}: attempt {self.attempt} lost its lease")
        if self._full is not None:
            raise DatabaseFull(f"the database is full: {_first_line(self._full)}") from self._full

    def database_full(self, exc: BaseException) -> None:
        """Stop the attempt at its next step: the database (another thread found) has no space left."""
        self._full = exc

    def _away(self, exc: OperationalError, message: str, *args: object) -> None:
        # A full database stays full while this attempt trains: stop it (it keeps its last checkpoint). Otherwise
        # the database is away for a while; say so once in a while, not at every event.
        if is_disk_full(exc):
            self.database_full(exc)
            self.check()
        self._warnings.warning(message, *args)

    def fence(self) -> None:
        self.fenced.set()
        self.check()


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)  # a database driver's own message, without SQLAlchemy's statement
    return (str(orig) if orig is not None else str(exc)).strip().split("\n")[0]


def snapshot_file(path: Path, slot: int) -> Path:
    """`checkpoint.pt` as it is now, under `checkpoint.<slot>.pt`: a hard link (the engine replaces its file by
    rename, which leaves the link's content alone), or a copy where links are not supported; written atomically."""
    target = path.with_name(f"{path.stem}.{slot}{path.suffix}")
    tmp = path.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, target)
    _fsync_dir(path.parent)
    return target


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power cut
    finally:
        os.close(fd)
