"""TEST-ONLY fault injection: make the process running a chosen job kill itself with SIGKILL, as the OOM killer or
a segfault would, at a chosen point. Off unless TRICKSERVE_TEST_CRASH_JOB is set; never set it in production.

- TRICKSERVE_TEST_CRASH_JOB=<job id>: the job whose attempts crash (any other job runs normally).
- TRICKSERVE_TEST_CRASH_AT=step:<k> (default step:1): after the k-th optimizer step of the attempt;
  or checkpoint:<k>: right after the k-th checkpoint file of the attempt is written, before the database points
  at it (the window between the file and its pointer).
- TRICKSERVE_TEST_CRASH_ATTEMPTS=1,2 (default: every attempt): only these attempts crash.

The variables are read by the process that runs the job (the Celery pool child), so set them on the worker.
"""

from __future__ import annotations

import os
import signal

from core.engine.callbacks import Callback, RunContext

JOB_VAR, AT_VAR = "TRICKSERVE_TEST_CRASH_JOB", "TRICKSERVE_TEST_CRASH_AT"
ATTEMPTS_VAR = "TRICKSERVE_TEST_CRASH_ATTEMPTS"


class CrashAt(Callback):
    """SIGKILLs its own process at `point` ("step" or "checkpoint") number `k` of the attempt."""

    def __init__(self, point: str, k: int):
        if point not in ("step", "checkpoint"):
            raise ValueError(f"{AT_VAR}: unknown point {point!r}")
        self.point, self.k, self.seen = point, k, 0

    def on_step_end(self, ctx: RunContext) -> None:
        self._maybe_crash("step")

    def on_checkpoint(self, ctx: RunContext, path: str) -> None:
        self._maybe_crash("checkpoint")

    def _maybe_crash(self, point: str) -> None:
        if point == self.point:
            self.seen += 1
            if self.seen >= self.k:
                os.kill(os.getpid(), signal.SIGKILL)


def crash_hooks(job_id: str, attempt: int) -> list[Callback]:
    """The callbacks to run before every other one for this attempt: none unless the variables select it."""
    if os.environ.get(JOB_VAR) != job_id:
        return []
    attempts = os.environ.get(ATTEMPTS_VAR, "").strip()
    if attempts and attempt not in {int(a) for a in attempts.split(",")}:
        return []
    point, _, k = os.environ.get(AT_VAR, "step:1").partition(":")
    return [CrashAt(point, int(k or 1))]
