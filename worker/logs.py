"""Warnings that repeat while a dependency is away (the database, a full disk), logged without flooding the log."""

from __future__ import annotations

import logging
import time
from typing import Any

REPEAT_EVERY_S = 60.0


class Throttled:
    """Logs the first of a run of repeated messages at once, then at most one every `every_s` seconds saying how many
    were left out; `reset` (after a success) makes the next failure show at once again."""

    def __init__(self, logger: logging.Logger, every_s: float = REPEAT_EVERY_S):
        self.logger, self.every_s = logger, every_s
        self._next_at: float | None = None
        self._skipped = 0

    def log(self, level: int, message: str, *args: Any, exc_info: Any = None) -> None:
        now = time.monotonic()
        if self._next_at is not None and now < self._next_at:
            self._skipped += 1
            return
        if self._skipped:
            message, args = f"{message} (and %d more like it)", (*args, self._skipped)
        first = self._next_at is None
        self.logger.log(level, message, *args, exc_info=exc_info if first else None)  # one traceback per run
        self._next_at, self._skipped = now + self.every_s, 0

    def warning(self, message: str, *args: Any) -> None:
        self.log(logging.WARNING, message, *args)

    def reset(self) -> None:
        self._next_at, self._skipped = None, 0
